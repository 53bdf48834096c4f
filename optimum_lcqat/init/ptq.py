"""Hessian-aware PTQ initialisation (METHOD.md, "PTQ initialisation").

``quantize_model_ptq(model, names, config)`` replaces every named ``nn.Linear`` of ``model`` by an
:class:`~optimum_lcqat.nn.lc_linear.LCLinear` whose codes and parameters come from calibration
data. One decoder block at a time:

1. **Hessians.** The block's current input ``X`` (the output of the already *quantized* blocks
   before it; for block 0, the embeddings captured with a pre-hook that stops the forward) is run
   through the full-precision block. Forward hooks accumulate ``H = sum x x^T`` for each group
   of linears that share an input (q/k/v, gate/up, ...): per-batch products in float32 summed
   into a float64 accumulator. The same pass stores the full-precision block output ``Y``, the
   fine-tuning target.
2. **Rotation.** ``s_u`` = random signs, ``s_v`` = random signs x row RMS / 0.83 (as the
   data-free init); the weight goes to the rotated domain ``What`` and ``H`` to
   ``H_n diag(s_u) H diag(s_u) H_n^T``, normalised by its mean diagonal and damped
   (``+ ptq_damp I``).
3. **BlockLDLQ.** GPTQ-style error feedback over blocks of ``d`` columns with ``Hinv = R^T R``
   (``R`` upper): each row's d-vector goes to the codeword of the 256 ``A q + beta`` nearest in
   the metric ``(R_bb^T R_bb)^-1`` of the remaining-column OBS problem; the error
   ``(w - c) R_bb^-1`` is fed forward through ``R``. The first pass uses the scalar grid.
4. **Affine codebook.** ``init_iters`` alternations of the closed-form Hessian-weighted least
   squares fit of ``(A, beta)`` (minimising ``tr((What - C) H (What - C)^T)``; a 20 x 20 system)
   and ``ptq_refine_passes`` coordinate-descent passes that re-assign each d-vector to its best
   codeword given all the others (exact minimisation of the same proxy, so every step is
   monotone). The ``scalar`` codebook keeps the frozen grid and only refines the assignment.
5. **Block fine-tuning.** Codes fixed; ``s_u``, ``s_v``, ``A``, ``beta`` (affine only) of the
   block's linears and the block's own 1-D parameters (its norms) are tuned with Adam for
   ``ptq_finetune_steps`` steps on the MSE between the quantized block's output and ``Y``
   (learning rate ``ptq_finetune_lr`` times each tensor's RMS, cosine decay). An eighth of the
   samples is held out; the tuned values are kept only if they lower the held-out MSE.
6. The LC layers are built (``lc_layer_from_weight`` rounds to 16-bit storage), swapped in, and
   ``X`` is propagated through the *final* quantized block: what the next block sees is what the
   saved model computes.
7. **End-to-end fine-tuning** (``ptq_e2e_steps`` > 0, :mod:`.e2e`): after the last block, the
   codes stay fixed and every LC layer's continuous parameters and the norms are tuned together
   on the next-token loss of the calibration samples (kept only if held-out samples improve).

Linears outside the decoder blocks (rare: ``lm_head`` is skipped by default) get the data-free
initialisation. Peak memory (process RSS high-water mark, :func:`peak_rss_bytes`) is logged.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .._heap import retain_freed_memory
from ..calibration import calibration_samples, load_calibration_texts, resolve_tokenizer
from ..config import LCQATConfig
from ..nn.lc_linear import LCLinear
from ..tensor.codebook import codewords, index_to_codes, scalar_codebook
from ..tensor.hadamard import RotationPlan, rotate
from ..tensor.lc_weight import LCWeight
from . import register_initializer
from .common import InitResult, finish, lc_layer_from_weight, rotated_start, rotation_plans
from .data_free import quantize_linears_data_free

logger = logging.getLogger(__name__)

__all__ = ["quantize_model_ptq", "quantize_weight_ptq", "ptq_block", "ptq_samples", "PTQReport", "peak_rss_bytes"]


class _StopForward(Exception):
    pass


def peak_rss_bytes() -> int:
    """Process RSS high-water mark: ``VmHWM`` of /proc/self/status on Linux, else ``getrusage``
    (kilobytes on Linux, bytes on macOS). On Linux ``getrusage``'s ``ru_maxrss`` survives
    ``execve``: a process started by a large parent reports at least the parent's RSS at the
    fork, while ``VmHWM`` belongs to the process's own address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


