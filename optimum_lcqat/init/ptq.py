"""Hessian-aware PTQ of one weight (METHOD.md, "PTQ initialisation"): the numerics.

``quantize_weight_ptq(weight, H, ...)`` turns a dense weight and the Hessian ``H = sum x x^T`` of
its input into an :class:`~optimum_lcqat.tensor.lc_weight.LCWeight` (and its proxy error); it
changes no model. The block driver that collects the Hessians, fine-tunes a block and swaps its
layers is :mod:`.ptq_blocks` plus :func:`optimum_lcqat.quant_api.quantize_block`.

1. **Rotation.** ``s_u`` = random signs, ``s_v`` = random signs x row RMS / 0.83 (as the
   data-free init); the weight goes to the rotated domain ``What`` and ``H`` to
   ``H_n diag(s_u) H diag(s_u) H_n^T``, normalised by its mean diagonal and damped
   (``+ ptq_damp I``).
2. **BlockLDLQ.** GPTQ-style error feedback over blocks of ``d`` columns with ``Hinv = R^T R``
   (``R`` upper): each row's d-vector goes to the codeword of the 256 ``A q + beta`` nearest in
   the metric ``(R_bb^T R_bb)^-1`` of the remaining-column OBS problem; the error
   ``(w - c) R_bb^-1`` is fed forward through ``R``. The first pass uses the scalar grid.
3. **Affine codebook.** ``init_iters`` alternations of the closed-form Hessian-weighted least
   squares fit of ``(A, beta)`` (minimising ``tr((What - C) H (What - C)^T)``; a 20 x 20 system)
   and ``ptq_refine_passes`` coordinate-descent passes that re-assign each d-vector to its best
   codeword given all the others (exact minimisation of the same proxy, so every step is
   monotone). The ``scalar`` codebook keeps the frozen grid and only refines the assignment.
"""

from __future__ import annotations

import torch

from ..tensor.codebook import codewords, index_to_codes, scalar_codebook
from ..tensor.hadamard import RotationPlan, rotate
from .common import InitResult, LayerSpec, finish, rotated_start

__all__ = ["quantize_weight_ptq", "FLOAT64_HESSIAN_MAX_WIDTH"]


# ---------------------------------------------------------------------------------------------
# Per-layer quantization in the rotated domain
# ---------------------------------------------------------------------------------------------
# Inputs up to this width keep their Hessian and its factorisation in float64. Wider ones (the
# down_proj of 8B-class models: 14336) switch to float32 once the Hessian is rotated and damped:
# a 14336^2 float64 matrix is 1.6 GB and the factorisation holds three at once, which alone would
# exceed the streaming PTQ's memory budget. float32 is what GPTQ factorises in; the damping
# (ptq_damp of the mean diagonal) bounds the condition number.
FLOAT64_HESSIAN_MAX_WIDTH = 8192
_CHUNK = 512  # rows/columns per step of the in-place Hessian passes (a few x chunk x n temporaries)
_FIT_BUDGET = 64 * 2**20  # bytes of float64 scratch per step of the affine fit's reductions


def _prepare_hessian(H: torch.Tensor, damp: float, *, owned: bool = False) -> torch.Tensor:
    """float64 ``H / mean(diag H)`` with dead inputs' diagonal set to 1 and ``damp`` added to the
    diagonal; in place when ``owned`` (the caller hands its float64 ``H`` over)."""
    H = H if owned and H.dtype == torch.float64 else H.to(torch.float64, copy=True)
    dead = H.diagonal() <= 0
    mean_diag = H.diagonal().mean().clamp_min(1e-30)
    H /= mean_diag
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(damp)
    return H


def _rotate_hessian_(H: torch.Tensor, s_u: torch.Tensor, plan: RotationPlan) -> torch.Tensor:
    """``H <- R diag(s_u) H diag(s_u) R^T`` in place (``H`` symmetric), symmetrised.

    In chunks of rows and columns, so that the extra memory is a few chunk x n strips instead of
    the three n x n copies a whole-matrix rotation makes (4.8 GB for a 14336-wide layer)."""
    n = H.shape[0]
    H.mul_(s_u[:, None]).mul_(s_u[None, :])
    for i in range(0, n, _CHUNK):  # H R^T: rotate each row
        H[i : i + _CHUNK] = rotate(H[i : i + _CHUNK], plan)
    for i in range(0, n, _CHUNK):  # R (H R^T): rotate each column
        H[:, i : i + _CHUNK] = rotate(H[:, i : i + _CHUNK].T.contiguous(), plan).T
    for i in range(0, n, _CHUNK):  # (H + H^T) / 2, tile pair by tile pair
        for j in range(i, n, _CHUNK):
            a, b = H[i : i + _CHUNK, j : j + _CHUNK], H[j : j + _CHUNK, i : i + _CHUNK]
            sym = (a + b.T).mul_(0.5)
            a.copy_(sym)
            b.copy_(sym.T)
    return H


