"""What a checkpointed decoder block keeps: selective activation checkpointing for QAT and the
end-to-end PTQ stage.

Per-block checkpointing (issue #32) keeps each block's input and recomputes the block in the
backward: a second forward, ~4 s of a ~17 s QAT step on SmolLM2-135M at 4 x 512 tokens. What the
recompute would compute for the most time per byte of output is kept from the forward instead and
handed back to the same call in the recompute:

* the attention kernel's output and logsumexp (its cost grows with the sequence; ``hidden`` values
  a token and block), through :class:`_KeptAttention` where torch runs the CPU flash kernel anyway;
* the LC products ``yt`` with the widest inner dimension (the down projection's: a quarter of the
  block's matmul FLOPs on SmolLM2 for a sixth of its linears' outputs);
* the other LC products of the blocks that run first, while they hold at most a budget
  (``extra_bytes``; LCQATCallback(checkpoint_keep_mib=192) by default): every LC product costs
  about the same compute per byte (its inner dimension is ``hidden``), so which ones is a matter of
  order.

An LC layer whose product comes back skips its input side, codes and matmul (nn.lc_training reads
:func:`kept_product`). What comes back is what the forward computed, so gradients are
bit-identical to plain checkpointing (tested).

Why not torch's selective checkpointing (``create_selective_checkpoint_contexts``), which kept the
attention output and the down product before: its policy runs in a Python dispatch mode on every
aten op of the forward and the recompute (~9,000 calls a SmolLM2 step), and that cost as much as
the ops it let the recompute skip (117.8 tok/s against 121.6 for plain checkpointing, side by
side). Here a kept result costs a list append, and the attention hook is active only around
transformers' sdpa function.
"""

from __future__ import annotations

import collections
import functools
import threading
import weakref

import torch
import torch.nn.attention
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

__all__ = ["DEFAULT_CHECKPOINT_KEEP_MIB", "keep_costly_outputs_context", "kept_product", "widest_linear_input",
           "wrap_sdpa"]

# LCQATCallback's default budget for the narrower layers' products (see keep_costly_outputs_context)
DEFAULT_CHECKPOINT_KEEP_MIB = 192

_state = threading.local()  # the recording or replaying _KeptProducts of the running checkpointed forward


class _KeptProducts:
    """One checkpointed call's kept products, each with the index of the LC call (in the block's
    forward order) it belongs to; ``budget`` is shared by the calls of one ``context_fn``."""

    def __init__(self, inner_min: int, budget: "_Budget"):
        self.inner_min, self.budget = inner_min, budget
        self.products: collections.deque = collections.deque()
        self.calls = 0  # LC calls seen in the running forward or recompute


class _Budget:
    """Bytes that products of narrower layers may hold at once across a step's checkpointed blocks
    (the widest layers' products are always kept)."""

    def __init__(self, limit: int):
        self.limit, self.used = int(limit), 0


class _Active:
    """Makes ``kept`` the thread's active store while entered (``replay``: the recompute reads it);
    re-enterable, as torch enters a recompute context once per backward that recomputes."""

    def __init__(self, kept: _KeptProducts, replay: bool):
        self.kept, self.replay = kept, replay

    def __enter__(self):
        self.outer = getattr(_state, "active", None)
        self.kept.calls = 0
        _state.active = self
        return self

    def __exit__(self, *exc):
        _state.active = self.outer
        return False


