"""The training forward of an LC layer as one autograd Function that keeps little for backward.

Plain autograd through ``reference.lc_forward(w, x, bias, codes=dge_round(latent_position(...)))``
keeps, per layer and step, the latent position ``u`` and the codes ``q`` (``[m, n]`` float32 each)
and about six activation-sized tensors (``x * s_u``, the rotated ``xt``, the folded ``z``, ``yt``,
the rotated output, ...): ~12 GB on SmolLM2-135M at 4x512 tokens (issue #32).

:class:`LCTrainingForward` saves only the input ``x`` (the tensor autograd would keep anyway), the
product ``yt`` (``[..., m]``: the one thing whose recomputation would cost the layer's big matmul)
and the parameters. Its backward
* applies the output side's adjoint by hand: ``g_yt = H_out (s_v * g_y)``, ``g_s_v`` from the
  re-rotated ``yt``, ``g_bias``;
* computes the product's grads by hand (``g_z = g_yt Q``, ``g_Q = g_yt^T z``, ``g_c = sum g_yt``);
* recomputes the rotated input ``xr = H_in (x * s_u)``, folds it under autograd
  (``fold_activations``: the grads of ``xr``, ``A`` and ``beta``), and the codes from the latent
  (``latent_position``, ``dge_round``) under autograd for the latent's grad; ``g_x`` and ``g_s_u``
  come from ``H_in^T g_xr``.
The rotations are :func:`optimum_lcqat.kernels.hadamard`: the native fast Walsh-Hadamard
transform where the extension takes the tensor, the reference matmul otherwise. As matmuls they
were over half of a QAT step on SmolLM2-135M (a 2048 x 1536 rotation: 14 ms as a matmul, 1.5 ms
native), and the backward ran them under autograd twice more. The fold, the product and the DGE
maths stay written once (tensor/codebook.py, kernels/reference.py, nn/dge.py). The output equals
plain autograd through ``reference.lc_forward`` up to the rotations' rounding (float32: ~1e-7
relative; bit for bit where the reference rotation runs).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import kernels
from ..kernels import reference
from ..tensor.packing import latent_position, unpack_codes
from .block_checkpointing import kept_product
from .dge import dge_round

__all__ = ["LCTrainingForward", "lc_training_forward"]


def _codes(latent: torch.Tensor, alpha: float | None, dtype: torch.dtype) -> torch.Tensor:
    """The codes the product multiplies: the DGE-rounded training latent, or (``alpha`` None) the
    fixed packed codes themselves, unpacked (the end-to-end PTQ stage, adapters on a frozen layer)."""
    if alpha is None:
        return unpack_codes(latent).to(dtype)
    # float32 position whatever the latent's dtype (see LCLinear.forward), cast to z's dtype as
    # reference.codes_product does: the same cast's backward then brings g_Q back to float32
    return dge_round(latent_position(latent, alpha)).to(dtype)


def _leaf(t: torch.Tensor | None, need: bool) -> torch.Tensor | None:
    """A fresh autograd leaf over ``t``'s data (no copy), requiring grad when ``need``."""
    return None if t is None else t.detach().requires_grad_(need)


