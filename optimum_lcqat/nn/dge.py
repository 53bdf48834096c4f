"""Rounding of latent codes with the Differentiable Gradient Estimator (DGE).

DGE (Wang et al. 2025, arXiv 2501.17116) replaces the straight-through estimator's constant
derivative by ``dQ/dU = min((1/k) |2r - 1|^(1/k - 1), c)`` with ``r = U - floor(U)``: steep
near the bin edges (where a small move flips the code) and small at the bin centres. ``k = 1``
gives back the STE. The derivative is applied everywhere, including where the clamp to 0..3
is active, so that a latent pushed past the end of the range can be pulled back.
"""

from __future__ import annotations

import torch

DGE_K = 5.0
DGE_CAP = 3.0


class _DGERound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, k: float, cap: float, hi: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.k, ctx.cap = k, cap
        return torch.clamp(torch.round(u), 0.0, hi)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (u,) = ctx.saved_tensors
        r = u - torch.floor(u)
        dist = (2.0 * r - 1.0).abs().clamp_min(1e-12)
        slope = torch.clamp(dist.pow(1.0 / ctx.k - 1.0) / ctx.k, max=ctx.cap)
        return grad_out * slope, None, None, None


def dge_round(u: torch.Tensor, k: float = DGE_K, cap: float = DGE_CAP, levels: int = 4) -> torch.Tensor:
    """``clamp(round(u), 0, levels - 1)`` with the DGE derivative."""
    return _DGERound.apply(u, k, cap, float(levels - 1))
