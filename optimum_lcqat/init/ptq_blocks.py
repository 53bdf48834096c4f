"""The block driver's pieces of the Hessian-aware PTQ: everything per decoder block except the
swap of its layers (that is :func:`optimum_lcqat.quant_api.quantize_block`, the one place that
replaces modules). The method, one decoder block at a time:

1. **Hessians** (:func:`collect_hessians`). The block's current input ``X`` (the output of the
   already *quantized* blocks before it; for block 0, the embeddings captured with a pre-hook
   that stops the forward, :func:`capture_block_inputs`) is run through the full-precision
   block. Forward hooks accumulate ``H = sum x x^T`` for each group of linears that share an
   input (q/k/v, gate/up, ...): per-batch products in float32 summed into a float64
   accumulator. The same pass stores the full-precision block output ``Y``, the fine-tuning
   target.
2. **Per-layer PTQ** (:func:`optimum_lcqat.init.ptq.quantize_weight_ptq`): rotation, BlockLDLQ,
   affine codebook fit and refinement, from the layer's weight and Hessian.
3. **Block fine-tuning** (:func:`finetune_block`). Codes fixed; ``s_u``, ``s_v``, ``A``,
   ``beta`` (affine only) of the block's linears (differentiable float32 stand-ins,
   :func:`tunable_layer`) and the block's own 1-D parameters (its norms) are tuned with Adam for
   ``ptq_finetune_steps`` steps on the MSE between the quantized block's output and ``Y``
   (learning rate ``ptq_finetune_lr`` times each tensor's RMS, cosine decay). An eighth of the
   samples is held out; the tuned values are kept only if they lower the held-out MSE.
4. The LC layers are built (rounded to 16-bit storage), swapped in, and ``X`` is propagated
   through the *final* quantized block (:func:`block_forward`): what the next block sees is
   what the saved model computes.
5. **End-to-end fine-tuning** (``ptq_e2e_steps`` > 0, :mod:`.e2e`): after the last block, the
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
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import calibration_samples, load_calibration_texts, resolve_tokenizer
from ..config import LCQATConfig
from ..nn.lc_linear import LCLinear
from ..tensor.lc_weight import LCWeight
from .ptq import _CHUNK

logger = logging.getLogger(__name__)

__all__ = [
    "PTQReport", "BlockProgress", "peak_rss_bytes", "ptq_samples", "find_blocks", "capture_block_inputs",
    "collect_hessians", "block_forward", "finetune_block", "tunable_layer", "rms_relative_adam", "set_cosine_lr",
]


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
    # layer name -> calibration tokens its Hessian came from (MoE experts: the tokens routed to it;
    # 0: none reached it, initialised data-free); layers inside the decoder blocks
    tokens: dict = field(default_factory=dict)


def tunable_layer(weight: LCWeight, bias, train_codebook: bool, device) -> LCLinear:
    """The block fine-tuning's stand-in for a layer: an float32 LCLinear over the PTQ weight
    (codes fixed, no latent); its forward is the reference LC function, differentiable in A,
    beta (affine codebook only), s_u and s_v; the bias stays frozen."""
    layer = LCLinear.from_weight(weight, bias, device=device, dtype=torch.float32)
    layer.A.requires_grad_(train_codebook)
    layer.beta.requires_grad_(train_codebook)
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    return layer


def find_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList]:
    best, best_count = None, 0
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            count = sum(1 for n in names if n.startswith(mname + "."))
            if count > best_count:
                best, best_count = (mname, mod), count
    if best is None:
        raise ValueError("lcqat PTQ: could not find the decoder blocks (an nn.ModuleList holding the linears)")
    return best


def first_tensor(out):
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


def capture_block_inputs(model, first_block, samples: torch.Tensor, batch_size: int, device):
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


def block_forward(block, X, kwargs_per_batch, batch_size, out, desc, leave=False, dtype=None):
    """``out[i] = block(X[i])`` batch by batch (``out`` may be ``X``: each batch reads only its own
    rows). ``dtype``: the block's compute dtype, when the activations are stored in another."""
    dev = _block_device(block)
    for bi, start in enumerate(tqdm(range(0, X.shape[0], batch_size), desc=desc, leave=leave)):
        xb = _rows(X, slice(start, start + batch_size), dev, dtype)
        out[start : start + batch_size] = first_tensor(block(xb, **kwargs_per_batch[bi])).to(out.dtype)


def collect_hessians(block, linears: dict, X, kwargs_per_batch, batch_size, Y, dtype=None):
    """Run the full-precision block on X (writing Y) and return (groups, Hessians per group leader,
    tokens per linear). A linear that no token reached (an expert the router never picked) is in
    none of them."""
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
            Y[start : start + batch_size] = first_tensor(block(xb, **kwargs_per_batch[bi])).to(Y.dtype)
    finally:
        for h in handles:
            h.remove()
    for ln in H:
        H[ln] /= counts[ln]
    return groups, H, {ln: counts[leader] for ln, leader in groups.items()}


def _block_mse(block, X, Y, kwargs_per_batch, batch_size, idx) -> float:
    num, den = 0.0, 0.0
    dev = _block_device(block)
    for i in idx:
        bi, off = divmod(int(i), batch_size)
        kw = _slice_batch(kwargs_per_batch[bi], slice(off, off + 1), min(batch_size, X.shape[0] - bi * batch_size))
        y = first_tensor(block(_rows(X, slice(i, i + 1), dev), **kw))
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


def finetune_block(block, tunables: dict, X, Y, kwargs_per_batch, batch_size, cfg: LCQATConfig, seed: int):
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
        y = first_tensor(block(_rows(X, slice(i, i + 1), dev), **kw))
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
