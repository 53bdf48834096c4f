"""The linear-constrained codebook: codewords ``c(q) = A q + beta`` over ``q in {0..3}^d``.

Everything here works on rotated-domain weights viewed as vectors of ``d`` consecutive input
entries, ``w`` of shape ``[N, d]``.
"""

from __future__ import annotations

import math

import torch

from .hadamard import rotate, rotation_factors

LEVELS = 4  # 2-bit codes

# The unit-variance 4-level grid the "scalar" codebook is frozen at: a * (q - 1.5).
SCALAR_A = 1.0 / math.sqrt(1.25)
SCALAR_BETA = -1.5 / math.sqrt(1.25)


def lattice(d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """All ``4^d`` integer vectors ``[4^d, d]``; row ``k`` has ``q_i = (k >> 2i) & 3``.

    The row order matches the byte layout of :mod:`packing`, so for ``d == 4`` a packed byte
    is the row index.
    """
    k = torch.arange(LEVELS**d, device=device)
    q = torch.stack([(k >> (2 * i)) & 3 for i in range(d)], dim=1)
    return q.to(dtype)


def scalar_codebook(d: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return SCALAR_A * torch.eye(d, dtype=dtype), torch.full((d,), SCALAR_BETA, dtype=dtype)


def codewords(A: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The ``[4^d, d]`` table of ``A q + beta``."""
    q = lattice(A.shape[0], device=A.device, dtype=A.dtype)
    return q @ A.T + beta


def fold_activations(xt: torch.Tensor, A: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codebook folded into rotated activations, so that ``xt @ What^T = z @ Q^T + c`` for
    the integer codes ``Q``: ``z_g = A^T xt_g`` (per group of ``d`` entries) and
    ``c = sum_g <beta, xt_g>`` (one per row). No codebook lookup: the training forward and the
    int8-activation path multiply the codes themselves."""
    d = A.shape[0]
    xg = xt.unflatten(-1, (xt.shape[-1] // d, d))
    return (xg @ A).flatten(-2), (xg @ beta).sum(-1, keepdim=True)


def rotate_and_fold(x: torch.Tensor, plan, A: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fold_activations(rotate(x, plan), A, beta)`` in one matmul where the rotation's blocks hold
    whole codebook groups (``plan.right`` a multiple of ``d``); otherwise those two steps.

    Why: the fold is a ``[d, d]`` matmul over groups of ``d`` entries, a memory-bound pass of its
    own (``K = N = 4``: as long as the rotation's matmul on SmolLM2, issue #32). It acts within a
    rotation block, and the left factor mixes whole blocks, so it goes into the right factor:
    ``z = L X (R^T diag(A, .., A))``; ``c`` is ``X`` times ``R^T tile(beta)``, summed over the
    blocks with ``L``'s column sums. Same maths, another rounding order (float32: ~1e-7 relative).
    """
    d, r, n = A.shape[0], plan.right, plan.n
    if r % d:
        return fold_activations(rotate(x, plan), A, beta)
    if x.shape[-1] != n:
        raise ValueError(f"rotate_and_fold: last dimension {x.shape[-1]} does not match the plan's {n}")
    left, right = rotation_factors(plan, x.device, x.dtype)
    rt = right.T.reshape(r, r // d, d)
    m = (rt @ A).reshape(r, r)  # R^T diag(A, .., A)
    v = (rt @ beta).sum(-1)  # R^T tile(beta)
    xv = x.reshape(*x.shape[:-1], n // r, r)
    z, w = xv @ m, xv @ v
    if left is None:
        return z.reshape(x.shape), w.sum(-1, keepdim=True)
    return (left @ z).reshape(x.shape), (w @ left.sum(0)).unsqueeze(-1)


def nearest_codeword(
    w: torch.Tensor, A: torch.Tensor, beta: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Index (row of :func:`lattice`) of the codeword nearest to each row of ``w`` ``[N, d]``.

    The search runs in float32 (float64 inputs are cast): an argmin over 256 distances does not
    need more, and float32 matmuls are several times faster here. Chunks keep the
    ``[chunk, 256]`` distance block in cache.
    """
    dt = torch.float32 if w.dtype == torch.float64 else w.dtype
    w = w.to(dt)
    table = codewords(A.to(dt), beta.to(dt))
    norms = (table * table).sum(1)
    out = torch.empty(w.shape[0], dtype=torch.long, device=w.device)
    for start in range(0, w.shape[0], chunk):
        # ||w - c||^2 = ||w||^2 - 2 w.c + ||c||^2; the first term does not change the argmin.
        dist = torch.addmm(norms, w[start : start + chunk], table.T, alpha=-2.0)
        out[start : start + chunk] = dist.argmin(1)
    return out


def index_to_codes(index: torch.Tensor, d: int) -> torch.Tensor:
    """Codeword indices ``[N]`` to integer codes ``[N, d]`` (uint8)."""
    return torch.stack([(index >> (2 * i)) & 3 for i in range(d)], dim=1).to(torch.uint8)


def fit_affine(
    w: torch.Tensor, q: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(A, beta)`` minimising ``sum_i weights_i ||w_i - (A q_i + beta)||^2``.

    ``w`` and ``q`` are ``[N, d]``; the fit is done in float64. The normal equations are
    damped slightly so that a degenerate code set (a level that never occurs) stays solvable.
    """
    d = w.shape[1]
    x = torch.cat([q.to(torch.float64), torch.ones(q.shape[0], 1, dtype=torch.float64, device=q.device)], 1)
    y = w.to(torch.float64)
    if weights is not None:
        sw = weights.to(torch.float64).unsqueeze(1)
        xtx = x.T @ (x * sw)
        xty = (x * sw).T @ y
    else:
        xtx = x.T @ x
        xty = x.T @ y
    xtx = xtx + 1e-8 * xtx.diagonal().mean() * torch.eye(d + 1, dtype=torch.float64, device=q.device)
    sol = torch.linalg.solve(xtx, xty)  # [d + 1, d]: rows 0..d-1 are A^T, row d is beta
    return sol[:d].T.contiguous(), sol[d].contiguous()