def _times_hessian(X: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``X @ H`` in float64 for a float64 ``X``; a float32 ``H`` is widened a column strip at a time."""
    if H.dtype == torch.float64:
        return X @ H
    out = torch.empty(X.shape[0], H.shape[1], dtype=torch.float64)
    for i in range(0, H.shape[1], _CHUNK):
        out[:, i : i + _CHUNK] = X @ H[:, i : i + _CHUNK].to(torch.float64)
    return out


def _nearest_in_metric(w: torch.Tensor, table: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """argmin_k ||(w - table_k) M||^2 for the rows of w [N, d]; table [K, d]."""
    wt = (w @ M).float()
    tt = (table @ M).float()
    dist = torch.addmm((tt * tt).sum(1), wt, tt.T, alpha=-2.0)
    return dist.min(1).indices  # (min is faster than argmin on CPU)


def _block_ldlq(W: torch.Tensor, H: torch.Tensor, table: torch.Tensor, d: int, lazy: int = 128) -> torch.Tensor:
    """Codeword index [m, n/d] by BlockLDLQ (OBS error feedback over d-column blocks)."""
    m, n = W.shape
    # factorised in H's own dtype (float64 up to FLOAT64_HESSIAN_MAX_WIDTH); one n x n temporary
    # dropped before the next is made
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    del L
    R = torch.linalg.cholesky(Hinv, upper=True)  # Hinv = R^T R
    del Hinv
    R = R.to(W.dtype)
    W = W.clone()
    table = table.to(W.dtype)
    idx = torch.empty(m, n // d, dtype=torch.long)
    eye = torch.eye(d, dtype=W.dtype)
    for i1 in range(0, n, lazy):
        i2 = min(i1 + lazy, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        R1 = R[i1:i2, i1:i2]
        for j in range(0, i2 - i1, d):
            Rb = R1[j : j + d, j : j + d]
            Minv = torch.linalg.solve_triangular(Rb, eye, upper=True)  # Rb^-1
            w = W1[:, j : j + d]
            k = _nearest_in_metric(w, table, Minv)
            idx[:, (i1 + j) // d] = k
            E = (w - table[k]) @ Minv
            Err1[:, j : j + d] = E
            if j + d < i2 - i1:
                W1[:, j + d :] -= E @ R1[j : j + d, j + d :]
        if i2 < n:
            W[:, i2:] -= Err1 @ R[i1:i2, i2:]
    return idx


def _refine(
    W: torch.Tensor, H: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, d: int, passes: int, lazy: int = 128
) -> torch.Tensor:
    """Coordinate descent on tr((W - C) H (W - C)^T): each d-vector to its best codeword given the rest.

    ``G = (W - C) H`` is kept up to date lazily: inside a chunk of ``lazy`` columns only the
    chunk's columns are updated per step; the chunk's accumulated change reaches the other
    columns in one matrix product at the end of the chunk.
    """
    if passes <= 0:
        return idx
    m, n = W.shape
    nb = n // d
    idx = idx.clone()
    C = table[idx].reshape(m, n)
    G = (W - C) @ H  # [m, n]
    Hb = H.view(nb, d, nb, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1).to(torch.float64)  # [nb, d, d]
    Hb_inv = torch.linalg.inv(Hb).to(W.dtype)
    Lb = torch.linalg.cholesky(Hb).to(W.dtype)  # Hb = Lb Lb^T: metric ||v Lb||^2 = v Hb v^T
    for _ in range(passes):
        for i1 in range(0, n, lazy):
            i2 = min(i1 + lazy, n)
            D = torch.zeros(m, i2 - i1, dtype=W.dtype)  # change of E = W - C on this chunk
            G1 = G[:, i1:i2].clone()
            H1 = H[i1:i2, i1:i2]
            for j in range(0, i2 - i1, d):
                b = (i1 + j) // d
                c_old = C[:, i1 + j : i1 + j + d]
                target = c_old + G1[:, j : j + d] @ Hb_inv[b]
                k = _nearest_in_metric(target, table, Lb[b])
                c_new = table[k]
                delta = c_old - c_new
                idx[:, b] = k
                C[:, i1 + j : i1 + j + d] = c_new
                D[:, j : j + d] = delta
                G1 += delta @ H1[j : j + d, :]
            if i1 > 0:
                G[:, :i1] += D @ H[i1:i2, :i1]
            G[:, i1:i2] = G1
            if i2 < n:
                G[:, i2:] += D @ H[i1:i2, i2:]
    return idx


def _fit_affine_hessian(W: torch.Tensor, H: torch.Tensor, idx: torch.Tensor, d: int, WH: torch.Tensor):
    """Closed-form (A, beta) minimising tr((W - C) H (W - C)^T) for fixed codes.

    The normal equations are a 20 x 20 system, but its Gram matrix sums over every pair of
    d-blocks: ``K = Qf^T Qf`` is (n/d (d+1))^2 (2.6 GB in float64 for a 14336-wide layer), so it
    is reduced a strip of block rows at a time within ``_FIT_BUDGET``. Codes are 0..3: ``K`` is
    exact in float32."""
    m, n = W.shape
    nb, e = n // d, d + 1
    q = index_to_codes(idx.reshape(-1), d).to(torch.float32).view(m, nb, d)
    Qt = torch.cat([q, torch.ones(m, nb, 1, dtype=torch.float32)], 2)  # [m, nb, d+1]
    del q
    Qf = Qt.view(m, nb * e)
    # G[(r,s),(r',t)] = sum_{g,h} K[g,s,h,t] H[g,r,h,r']
    Gm = torch.zeros(d, e, d, e, dtype=torch.float64)
    step = max(1, _FIT_BUDGET // (nb * e * e * 8))
    for g0 in range(0, nb, step):
        g1 = min(nb, g0 + step)
        K = (Qf[:, g0 * e : g1 * e].T @ Qf).to(torch.float64).view(g1 - g0, e, nb, e)  # K[g, s, h, t]
        Hg = H[g0 * d : g1 * d].to(torch.float64).view(g1 - g0, d, nb, d)  # H[g, r, h, r']
        Gm += torch.einsum("gsht,grhu->rsut", K, Hg)
        del K, Hg
    Gm = Gm.reshape(d * e, d * e)
    rhs = torch.zeros(d, e, dtype=torch.float64)
    rows = max(1, _FIT_BUDGET // (nb * e * 8))
    WHv = WH.view(m, nb, d)
    for j0 in range(0, m, rows):
        rhs += torch.einsum("jgs,jgr->rs", Qt[j0 : j0 + rows].to(torch.float64), WHv[j0 : j0 + rows])
    rhs = rhs.reshape(-1)
    Gm = Gm + 1e-9 * Gm.diagonal().mean() * torch.eye(Gm.shape[0], dtype=torch.float64)
    theta = torch.linalg.solve(Gm, rhs).view(d, d + 1)
    return theta[:, :d].contiguous(), theta[:, d].contiguous()


def _proxy(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, WH: torch.Tensor) -> float:
    """tr((W - C) H (W - C)^T) / tr(W H W^T), a strip of rows at a time (float64 [m, n] temporaries
    are 0.5 GB each for an 8B down_proj)."""
    num = den = 0.0
    for i in range(0, W.shape[0], _CHUNK):
        E = W[i : i + _CHUNK] - C[i : i + _CHUNK]
        num += float((_times_hessian(E, H) * E).sum())
        den += float((WH[i : i + _CHUNK] * W[i : i + _CHUNK]).sum())
    return num / max(den, 1e-30)


def quantize_weight_ptq(
    weight: torch.Tensor, H: torch.Tensor | list, spec: LayerSpec, *, refine_passes: int = 1, damp: float = 0.01,
) -> InitResult:
    """Hessian-aware codes and parameters of one layer. ``H``: ``sum x x^T`` of its input [n, n].

    ``H`` in a one-element list hands it over: it is taken out of the list and transformed in
    place (a float64 one), so that the caller holds no reference that would keep it alive (a
    14336-wide Hessian is 1.6 GB; a copy would double it)."""
    owned = isinstance(H, list)
    H = H.pop() if owned else H
    d = spec.vector_dim
    codebook, iters, plan_in = spec.codebook, spec.iters, spec.plan_in
    start = rotated_start(weight, spec.seed, spec.name, plan_in, spec.plan_out)
    W = start.what  # float64 [m, n]
    Hr = _rotate_hessian_(_prepare_hessian(H, 0.0, owned=owned), start.s_u, plan_in)
    Hr = _prepare_hessian(Hr, damp, owned=True)
    del H
    if Hr.shape[0] > FLOAT64_HESSIAN_MAX_WIDTH:
        Hr = Hr.float()
    A, beta = scalar_codebook(d, dtype=torch.float64)
    # The sequential loops run in float32 (the (A, beta) fit in float64; the Cholesky factors in
    # Hr's dtype).
    W32 = W.float()
    H32 = Hr if Hr.dtype == torch.float32 else Hr.float()
    idx = _block_ldlq(W32, Hr, codewords(A, beta), d)
    WH = _times_hessian(W, Hr)
    rounds = iters if codebook == "affine" else 1
    for _ in range(rounds):
        if codebook == "affine":
            A, beta = _fit_affine_hessian(W, Hr, idx, d, WH)
        idx = _refine(W32, H32, idx, codewords(A, beta).float(), d, refine_passes)
    if codebook == "affine":
        A, beta = _fit_affine_hessian(W, Hr, idx, d, WH)
    del W32, H32
    lcw, C = finish(start, idx, A, beta)
    return InitResult(lcw, _proxy(W, Hr, C, WH))
