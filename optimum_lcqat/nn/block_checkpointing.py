"""What a checkpointed decoder block keeps: selective activation checkpointing for QAT and the
end-to-end PTQ stage.

Per-block checkpointing (issue #32) keeps each block's input and recomputes the block in the
backward: a second forward. Of the recomputed ops, the LC layers' products with the widest inner
dimension (the down projection's: its inner dimension is the MLP width, its output only ``hidden``
wide) cost the most compute per byte their output takes: a quarter of the block's matmul FLOPs on
SmolLM2 for a sixth of its linears' outputs. The context here keeps those products (``yt``, the
un-rotated output, ``hidden`` values per token and block) from the forward and hands them back to
the same layers in the recompute, which then skip their input side, codes and matmul
(nn.lc_training reads :func:`kept_product`). The products are the ones the forward computed, so
gradients are bit-identical to plain checkpointing (tested).

Why not torch's selective checkpointing (``create_selective_checkpoint_contexts``), which this
replaced: its policy runs in a Python dispatch mode on every aten op of the forward and the
recompute (~9,000 calls a SmolLM2 step), and that cost as much as the ops it let the recompute
skip (it also kept the attention kernel's output): 117.8 tok/s against 121.6 for plain
checkpointing, measured side by side. The kept products cost one list append a layer.
"""

from __future__ import annotations

import collections
import threading
import weakref

import torch

__all__ = ["DEFAULT_CHECKPOINT_KEEP_MIB", "keep_costly_outputs_context", "kept_product", "widest_linear_input"]

# LCQATCallback's default budget for the narrower layers' products (see keep_costly_outputs_context)
DEFAULT_CHECKPOINT_KEEP_MIB = 256

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


def kept_product(x: torch.Tensor, compute):
    """``compute()``, the LC layer's product for input ``x``, or the one a checkpointed forward kept
    for it: inside a recording forward a kept layer's product is computed and kept, inside its
    recompute it is handed back (once; a second backward through the same graph computes again,
    the same bits)."""
    active = getattr(_state, "active", None)
    if active is None:
        return compute()
    kept = active.kept
    call = kept.calls
    kept.calls += 1
    if not active.replay:
        out = compute()
        nbytes = 0 if x.shape[-1] >= kept.inner_min else out.numel() * out.element_size()
        if nbytes and kept.budget.used + nbytes > kept.budget.limit:
            return out
        kept.budget.used += nbytes
        # a finalizer gives the bytes back however the product goes (read back, or its graph freed)
        if nbytes:
            weakref.finalize(out, _give_back, kept.budget, nbytes)
        kept.products.append((call, out))
        return out
    if not kept.products or kept.products[0][0] != call:
        return compute()
    _, out = kept.products.popleft()
    if out.shape[:-1] != x.shape[:-1]:
        raise RuntimeError(f"lcqat checkpointing: the recompute reached an LC layer with input {tuple(x.shape)}, "
                           f"but the forward kept a product of shape {tuple(out.shape)} for it: the block's "
                           "recompute did not repeat its forward (a data-dependent path?). Please report it; "
                           "training without activation checkpointing "
                           "(LCQATCallback(activation_checkpointing=False)) avoids it.")
    return out


def _give_back(budget: _Budget, nbytes: int) -> None:
    budget.used -= nbytes


def widest_linear_input(model: torch.nn.Module) -> int:
    """The largest ``in_features`` of the model's linear layers (LC or dense)."""
    widest = 0
    for m in model.modules():
        n = getattr(m, "in_features", None)
        if isinstance(n, int):
            widest = max(widest, n)
    return widest
