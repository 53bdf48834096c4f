"""The training forward of an LC layer as one autograd Function that keeps little for backward.

Plain autograd through ``reference.lc_forward(w, x, bias, codes=dge_round(latent_position(...)))``
keeps, per layer and step, the latent position ``u`` and the codes ``q`` (``[m, n]`` float32 each)
and about six activation-sized tensors (``x * s_u``, the rotated ``xt``, the folded ``z``, ``yt``,
the rotated output, ...): ~12 GB on SmolLM2-135M at 4x512 tokens (issue #32).

:class:`LCTrainingForward` saves only the input ``x`` (the tensor autograd would keep anyway), the
product ``yt`` (``[..., m]``: the one thing whose recomputation would cost the layer's big matmul)
and the parameters. Its backward
* recomputes the output side from ``yt`` under autograd (``reference.output_side``) for the grads
  of ``yt``, ``s_v`` and the bias;
* computes the product's grads by hand (``g_z = g_yt Q``, ``g_Q = g_yt^T z``, ``g_c = sum g_yt``);
* recomputes the input side from ``x`` under autograd (``reference.input_side``) and the codes from
  the latent (``latent_position``, ``dge_round``) and lets autograd push the grads through them.
So the rotation, fold and DGE maths stay written once (kernels/reference.py, tensor/, nn/dge.py);
this file only wires them. The output is bit-identical to the plain path: forward calls the same
functions in the same order.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels import reference
from ..tensor.packing import latent_position, unpack_codes
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


class LCTrainingForward(torch.autograd.Function):
    """``reference.lc_forward(w, x, bias, codes=dge_round(latent_position(latent, alpha)))``,
    saving ``x``, ``yt`` and the parameters only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, latent, A, beta, s_u, s_v, bias, alpha, plan_in, plan_out):
        z, c = reference.input_side(x, s_u, A, beta, plan_in)
        yt = reference.codes_product(z, _codes(latent, alpha, z.dtype), c)
        y = reference.output_side(yt, s_v, bias, plan_out)
        ctx.save_for_backward(x, yt, latent, A, beta, s_u, s_v, bias)
        ctx.alpha, ctx.plan_in, ctx.plan_out = alpha, plan_in, plan_out
        # The backward recomputes under the forward's autocast state (bf16 autocast casts the
        # rotations' and the product's matmuls): custom_bwd does this for one fixed device type,
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
        dev, ac_on, ac_dtype = ctx.autocast
        with torch.autocast(dev, dtype=ac_dtype, enabled=ac_on):
            # output side: y = output_side(yt) -> g_yt (always needed upstream), g_s_v, g_bias
            need_in = nx or nlat or nA or nbeta or nsu
            with torch.enable_grad():
                yt_, sv_, b_ = _leaf(yt, need_in), _leaf(s_v, nsv), _leaf(bias, bool(nbias))
                y = reference.output_side(yt_, sv_, b_, ctx.plan_out)
                wrt = [(k, t) for k, t in (("yt", yt_), ("s_v", sv_), ("bias", b_)) if t is not None and t.requires_grad]
                out = torch.autograd.grad(y, [t for _, t in wrt], g_y) if wrt else ()
            got = {k: g for (k, _), g in zip(wrt, out)}
            grads["s_v"], grads["bias"] = got.get("s_v"), got.get("bias")
            if need_in:
                g_yt = got["yt"]
                in_grad = nx or nA or nbeta or nsu
                with torch.enable_grad():  # input side: x -> (z, c), differentiable where needed
                    x_, su_, A_, beta_ = _leaf(x, nx), _leaf(s_u, nsu), _leaf(A, nA), _leaf(beta, nbeta)
                    z, c = reference.input_side(x_, su_, A_, beta_, ctx.plan_in)
                    lat_ = _leaf(latent, nlat)
                    q = _codes(lat_, ctx.alpha, z.dtype)
                # The product by hand (the transposes of reference.codes_product's F.linear), in
                # the dtype the forward multiplied in: z's, or autocast's (matmul casts the same
                # way linear did, and the results are cast back as autocast's casts' backward does).
                if in_grad:
                    g_z = torch.matmul(g_yt, q).to(z.dtype)
                    g_c = g_yt.sum(-1, keepdim=True).to(c.dtype)
                    outs = [(o, g) for o, g in ((z, g_z), (c, g_c)) if o.requires_grad]
                    wrt = [(k, t) for k, t in (("x", x_), ("s_u", su_), ("A", A_), ("beta", beta_)) if t.requires_grad]
                    out = torch.autograd.grad([o for o, _ in outs], [t for _, t in wrt], [g for _, g in outs],
                                              allow_unused=True)
                    grads.update({k: g for (k, _), g in zip(wrt, out)})
                if nlat:
                    m = q.shape[0]
                    g_q = torch.matmul(g_yt.reshape(-1, m).T, z.detach().reshape(-1, z.shape[-1])).to(q.dtype)
                    with torch.enable_grad():
                        (grads["latent"],) = torch.autograd.grad(q, lat_, g_q)
        return (grads["x"], grads["latent"], grads["A"], grads["beta"], grads["s_u"], grads["s_v"], grads["bias"],
                None, None, None)


def lc_training_forward(x, latent, A, beta, s_u, s_v, bias, alpha: float | None, plan_in, plan_out) -> torch.Tensor:
    """The LC layer's training output (see :class:`LCTrainingForward`). ``alpha`` None: ``latent``
    is the layer's packed uint8 codes, fixed (no gradient for them)."""
    return LCTrainingForward.apply(x, latent, A, beta, s_u, s_v, bias, alpha, plan_in, plan_out)
