"""Pure-PyTorch reference implementations of the LC layer's inference ops.

They are the fallback backend and the oracle the native kernels are tested against.
"""

from __future__ import annotations

import torch

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
