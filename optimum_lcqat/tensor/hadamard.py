"""Orthonormal Hadamard rotations used for incoherence processing.

A rotation of a dimension ``n`` is stored as a Kronecker product ``L (x) R`` of two small
orthonormal factors: ``x.view(..., n // r, r)`` is multiplied by ``R`` on the right and, when
``L`` is not the identity, by ``L`` on the left. Both layouts the method needs fit this form:

* block-diagonal Hadamard of block ``b`` (the released code's choice): ``L = I``, ``R = H_b``;
* full-dimension Hadamard ``n = K * 2^k`` (QuIP#'s construction): ``L = H_K``, ``R = H_{2^k}``.

Sizes that fit neither get the documented fallback of :func:`plan_rotation`: the largest power
of two that divides ``n`` (and is at most the asked block) becomes the block. What a checkpoint
means must not depend on the installed code's choice: each LC layer records its resolved plans
(``RotationPlan.record``, format version 2) and is rebuilt from them (:func:`plan_from_record`);
tests/test_hadamard_golden.py pins the matrix of every size the code can choose.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

FULL = "full"


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _paley_jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of ``order`` by Paley's constructions over a prime field, or None."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: order q + 1
        jac = _paley_jacobsthal(q)
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = jac
        return s + torch.eye(q + 1, dtype=torch.float64)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: order 2(q + 1)
        jac = _paley_jacobsthal(q)
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = jac
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        out = torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
        return out
    return None


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix of size n (float64, cached), or raise if none is known."""
    if _is_power_of_two(n):
        h = _sylvester(n)
    else:
        h = _paley(n)
        if h is None:
            raise ValueError(f"no Hadamard construction is known here for size {n}")
    h = h / n**0.5
    if not torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10):
        raise AssertionError(f"Hadamard construction for size {n} is not orthonormal")
    return h


def _odd_orders(limit: int = 256) -> list[int]:
    """Non-power-of-two orders that Paley gives, used as the K of a full rotation K * 2^k."""
    return [k for k in range(12, limit + 1, 4) if _paley(k) is not None]


@dataclass(frozen=True)
class RotationPlan:
    """How dimension ``n`` is rotated: ``left`` (K, or 1 for identity) times ``right`` (a power of 2)."""

    n: int
    left: int
    right: int
    # how the plan was chosen (logged), not what it computes: plans compare by (n, left, right)
    fallback: bool = field(default=False, compare=False)

    def record(self) -> tuple[int, int]:
        """What a checkpoint stores of the plan: ``(left, right)`` (``n`` is the layer's shape)."""
        return (self.left, self.right)

    def slice(self, start: int, stop: int) -> "RotationPlan":
        """The plan of entries ``start:stop`` of this dimension, for tensor-parallel shards: only
        a block-diagonal rotation splits, on block boundaries (a full rotation mixes every entry)."""
        if not 0 <= start < stop <= self.n:
            raise ValueError(f"rotation: shard {start}:{stop} is outside dimension {self.n}")
        if self.left != 1 or start % self.right or stop % self.right:
            raise ValueError(
                f"rotation: cannot split dimension {self.n} at {start}:{stop}: its rotation ({self.description}) "
                f"mixes entries across that boundary. Shard on multiples of the block"
                + (f" ({self.right})" if self.left == 1 else "")
                + " or quantize with a smaller power-of-two hadamard_block_size that divides the shard size."
            )
        return RotationPlan(stop - start, 1, self.right, self.fallback)

    @property
    def description(self) -> str:
        if self.left == 1:
            return f"block-diagonal Hadamard, block {self.right}"
        return f"full Hadamard {self.left}x{self.right}"


def _largest_pow2_block(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


@functools.lru_cache(maxsize=None)
def plan_rotation(n: int, block: int | str) -> RotationPlan:
    """Choose the rotation for dimension ``n`` under the config's ``hadamard_block_size``.

    * ``block`` an int (a power of two): block-diagonal Hadamard of that block when it divides
      ``n``; otherwise (fallback) the largest power of two dividing ``n`` and below ``block``.
    * ``block == "full"``: one Hadamard of size ``n`` when ``n = K * 2^k`` with ``K`` in 1 or a
      Paley order; otherwise (fallback) the largest power-of-two block dividing ``n``.
    A fallback is logged once per size and recorded in the plan.
    """
    if block == FULL:
        if _is_power_of_two(n):
            return RotationPlan(n, 1, n)
        for k in _odd_orders(min(n, 256)):
            if n % k == 0 and _is_power_of_two(n // k):
                return RotationPlan(n, k, n // k)
        b = _largest_pow2_block(n, n)
        logger.warning(
            "lcqat: no full Hadamard of size %d is known (needs K * 2^k with a Paley order K); "
            "using a block-diagonal Hadamard of block %d instead.", n, b
        )
        return RotationPlan(n, 1, b, fallback=True)
    b = _largest_pow2_block(n, int(block))
    if b != block:
        logger.warning(
            "lcqat: dimension %d is not a multiple of hadamard_block_size=%s; using the largest "
            "power-of-two block that divides it (%d) for this dimension.", n, block, b
        )
        return RotationPlan(n, 1, b, fallback=True)
    return RotationPlan(n, 1, b)


def plan_from_record(n: int, left: int, right: int) -> RotationPlan:
    """The plan a checkpoint recorded for a dimension ``n``, checked to be one this code can build."""
    left, right = int(left), int(right)
    # block-diagonal: left 1, blocks of `right` tiling n; full: one Kronecker product left x right = n
    fits = right >= 1 and _is_power_of_two(right) and n % right == 0 and (left == 1 or left * right == n)
    if not fits:
        raise ValueError(
            f"rotation record (left={left}, right={right}) does not describe dimension {n} (needs a power-of-two "
            "block dividing it, with left 1, or left * right == n); the checkpoint is corrupted"
        )
    if left != 1 and _paley(left) is None:
        raise ValueError(f"rotation record: no Hadamard construction of order {left} is known here")
    return RotationPlan(n, left, right)


@functools.lru_cache(maxsize=64)
def _factor(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return hadamard_matrix(size).to(device=device, dtype=dtype)


def rotation_factors(plan: RotationPlan, device, dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(L, R)`` of ``plan`` (``L`` None for the identity), cached per device and dtype."""
    return (None if plan.left == 1 else _factor(plan.left, device, dtype)), _factor(plan.right, device, dtype)


def rotate(x: torch.Tensor, plan: RotationPlan, transpose: bool = False) -> torch.Tensor:
    """Apply the orthonormal rotation ``H`` (or ``H^T``) of ``plan`` along the last dimension."""
    if x.shape[-1] != plan.n:
        raise ValueError(f"rotate: last dimension {x.shape[-1]} does not match the plan's {plan.n}")
    if plan.right == 1 and plan.left == 1:
        return x
    lead = x.shape[:-1]
    xv = x.reshape(*lead, plan.n // plan.right, plan.right)
    r = _factor(plan.right, x.device, x.dtype)
    # y = H x with H = L (x) R acting on x viewed as (n/r, r): Y = L X R^T. H^T swaps in L^T, R^T.
    y = xv @ (r if transpose else r.T)
    if plan.left != 1:
        left = _factor(plan.left, x.device, x.dtype)
        y = (left.T if transpose else left) @ y
    return y.reshape(*lead, plan.n)


def rotation_matrix(plan: RotationPlan, dtype=torch.float64) -> torch.Tensor:
    """The dense n x n matrix of the plan (tests and PTQ use it on Hessians)."""
    return rotate(torch.eye(plan.n, dtype=dtype), plan).T
