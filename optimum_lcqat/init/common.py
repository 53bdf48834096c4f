"""What the initialisers share: their start (sign vectors, row scales, the rotated weight) and
their end (codeword indices to an :class:`~optimum_lcqat.tensor.lc_weight.LCWeight`). Building
the LC layer and swapping it into a model is :mod:`optimum_lcqat.quant_api`'s job."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..tensor.codebook import codewords, index_to_codes
from ..tensor.hadamard import RotationPlan, plan_rotation, rotate
from ..tensor.lc_weight import LCWeight
from ..tensor.packing import pack_codes

# RMS of the rotated, row-normalised weight relative to the unit-variance code grid (release).
TARGET_RMS = 0.83


@dataclass(frozen=True)
class LayerSpec:
    """What one layer is quantized as, the same for every initialiser: vectors of ``vector_dim``
    weights, the ``codebook`` kind ("affine" or "scalar"), the input and output rotations, and the
    seed and layer ``name`` its random signs derive from; ``iters``: assignment/fit rounds."""

    vector_dim: int
    codebook: str
    plan_in: RotationPlan
    plan_out: RotationPlan
    seed: int
    name: str
    iters: int = 4


@dataclass
class InitResult:
    weight: LCWeight  # float64 parameters, packed codes
    error: float  # relative Frobenius error of the rotated-domain weight (or the PTQ proxy loss)


def random_signs(n: int, seed: int, name: str, salt: str) -> torch.Tensor:
    """Deterministic +-1 vector from (seed, layer name, salt)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}/{salt}".encode())) % (2**63))
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def rotate_weight(
    w: torch.Tensor, s_u: torch.Tensor, s_v: torch.Tensor, plan_in: RotationPlan, plan_out: RotationPlan
) -> torch.Tensor:
    """``What = H_m diag(1/s_v) W diag(1/s_u) H_n^T`` (float64)."""
    w = w.to(torch.float64) / s_v[:, None] / s_u[None, :]
    w = rotate(w, plan_in)  # rows: W H_n^T
    return rotate(w.T, plan_out).T  # H_m (.)


def initial_scales(w: torch.Tensor, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random signs for s_u; random signs times the row RMS / TARGET_RMS for s_v."""
    m, n = w.shape
    s_u = random_signs(n, seed, name, "u")
    row_rms = w.to(torch.float64).pow(2).mean(1).sqrt().clamp_min(1e-12)
    s_v = random_signs(m, seed, name, "v") * row_rms / TARGET_RMS
    return s_u, s_v


@dataclass
class RotatedStart:
    """The common start of every initialiser: the scales and the weight in the rotated domain."""

    what: torch.Tensor  # float64 [m, n]
    s_u: torch.Tensor
    s_v: torch.Tensor
    plan_in: RotationPlan
    plan_out: RotationPlan


def rotated_start(weight: torch.Tensor, seed: int, name: str, plan_in: RotationPlan, plan_out: RotationPlan) -> RotatedStart:
    s_u, s_v = initial_scales(weight, seed, name)
    return RotatedStart(rotate_weight(weight, s_u, s_v, plan_in, plan_out), s_u, s_v, plan_in, plan_out)


def finish(start: RotatedStart, index: torch.Tensor, A: torch.Tensor, beta: torch.Tensor) -> tuple[LCWeight, torch.Tensor]:
    """The common end: codeword indices [m, n/d] and the codebook to an LCWeight, with the
    reconstructed rotated weight ``C`` [m, n] (float64) for the initialiser's error figure."""
    m, n = start.what.shape
    d = A.shape[0]
    codes = index_to_codes(index.reshape(-1), d).view(m, n)
    C = codewords(A.to(torch.float64), beta.to(torch.float64))[index.reshape(-1)].view(m, n)
    weight = LCWeight(pack_codes(codes), A, beta, start.s_u, start.s_v, start.plan_in, start.plan_out)
    return weight, C


def rotation_plans(linear, config) -> tuple[RotationPlan, RotationPlan]:
    """The (input, output) rotation plans ``config.hadamard_block_size`` chooses for ``linear``."""
    return (plan_rotation(linear.in_features, config.hadamard_block_size),
            plan_rotation(linear.out_features, config.hadamard_block_size))
