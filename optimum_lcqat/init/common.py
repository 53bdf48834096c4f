"""Pieces shared by the initialisers: sign vectors, rotation of a weight, the result type."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..tensor.hadamard import RotationPlan, rotate

# RMS of the rotated, row-normalised weight relative to the unit-variance code grid (release).
TARGET_RMS = 0.83


@dataclass
class LCParams:
    packed: torch.Tensor  # uint8 [m, n/4]
    A: torch.Tensor  # [d, d]
    beta: torch.Tensor  # [d]
    s_u: torch.Tensor  # [n]
    s_v: torch.Tensor  # [m]
    error: float  # relative Frobenius error of the rotated-domain weight (or proxy loss)


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
