"""Data-free initialisation: nearest codeword in the rotated domain, least-squares (A, beta).

Alternates, ``init_iters`` times: assign every d-vector of the rotated weight to its nearest
codeword, then refit ``(A, beta)`` by least squares on the assigned codes. The start is the
scalar unit-variance grid. With the ``scalar`` codebook the grid stays fixed.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..tensor.codebook import fit_affine, index_to_codes, nearest_codeword, scalar_codebook
from ..tensor.hadamard import RotationPlan
from . import register_initializer
from .common import InitResult, finish, lc_layer_from_weight, rotated_start, rotation_plans

logger = logging.getLogger(__name__)


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
) -> InitResult:
    start = rotated_start(weight, seed, name, plan_in, plan_out)
    idx, A, beta = assign_and_fit(start.what.reshape(-1, vector_dim), vector_dim, codebook, iters)
    lcw, recon = finish(start, idx, A, beta)
    err = float((recon - start.what).norm() / start.what.norm().clamp_min(1e-30))
    return InitResult(lcw, err)


def quantize_linears_data_free(model, names: list[str], config) -> dict[str, float]:
    """Replace each named linear of ``model`` by an LC layer initialised without data (the
    config's block size, codebook, seed, init_iters); return the per-layer errors."""
    errors = {}
    for name in tqdm(names, desc="lcqat: data-free init", leave=False):
        linear = model.get_submodule(name)
        plan_in, plan_out = rotation_plans(linear, config)
        result = init_data_free(
            linear.weight.detach(), vector_dim=config.vector_dim, codebook=config.codebook, plan_in=plan_in,
            plan_out=plan_out, seed=config.seed, name=name, iters=config.init_iters,
        )
        model.set_submodule(name, lc_layer_from_weight(linear, result.weight, config))
        errors[name] = result.error
        logger.info("lcqat: %s %dx%d rotated-domain rel. error %.4f", name, linear.out_features, linear.in_features, result.error)
    return errors
