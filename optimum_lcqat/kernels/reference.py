"""Pure-PyTorch reference implementations of the LC layer's inference ops.

They are the fallback backend and the oracle the native kernels are tested against.
"""

from __future__ import annotations

import torch

from ..tensor.codebook import fold_activations
from ..tensor.hadamard import RotationPlan, rotate
from ..tensor.packing import unpack_codes


def dequantize_rotated(packed: torch.Tensor, A: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Rotated-domain weight ``What [m, n]`` with ``What[j, dg:dg+d] = A q_{j,g} + beta``."""
    d = A.shape[0]
    q = unpack_codes(packed).to(A.dtype)
    m, n = q.shape
    return (q.view(m, n // d, d) @ A.T + beta).reshape(m, n)


def lc_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    A: torch.Tensor,
    beta: torch.Tensor,
    s_u: torch.Tensor,
    s_v: torch.Tensor,
    bias: torch.Tensor | None,
    plan_in: RotationPlan,
    plan_out: RotationPlan,
) -> torch.Tensor:
    """``y = s_v * H_m^T (What @ H_n (x * s_u)) + bias`` from the packed codes."""
    xt = rotate(x * s_u, plan_in)
    yt = torch.nn.functional.linear(xt, dequantize_rotated(packed, A, beta))
    y = rotate(yt, plan_out, transpose=True) * s_v
    return y if bias is None else y + bias


def quantize_activations_int8(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 rounding of the last dimension: ``(zq, scale)`` with ``z ~ zq * scale``
    (``zq`` integer-valued, in [-127, 127]; ``scale = max|z| / 127``, 1 for an all-zero row)."""
    z = z.float()
    amax = z.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.clamp(torch.round(z * (1.0 / scale)), -127, 127), scale


def lc_linear_a8(
    x: torch.Tensor,
    packed: torch.Tensor,
    A: torch.Tensor,
    beta: torch.Tensor,
    s_u: torch.Tensor,
    s_v: torch.Tensor,
    bias: torch.Tensor | None,
    plan_in: RotationPlan,
    plan_out: RotationPlan,
) -> torch.Tensor:
    """:func:`lc_linear` with int8 activations: ``z_g = A^T xt_g`` (the rotated activations
    folded with the codebook) is rounded per row to int8 before the product with the integer
    codes; the ``beta`` term stays exact. The oracle of ``torch.ops.lcqat.lc_linear_a8``."""
    xt = rotate(x.float() * s_u.float(), plan_in)
    z, c = fold_activations(xt, A.float(), beta.float())
    zq, scale = quantize_activations_int8(z)
    q = unpack_codes(packed).to(torch.float32)
    yt = torch.nn.functional.linear(zq, q) * scale + c  # integer sums: exact in fp32 below 2^24
    y = rotate(yt, plan_out, transpose=True) * s_v.float()
    y = y if bias is None else y + bias.float()
    return y.to(x.dtype)
