"""Data-free initialisation: nearest codeword in the rotated domain, least-squares (A, beta).

Alternates, ``init_iters`` times: assign every d-vector of the rotated weight to its nearest
codeword, then refit ``(A, beta)`` by least squares on the assigned codes. The start is the
scalar unit-variance grid. With the ``scalar`` codebook the grid stays fixed.
"""

from __future__ import annotations

import torch

from ..kernels import nearest_codeword
from ..tensor.codebook import fit_affine, index_to_codes, scalar_codebook
from ..tensor.hadamard import RotationPlan, plan_rotation
from ..tensor.lc_weight import LCWeight
from .common import InitResult, LayerSpec, finish, rotated_start


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


def init_data_free(weight: torch.Tensor, spec: LayerSpec) -> InitResult:
    start = rotated_start(weight, spec.seed, spec.name, spec.plan_in, spec.plan_out)
    idx, A, beta = assign_and_fit(start.what.reshape(-1, spec.vector_dim), spec.vector_dim, spec.codebook, spec.iters)
    lcw, recon = finish(start, idx, A, beta)
    err = float((recon - start.what).norm() / start.what.norm().clamp_min(1e-30))
    return InitResult(lcw, err)


def lc_weight_from_dense(weight: torch.Tensor, *, vector_dim: int = 4, hadamard_block_size: int | str = 128,
                         codebook: str = "affine", seed: int = 0, name: str = "", iters: int = 4) -> LCWeight:
    """Quantize a dense ``weight`` [m, n] data-free (the rotation plans ``hadamard_block_size``
    chooses); the parameters are in float64 (``to(dtype)`` / ``snapped()`` for storage values).
    (Was ``LCWeight.from_dense``: the tensor layer does not import the initialisers.)"""
    m, n = weight.shape
    spec = LayerSpec(vector_dim, codebook, plan_rotation(n, hadamard_block_size), plan_rotation(m, hadamard_block_size),
                     seed, name, iters)
    return init_data_free(weight, spec).weight