def _sum_to(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` [..., n] summed over its leading dimensions: the grad of a [n] vector broadcast over them."""
    return t.reshape(-1, n).sum(0)


class LCTrainingForward(torch.autograd.Function):
    """``reference.lc_forward(w, x, bias, codes=dge_round(latent_position(latent, alpha)))``,
    saving ``x``, ``yt`` and the parameters only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, latent, A, beta, s_u, s_v, bias, alpha, plan_in, plan_out):
        def product():
            z, c = kernels.input_side(x, s_u, A, beta, plan_in)
            return reference.codes_product(z, _codes(latent, alpha, z.dtype), c)

        # a checkpointed block's recompute may get the product its forward kept (nn.block_checkpointing)
        yt = kept_product(x, product)
        # y in the dtype reference.output_side gives (rotated yt times s_v, promoted)
        y = kernels.hadamard(yt, plan_out, scale_out=s_v, transpose=True).to(torch.promote_types(yt.dtype, s_v.dtype))
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, yt, latent, A, beta, s_u, s_v, bias)
        ctx.alpha, ctx.plan_in, ctx.plan_out = alpha, plan_in, plan_out
        # The backward recomputes under the forward's autocast state (bf16 autocast casts the
        # fold's and the product's matmuls): custom_bwd does this for one fixed device type,
        # the layer runs on any.
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return y

    @staticmethod
    @once_differentiable  # the recomputations run on detached leaves: no graph for a double backward
    def backward(ctx, g_y):
        x, yt, latent, A, beta, s_u, s_v, bias = ctx.saved_tensors
        nx, nlat, nA, nbeta, nsu, nsv, nbias = ctx.needs_input_grad[:7]
        grads = dict.fromkeys(("x", "latent", "A", "beta", "s_u", "s_v", "bias"))
        m, n = yt.shape[-1], x.shape[-1]
        plan_in, plan_out = ctx.plan_in, ctx.plan_out
        dev, ac_on, ac_dtype = ctx.autocast
        with torch.autocast(dev, dtype=ac_dtype, enabled=ac_on):
            # output side, y = s_v * H_out^T yt + bias: its adjoint is H_out (s_v * .)
            if nbias:
                grads["bias"] = _sum_to(g_y, m).to(bias.dtype)
            if nsv:
                # in float32 whatever the dtypes (bf16 products summed over tokens lose digits)
                yr = kernels.hadamard(yt.float(), plan_out, transpose=True)
                grads["s_v"] = _sum_to(g_y.float() * yr, m).to(s_v.dtype)
            if not (nx or nlat or nA or nbeta or nsu):
                return (None, None, None, None, None, grads["s_v"], grads["bias"], None, None, None)
            g_yt = kernels.hadamard(g_y, plan_out, scale_in=s_v).to(yt.dtype)
            # z (recomputed: one pass a row) only for the latent's grad; the codes in the dtype the
            # forward multiplied them in (z's; under autocast the matmuls cast either way)
            z = kernels.input_side(x, s_u, A, beta, plan_in)[0] if nlat else None
            with torch.enable_grad():
                lat_ = _leaf(latent, nlat)
                q = _codes(lat_, ctx.alpha, yt.dtype if z is None else z.dtype)
            # The product by hand (the transposes of reference.codes_product's F.linear), in
            # q's dtype, or autocast's (matmul casts the same way linear did).
            needs = (nx, nsu, nA, nbeta)
            if any(needs):
                g_z = torch.matmul(g_yt, q.detach())
                g_c = g_yt.sum(-1, keepdim=True)
                got = kernels.input_side_backward(x, g_z, g_c, s_u, A, beta, plan_in, needs)
                for k, t, g in zip(("x", "s_u", "A", "beta"), (x, s_u, A, beta), got):
                    grads[k] = None if g is None else g.to(t.dtype)
            if nlat:
                mq = q.shape[0]
                g_q = torch.matmul(g_yt.reshape(-1, mq).T, z.reshape(-1, z.shape[-1])).to(q.dtype)
                with torch.enable_grad():
                    (grads["latent"],) = torch.autograd.grad(q, lat_, g_q)
        return (grads["x"], grads["latent"], grads["A"], grads["beta"], grads["s_u"], grads["s_v"], grads["bias"],
                None, None, None)


def lc_training_forward(x, latent, A, beta, s_u, s_v, bias, alpha: float | None, plan_in, plan_out) -> torch.Tensor:
    """The LC layer's training output (see :class:`LCTrainingForward`). ``alpha`` None: ``latent``
    is the layer's packed uint8 codes, fixed (no gradient for them)."""
    return LCTrainingForward.apply(x, latent, A, beta, s_u, s_v, bias, alpha, plan_in, plan_out)
