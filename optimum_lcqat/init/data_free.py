"""Data-free initialisation: nearest codeword in the rotated domain, least-squares (A, beta).

Alternates, ``init_iters`` times: assign every d-vector of the rotated weight to its nearest
codeword, then refit ``(A, beta)`` by least squares on the assigned codes. The start is the
scalar unit-variance grid. With the ``scalar`` codebook the grid stays fixed.
"""

from __future__ import annotations

import torch

from ..tensor.codebook import fit_affine, index_to_codes, nearest_codeword, scalar_codebook
from ..tensor.hadamard import RotationPlan
from ..tensor.packing import pack_codes
from . import register_initializer
from .common import LCParams, initial_scales, rotate_weight


def assign_and_fit(
    vecs: torch.Tensor, d: int, codebook: str, iters: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (index [N], A, beta) for vectors ``vecs`` [N, d] (float64)."""
    A, beta = scalar_codebook(d, dtype=torch.float64)
    idx = nearest_codeword(vecs, A, beta)
    if codebook == "affine":
        for _ in range(iters):
            A, beta = fit_affine(vecs, index_to_codes(idx, d), weights)
            idx = nearest_codeword(vecs, A, beta)
    return idx, A, beta


@register_initializer("data_free")
def init_data_free(
    weight: torch.Tensor,
    *,
    vector_dim: int,
    codebook: str,
    plan_in: RotationPlan,
    plan_out: RotationPlan,
    seed: int,
    name: str,
    iters: int = 4,
    **_,
) -> LCParams:
    m, n = weight.shape
    d = vector_dim
    s_u, s_v = initial_scales(weight, seed, name)
    what = rotate_weight(weight, s_u, s_v, plan_in, plan_out)
    vecs = what.reshape(-1, d)
    idx, A, beta = assign_and_fit(vecs, d, codebook, iters)
    codes = index_to_codes(idx, d).view(m, n)
    recon = (codes.view(-1, d).to(torch.float64) @ A.T + beta).view(m, n)
    err = float((recon - what).norm() / what.norm().clamp_min(1e-30))
    return LCParams(pack_codes(codes), A, beta, s_u, s_v, err)
