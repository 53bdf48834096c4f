"""The LC computation in pure PyTorch: the one Python statement of the layer's maths.

``y = s_v * H_m^T (What @ H_n (x * s_u)) + bias`` with ``What[j, dg:dg+d] = A q_{j,g} + beta``,
computed without a codebook lookup: the rotated activations are folded with the codebook
(``z_g = A^T xt_g``, ``c = sum_g <beta, xt_g>``) and multiplied with the integer codes
(``xt @ What^T = z @ Q^T + c``). Every Python path computes through :func:`lc_forward`: the
reference backend of :mod:`optimum_lcqat.kernels` (also the test oracle of the native kernels),
the latent-code training forward of LCLinear (``codes`` = the DGE-rounded latent), the PTQ's
block fine-tuning (differentiable in ``A``, ``beta``, ``s_u``, ``s_v``) and the int8-activation
emulation. The native backends restate it once each (csrc/cpu, csrc/cuda).

Functions take an :class:`~optimum_lcqat.tensor.lc_weight.LCWeight` (or anything with its
fields: ``codes``, ``A``, ``beta``, ``s_u``, ``s_v``, ``plan_in``, ``plan_out``).
"""

from __future__ import annotations

import torch

from ..tensor.codebook import rotate_and_fold
from ..tensor.hadamard import rotate
from ..tensor.packing import unpack_codes


def integer_codes(w, dtype) -> torch.Tensor:
    """The weight's codes ``Q`` [m, n] as ``dtype`` (integer-valued)."""
    return unpack_codes(w.codes).to(dtype)


def quantize_activations_int8(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 rounding of the last dimension: ``(zq, scale)`` with ``z ~ zq * scale``
    (``zq`` integer-valued, in [-127, 127]; ``scale = max|z| / 127``, 1 for an all-zero row)."""
    z = z.float()
    amax = z.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.clamp(torch.round(z * (1.0 / scale)), -127, 127), scale


def lc_forward(w, x: torch.Tensor, bias: torch.Tensor | None = None, *, codes: torch.Tensor | None = None,
               int8_activations: bool = False) -> torch.Tensor:
    """The LC layer on ``x`` [..., n] -> [..., m].

    ``codes``: integer-valued float codes [m, n] to use instead of unpacking ``w.codes`` (the
    training forward passes its DGE-rounded latent here). ``int8_activations``: round the folded
    activations ``z`` per row to int8 before the product with the codes (the ``beta`` term stays
    exact), computed in float32 (integer sums are exact below 2^24) and returned in ``x.dtype``:
    the oracle of ``torch.ops.lcqat.lc_linear_a8`` (without it: of ``torch.ops.lcqat.lc_linear``).
    """
    A, beta, s_u, s_v = w.A, w.beta, w.s_u, w.s_v
    if int8_activations:
        A, beta, s_u, s_v = A.float(), beta.float(), s_u.float(), s_v.float()
        bias = None if bias is None else bias.float()
        xin = x.float()
    else:
        xin = x
    z, c = input_side(xin, s_u, A, beta, w.plan_in)
    if codes is None:
        codes = integer_codes(w, z.dtype)
    if int8_activations:
        zq, scale = quantize_activations_int8(z)
        yt = torch.nn.functional.linear(zq, codes.to(torch.float32)) * scale + c
    else:
        yt = codes_product(z, codes, c)
    y = output_side(yt, s_v, bias, w.plan_out)
    return y.to(x.dtype) if int8_activations else y


# lc_forward in its three steps, each a function of plain tensors so that the memory-lean training
# forward (optimum_lcqat.nn.lc_training) can recompute a side under autograd in its backward without
# restating the maths: input side (scale, rotate, fold: cheap), the product with the codes (the
# layer's one big matmul), output side (rotate back, scale, bias: cheap).
def input_side(x: torch.Tensor, s_u: torch.Tensor, A: torch.Tensor, beta: torch.Tensor, plan_in) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, c)``: ``x`` scaled by ``s_u``, rotated by ``H_n`` and folded with the codebook."""
    return rotate_and_fold(x * s_u, plan_in, A, beta)


def input_side_backward(x, g_z, g_c, s_u, A, beta, plan_in, needs):
    """``(g_x, g_s_u, g_A, g_beta)`` of :func:`input_side` for the grads ``g_z``, ``g_c`` of its
    outputs (autograd through it), None where ``needs`` (four booleans) says no."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((x, s_u, A, beta), needs)]
        z, c = input_side(*leaves, plan_in)
        outs = [(o, g) for o, g in ((z, g_z), (c, g_c)) if o.requires_grad]
        wrt = [t for t in leaves if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in outs], wrt, [g.to(o.dtype) for o, g in outs], allow_unused=True)
                   if outs and wrt else ())
    return tuple(next(got) if need else None for need in needs)


def codes_product(z: torch.Tensor, codes: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``yt = z @ Q^T + c`` (= ``xt @ What^T``), with the codes cast to ``z``'s dtype."""
    return torch.nn.functional.linear(z, codes.to(z.dtype)) + c


def output_side(yt: torch.Tensor, s_v: torch.Tensor, bias: torch.Tensor | None, plan_out) -> torch.Tensor:
    """``y = s_v * H_m^T yt + bias``."""
    y = rotate(yt, plan_out, transpose=True) * s_v
    return y if bias is None else y + bias


def rotated_weight(w, codes: torch.Tensor | None = None) -> torch.Tensor:
    """``What`` [m, n], ``What[j, dg:dg+d] = A q_{j,g} + beta``, in ``A``'s dtype."""
    d = w.A.shape[0]
    q = integer_codes(w, w.A.dtype) if codes is None else codes.to(w.A.dtype)
    m, n = q.shape
    return (q.view(m, n // d, d) @ w.A.T + w.beta).reshape(m, n)


def dense_weight(w, codes: torch.Tensor | None = None) -> torch.Tensor:
    """The effective dense weight ``W = diag(s_v) H_m^T What H_n diag(s_u)`` [m, n]."""
    what = rotated_weight(w, codes)
    dense = rotate(what, w.plan_in, transpose=True)  # What @ H_n
    dense = rotate(dense.T, w.plan_out, transpose=True).T  # H_m^T @ (.)
    return dense * w.s_v[:, None] * w.s_u[None, :]