@dataclass
class PTQReport:
    errors: dict  # layer name -> relative proxy error tr(E H E^T) / tr(W H W^T) after the codebook fit
    block_mse: dict  # block index -> (relative output MSE before fine-tune, after)
    seconds: float
    peak_rss_bytes: int
    e2e_loss: tuple | None = None  # held-out calibration loss (before, after) of the end-to-end stage


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
    weight: torch.Tensor,
    H: torch.Tensor | list,
    *,
    vector_dim: int,
    codebook: str,
    plan_in: RotationPlan,
    plan_out: RotationPlan,
    seed: int,
    name: str,
    iters: int = 4,
    refine_passes: int = 1,
    damp: float = 0.01,
) -> InitResult:
    """Hessian-aware codes and parameters of one layer. ``H``: ``sum x x^T`` of its input [n, n].

    ``H`` in a one-element list hands it over: it is taken out of the list and transformed in
    place (a float64 one), so that the caller holds no reference that would keep it alive (a
    14336-wide Hessian is 1.6 GB; a copy would double it)."""
    owned = isinstance(H, list)
    H = H.pop() if owned else H
    d = vector_dim
    start = rotated_start(weight, seed, name, plan_in, plan_out)
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


@register_initializer("ptq")
def init_ptq(weight, *, hessian, **kw) -> InitResult:
    return quantize_weight_ptq(weight, hessian, **kw)


def _tunable_layer(weight: LCWeight, bias, train_codebook: bool, device) -> LCLinear:
    """The block fine-tuning's stand-in for a layer: an float32 LCLinear over the PTQ weight
    (codes fixed, no latent); its forward is the reference LC function, differentiable in A,
    beta (affine codebook only), s_u and s_v; the bias stays frozen."""
    layer = LCLinear.from_weight(weight, bias, device=device, dtype=torch.float32)
    layer.A.requires_grad_(train_codebook)
    layer.beta.requires_grad_(train_codebook)
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    return layer


# ---------------------------------------------------------------------------------------------
# Model-level driver
# ---------------------------------------------------------------------------------------------
def _find_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList]:
    best, best_count = None, 0
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            count = sum(1 for n in names if n.startswith(mname + "."))
            if count > best_count:
                best, best_count = (mname, mod), count
    if best is None:
        raise ValueError("lcqat PTQ: could not find the decoder blocks (an nn.ModuleList holding the linears)")
    return best


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _slice_batch(obj, sl: slice, full: int):
    """Slice tensors (and tuples of tensors) whose first dimension is the batch size ``full``."""
    if torch.is_tensor(obj):
        return obj[sl] if obj.dim() > 0 and obj.shape[0] == full and full > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_slice_batch(o, sl, full) for o in obj)
    if isinstance(obj, list):
        return [_slice_batch(o, sl, full) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_batch(v, sl, full) for k, v in obj.items()}
    return obj