def keep_costly_outputs_context(widest_inner: int, extra_bytes: int = 0):
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint`` (non-reentrant): the forward keeps
    the products of the LC layers whose input is at least ``widest_inner`` wide (the model's widest
    linear input: its MLP width), and those of the other LC layers while they hold less than
    ``extra_bytes`` at once (in the blocks that run first); the recompute reads them back;
    everything else is recomputed."""
    inner, budget = int(widest_inner), _Budget(extra_bytes)

    def context_fn():
        kept = _KeptProducts(inner, budget)
        return _Active(kept, replay=False), _Active(kept, replay=True)

    return context_fn


def _kept(key: tuple, compute, always: bool):
    """``compute()``, or what the running checkpointed forward kept for this call: inside a recording
    forward the result is kept (``always``, or while the budget has room), inside its recompute it
    is handed back (once; a second backward through the same graph computes again, the same bits).
    ``key``: the call's input shape, checked on the way back."""
    active = getattr(_state, "active", None)
    if active is None:
        return compute()
    kept = active.kept
    call = kept.calls
    kept.calls += 1
    if not active.replay:
        out = compute()
        parts = out if isinstance(out, tuple) else (out,)
        nbytes = 0 if always else sum(t.numel() * t.element_size() for t in parts)
        if nbytes and kept.budget.used + nbytes > kept.budget.limit:
            return out
        if nbytes:
            kept.budget.used += nbytes
            # a finalizer gives the bytes back however the result goes (read back, or its graph freed)
            weakref.finalize(parts[0], _give_back, kept.budget, nbytes)
        kept.products.append((call, key, out))
        return out
    if not kept.products or kept.products[0][0] != call:
        return compute()
    _, was, out = kept.products.popleft()
    if was != key:
        raise RuntimeError(f"lcqat checkpointing: the recompute reached a call with input {key}, but the forward "
                           f"kept a result for one with input {was} here: the block's recompute did not repeat "
                           "its forward (a data-dependent path?). Please report it; training without activation "
                           "checkpointing (LCQATCallback(activation_checkpointing=False)) avoids it.")
    return out


def kept_product(x: torch.Tensor, compute):
    """``compute()``, the LC layer's product for input ``x``, or the one a checkpointed forward kept
    for it (the widest layers' always, the others' while the budget has room)."""
    active = getattr(_state, "active", None)
    if active is None:
        return compute()
    return _kept(tuple(x.shape), compute, always=x.shape[-1] >= active.kept.inner_min)


def _give_back(budget: _Budget, nbytes: int) -> None:
    budget.used -= nbytes


# ----------------------------------------------------------------------------- the attention kernel
_FLASH = torch.nn.attention.SDPBackend.FLASH_ATTENTION.value  # what torch._fused_sdp_choice returns for it


class _KeptAttention(torch.autograd.Function):
    """The CPU flash-attention kernel, the one ``F.scaled_dot_product_attention`` runs on the CPU for
    a call without mask or dropout, with the backward autograd gives it (the same aten ops, the
    same bits), so that a checkpointed block's recompute can take the forward's output and
    logsumexp back instead of running the kernel again."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal: bool, scale):
        def kernel():
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)

        out, lse = _kept(tuple(q.shape), kernel, always=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, out, lse, 0.0, ctx.is_causal, scale=ctx.scale)
        return gq, gk, gv, None, None


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention``, through _KeptAttention where torch would run the CPU flash
    kernel anyway (no mask, no dropout, grad on), else unchanged."""
    if (attn_mask is None and dropout_p == 0.0 and query.device.type == "cpu" and torch.is_grad_enabled()
            and torch._fused_sdp_choice(query, key, value, None, 0.0, bool(is_causal), scale=scale,
                                        enable_gqa=enable_gqa) == _FLASH):
        return _KeptAttention.apply(query, key, value, bool(is_causal), scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


class _AttentionCalls(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to :func:`_attention` while active (only around
    transformers' sdpa attention function: a handful of torch calls a block)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def wrap_sdpa(sdpa):
    """``sdpa`` (transformers' sdpa attention function) wrapped so that inside a block checkpointed
    with :func:`keep_costly_outputs_context` the attention kernel's output is kept like the widest
    products; outside such a block the wrapper calls ``sdpa`` as it is. Installed in transformers'
    registry by optimum_lcqat.sdpa_registry."""

    @functools.wraps(sdpa)
    def sdpa_keeping_its_output(*args, **kwargs):
        # not inside our checkpointed block (never under torch.compile: it does not trace our
        # checkpointing): as it was
        if torch.compiler.is_compiling() or getattr(_state, "active", None) is None:
            return sdpa(*args, **kwargs)
        with _AttentionCalls():
            return sdpa(*args, **kwargs)

    sdpa_keeping_its_output.lcqat_wraps = sdpa
    return sdpa_keeping_its_output


def widest_linear_input(model: torch.nn.Module) -> int:
    """The largest ``in_features`` of the model's linear layers (LC or dense)."""
    widest = 0
    for m in model.modules():
        n = getattr(m, "in_features", None)
        if isinstance(n, int):
            widest = max(widest, n)
    return widest