def _capture_block_inputs(model, first_block, samples: torch.Tensor, batch_size: int, device):
    """Inputs (hidden states and keyword arguments) of the first decoder block for every batch."""
    X = []
    kwargs_per_batch = []
    cap = {}

    def pre_hook(module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        cap["hs"] = hs
        cap["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if len(args) > 1:
            cap["args"] = args[1:]
        raise _StopForward

    handle = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for start in tqdm(range(0, samples.shape[0], batch_size), desc="lcqat PTQ: capture inputs", leave=False):
            batch = samples[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover
                raise RuntimeError("lcqat PTQ: the first decoder block was never called")
            X.append(cap["hs"].detach())
            kw = dict(cap["kw"])
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            if "args" in cap:
                raise RuntimeError("lcqat PTQ: decoder blocks called with extra positional arguments are not supported")
            kwargs_per_batch.append(kw)
    finally:
        handle.remove()
    return torch.cat(X, 0), kwargs_per_batch


def _block_device(block: nn.Module) -> torch.device:
    p = next(block.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _rows(X: torch.Tensor, sl: slice, device: torch.device, dtype=None) -> torch.Tensor:
    """Rows ``sl`` of the stored activations ``X`` where the block computes: the streaming path
    keeps X in host memory while the block may sit on a GPU (no copy when nothing changes)."""
    return X[sl].to(device=device, dtype=dtype or X.dtype)


def _block_forward(block, X, kwargs_per_batch, batch_size, out, desc, leave=False, dtype=None):
    """``out[i] = block(X[i])`` batch by batch (``out`` may be ``X``: each batch reads only its own
    rows). ``dtype``: the block's compute dtype, when the activations are stored in another."""
    dev = _block_device(block)
    for bi, start in enumerate(tqdm(range(0, X.shape[0], batch_size), desc=desc, leave=leave)):
        xb = _rows(X, slice(start, start + batch_size), dev, dtype)
        out[start : start + batch_size] = _first_tensor(block(xb, **kwargs_per_batch[bi])).to(out.dtype)


def _collect_hessians(block, linears: dict, X, kwargs_per_batch, batch_size, Y, dtype=None):
    """Run the full-precision block on X (writing Y) and return (groups, Hessians per group leader)."""
    state = {"seen": {}}
    groups: dict[str, str] = {}  # linear name -> group leader
    H: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(lname):
        def hook(module, inp, out):
            x = inp[0]
            # Linears fed the very same tensor share a Hessian. The tensor is kept referenced for
            # the rest of the batch so that its address cannot be reused by a later input.
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            hit = state["seen"].get(key)
            if hit is None:
                state["seen"][key] = (lname, x)
                leader = lname
            else:
                leader = hit[0]
            if lname not in groups:
                groups[lname] = leader
            if groups[lname] != lname:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            n = x2.shape[1]
            if lname not in H:
                H[lname] = torch.zeros(n, n, dtype=torch.float64, device=x2.device)
            acc = H[lname]
            # float32 products summed into float64, a strip of rows at a time: a whole x^T x and
            # the float64 copy that a mixed-dtype add_ makes of it would be 2.5 GB at n = 14336
            for i in range(0, n, _CHUNK):
                acc[i : i + _CHUNK].add_(x2[:, i : i + _CHUNK].T @ x2)
            counts[lname] = counts.get(lname, 0) + x2.shape[0]

        return hook

    handles = [mod.register_forward_hook(make_hook(ln)) for ln, mod in linears.items()]
    dev = _block_device(block)
    try:
        for bi, start in enumerate(tqdm(range(0, X.shape[0], batch_size), desc="lcqat PTQ: hessians", leave=False)):
            state["seen"] = {}
            xb = _rows(X, slice(start, start + batch_size), dev, dtype)
            Y[start : start + batch_size] = _first_tensor(block(xb, **kwargs_per_batch[bi])).to(Y.dtype)
    finally:
        for h in handles:
            h.remove()
    for ln in H:
        H[ln] /= counts[ln]
    return groups, H


def _block_mse(block, X, Y, kwargs_per_batch, batch_size, idx) -> float:
    num, den = 0.0, 0.0
    dev = _block_device(block)
    for i in idx:
        bi, off = divmod(int(i), batch_size)
        kw = _slice_batch(kwargs_per_batch[bi], slice(off, off + 1), min(batch_size, X.shape[0] - bi * batch_size))
        y = _first_tensor(block(_rows(X, slice(i, i + 1), dev), **kw))
        target = _rows(Y, slice(i, i + 1), dev, torch.float32)
        num += float((y.float() - target).pow(2).sum())
        den += float(target.pow(2).sum())
    return num / max(den, 1e-30)


def rms_relative_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with one group per tensor at ``lr`` times the tensor's RMS: Adam's step is about the
    learning rate whatever the gradient's size, so tensors of very different magnitude (``s_u`` ~ 1,
    ``s_v`` ~ 0.05) need learning rates in proportion. :func:`set_cosine_lr` decays them."""
    groups = []
    for p in params:
        base = lr * float(p.detach().float().pow(2).mean().sqrt().clamp_min(1e-6))
        groups.append({"params": [p], "lr": base, "base_lr": base})
    return torch.optim.Adam(groups, betas=(0.9, 0.99))


def set_cosine_lr(opt: torch.optim.Optimizer, step: int, steps: int) -> None:
    """Cosine decay of every group's ``base_lr`` (see :func:`rms_relative_adam`) at ``step`` of ``steps``."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))


def _finetune_block(block, tunables: dict, X, Y, kwargs_per_batch, batch_size, cfg: LCQATConfig, seed: int):
    """Adam on s_u, s_v, (A, beta) and the block's own 1-D parameters against the fp output."""
    N = X.shape[0]
    n_val = max(1, N // 8) if N > 1 else 0
    train_idx = list(range(N - n_val)) if n_val else [0]
    val_idx = list(range(N - n_val, N)) if n_val else [0]
    tunable_ids = {id(p) for t in tunables.values() for p in t.parameters()}
    own = [p for p in block.parameters() if p.dim() == 1 and id(p) not in tunable_ids and p.is_floating_point()]
    params = [p for t in tunables.values() for p in t.parameters() if p.requires_grad] + own
    saved_own = [p.detach().clone() for p in own]
    saved_tun = {k: {n: p.detach().clone() for n, p in t.named_parameters()} for k, t in tunables.items()}
    req = [p.requires_grad for p in own]
    for p in own:
        p.requires_grad_(True)
    opt = rms_relative_adam(params, cfg.ptq_finetune_lr)
    steps = cfg.ptq_finetune_steps
    gen = torch.Generator().manual_seed(seed)
    dev = _block_device(block)
    with torch.no_grad():
        before = _block_mse(block, X, Y, kwargs_per_batch, batch_size, val_idx)
    y_scale = float(Y[train_idx].float().pow(2).mean())
    for step in tqdm(range(steps), desc="lcqat PTQ: fine-tune", leave=False):
        i = train_idx[int(torch.randint(len(train_idx), (1,), generator=gen))]
        bi, off = divmod(i, batch_size)
        kw = _slice_batch(kwargs_per_batch[bi], slice(off, off + 1), min(batch_size, N - bi * batch_size))
        set_cosine_lr(opt, step, steps)
        y = _first_tensor(block(_rows(X, slice(i, i + 1), dev), **kw))
        loss = (y.float() - _rows(Y, slice(i, i + 1), dev, torch.float32)).pow(2).mean() / y_scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = _block_mse(block, X, Y, kwargs_per_batch, batch_size, val_idx)
        if not after < before:  # keep the PTQ values when tuning does not help on held-out samples
            for p, s in zip(own, saved_own):
                p.copy_(s)
            for k, t in tunables.items():
                for n, p in t.named_parameters():
                    p.copy_(saved_tun[k][n])
    for p, r in zip(own, req):
        p.requires_grad_(r)
    return before, min(before, after) if steps else before


def ptq_samples(model: nn.Module, cfg: LCQATConfig) -> torch.Tensor:
    """The calibration token ids [num_samples, model_seqlen] the config asks for."""
    texts = load_calibration_texts(cfg.dataset)
    tokenizer = resolve_tokenizer(cfg.tokenizer, model)
    return calibration_samples(texts, tokenizer, cfg.num_samples, cfg.model_seqlen, cfg.seed)


@torch.no_grad()
def ptq_block(
    model: nn.Module, blocks_name: str, bidx: int, lnames: list[str], X: torch.Tensor, Y: torch.Tensor,
    kwargs_per_batch: list, cfg: LCQATConfig, *, device, dtype, out: torch.Tensor | None = None,
) -> tuple[dict[str, float], tuple[float, float]]:
    """Quantize decoder block ``bidx`` of ``model`` (at ``<blocks_name>.<bidx>``) in place: its
    linears ``lnames`` (full names) become LC layers, and ``X`` (the block's input) is propagated
    through the quantized block into ``out`` (default: ``X`` itself, batch by batch).

    The one per-block step of both the in-memory driver (:func:`quantize_model_ptq`) and the
    streaming one (``optimum_lcqat.streaming``): the same calls on the same inputs give the same
    codes. ``X``/``Y`` [N, T, hidden] may be stored in another dtype than the block computes in
    (``dtype``); ``Y`` is scratch (it receives the full-precision block output, the fine-tuning
    target). Returns the per-layer proxy errors and the block output MSE (before, after fine-tune).
    """
    block = model.get_submodule(f"{blocks_name}.{bidx}")
    bs = cfg.ptq_batch_size
    cast = None if X.dtype == dtype else dtype
    out = X if out is None else out
    if not lnames:
        _block_forward(block, X, kwargs_per_batch, bs, out, "lcqat PTQ: propagate", dtype=cast)
        return {}, (float("nan"), float("nan"))
    tb = time.perf_counter()
    errors: dict[str, float] = {}
    linears = {n: model.get_submodule(n) for n in lnames}
    groups, H = _collect_hessians(block, linears, X, kwargs_per_batch, bs, Y, dtype=cast)
    params: dict[str, LCWeight] = {}
    # The per-layer loops and the one-sample fine-tuning steps are many small ops: one thread
    # avoids OpenMP synchronisation costs that dominate them (~10x on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Widest inputs first: their Hessians (1.6 GB in float64 for a 14336-wide down_proj) are
        # then gone before the other layers' work. Layers are quantized independently (each
        # from its own Hessian and seed), so the order changes nothing else. A group's Hessian
        # goes to its last linear, which transforms it in place.
        by_width = sorted(lnames, key=lambda n: -linears[n].weight.shape[1])
        last_of_group = {groups[n]: n for n in by_width}
        for n in tqdm(by_width, desc="lcqat PTQ: quantize", leave=False):
            lin = linears[n]
            plan_in, plan_out = rotation_plans(lin, cfg)
            g = groups[n]
            h = [H.pop(g).cpu()] if last_of_group[g] == n else H[g].cpu()
            result = quantize_weight_ptq(
                lin.weight.detach().cpu(), h, vector_dim=cfg.vector_dim, codebook=cfg.codebook,
                plan_in=plan_in, plan_out=plan_out, seed=cfg.seed, name=n,
                iters=cfg.init_iters, refine_passes=cfg.ptq_refine_passes, damp=cfg.ptq_damp,
            )
            params[n], errors[n] = result.weight, result.error
        errors = {n: errors[n] for n in lnames}
        del H
        tq = time.perf_counter()
        # Block fine-tuning with differentiable stand-ins (float32), then the real LC layers.
        tunables = {}
        for n in lnames:
            t = _tunable_layer(params[n], linears[n].bias, cfg.codebook == "affine", device)
            tunables[n] = t
            model.set_submodule(n, t)
        if cfg.ptq_finetune_steps > 0:
            if dtype != torch.float32:
                block.float()
            with torch.enable_grad():
                mse = _finetune_block(
                    block, tunables, X.float() if X.dtype != torch.float32 else X,
                    Y.float() if Y.dtype != torch.float32 else Y, kwargs_per_batch, bs, cfg,
                    seed=cfg.seed * 1_000_003 + bidx,
                )
            if dtype != torch.float32:
                block.to(dtype)
        else:
            mse = (float("nan"), float("nan"))
        for n in lnames:
            model.set_submodule(n, lc_layer_from_weight(linears[n], tunables[n].lc_weight, cfg))
        del tunables
    finally:
        torch.set_num_threads(threads)
    tf = time.perf_counter()
    _block_forward(block, X, kwargs_per_batch, bs, out, "lcqat PTQ: propagate", dtype=cast)
    for n in lnames:
        logger.info("lcqat PTQ: %s proxy rel. error %.4f", n, errors[n])
    logger.info(
        "lcqat PTQ: block %d: layer errors %s; block output rel. MSE %.4g -> %.4g after fine-tune; "
        "%.1fs (quantize %.1fs, fine-tune %.1fs); peak RSS %.2f GiB",
        bidx, ", ".join(f"{n.rsplit('.', 1)[-1]}={errors[n]:.3f}" for n in lnames), mse[0], mse[1],
        time.perf_counter() - tb, tq - tb, tf - tq, peak_rss_bytes() / 2**30,
    )
    return errors, mse


class BlockProgress:
    """One INFO line per finished block: time, ETA from the mean block time so far, peak RSS."""

    def __init__(self, total: int, start_at: int = 0, what: str = "lcqat PTQ"):
        self.total, self.done0, self.what = total, start_at, what
        self.t0 = time.perf_counter()
        self.times: list[float] = []

    def block_done(self, bidx: int, seconds: float) -> None:
        self.times.append(seconds)
        left = self.total - (bidx + 1)
        eta = left * (sum(self.times) / len(self.times))
        logger.info(
            "%s: block %d/%d done in %.1fs; elapsed %.0fs, ETA %.0fs; peak RSS %.2f GiB",
            self.what, bidx + 1, self.total, seconds, time.perf_counter() - self.t0, eta, peak_rss_bytes() / 2**30,
        )


@torch.no_grad()
def quantize_model_ptq(model: nn.Module, names: list[str], config: LCQATConfig) -> PTQReport:
    """Replace the named linears of ``model`` by LC layers initialised by the Hessian-aware PTQ
    (the whole float model in memory; ``optimum_lcqat.streaming`` reads one block at a time)."""

    t0 = time.perf_counter()
    cfg = config
    samples = ptq_samples(model, cfg)
    logger.info(
        "lcqat PTQ: %d calibration samples x %d tokens, codebook=%s, %d layers",
        samples.shape[0], samples.shape[1], cfg.codebook, len(names),
    )
    blocks_name, blocks = _find_blocks(model, names)
    inside = [n for n in names if n.startswith(blocks_name + ".")]
    outside = [n for n in names if n not in set(inside)]
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if device.type == "cpu":
        retain_freed_memory()  # every block allocates and frees the same large buffers (see _heap)
    was_training = model.training
    model.eval()
    bs = cfg.ptq_batch_size
    X, kwargs_per_batch = _capture_block_inputs(model, blocks[0], samples, bs, device)
    X = X.to(dtype)
    Y = torch.empty_like(X)
    errors: dict[str, float] = {}
    block_mse: dict[int, tuple[float, float]] = {}
    progress = BlockProgress(len(blocks))
    for bidx in tqdm(range(len(blocks)), desc="lcqat PTQ: blocks"):
        tb = time.perf_counter()
        prefix = f"{blocks_name}.{bidx}."
        lnames = [n for n in inside if n.startswith(prefix)]
        errs, mse = ptq_block(model, blocks_name, bidx, lnames, X, Y, kwargs_per_batch, cfg, device=device, dtype=dtype)
        errors.update(errs)
        if lnames:
            block_mse[bidx] = mse
        progress.block_done(bidx, time.perf_counter() - tb)
    del X, Y
    if outside:
        logger.warning("lcqat PTQ: %d linear(s) outside the decoder blocks use the data-free init: %s", len(outside), outside)
        errors.update(quantize_linears_data_free(model, outside, cfg))
    e2e = None
    if cfg.ptq_e2e_steps > 0:
        from .e2e import finetune_model_e2e

        e2e = finetune_model_e2e(model, samples, cfg)
    if was_training:
        model.train()
    secs = time.perf_counter() - t0
    peak = peak_rss_bytes()
    if device.type == "cuda":  # pragma: no cover
        logger.info("lcqat PTQ: peak CUDA memory %.2f GiB", torch.cuda.max_memory_allocated(device) / 2**30)
    logger.info("lcqat PTQ: done in %.1fs; peak RSS (process high-water mark) %.2f GiB", secs, peak / 2**30)
    report = PTQReport(errors, block_mse, secs, peak, e2e)
    model._lcqat_ptq_report = report
    return report
