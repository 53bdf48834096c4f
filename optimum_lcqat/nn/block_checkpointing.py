"""What a checkpointed decoder block keeps: selective activation checkpointing for QAT and the
end-to-end PTQ stage.

Per-block checkpointing (issue #32) keeps each block's input and recomputes the block in the
backward: a second forward, ~20% of a QAT step on SmolLM2-135M. Two of the recomputed ops cost the
most compute per byte their output takes: the attention kernel (its FLOPs grow with the sequence)
and the matmul with the block's widest inner dimension (the down projection's product: its inner
dimension is the MLP width, its output only ``hidden`` wide: a quarter of the block's matmul FLOPs
on SmolLM2 for a sixth of its linears' outputs). The policy here keeps those two outputs (about
``2 x hidden`` values per token and block) and recomputes everything else, through torch's
selective checkpointing (``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the
recompute reads them back instead of running the ops again (memory_plan counts them per token and
block: the attention output, heads x head_dim values, not always the hidden size, and the
product, hidden wide). The outputs are the ones the forward
computed, so gradients are bit-identical to plain checkpointing (tested).

Measured (SmolLM2 at 4 x 512, the default QAT step): keeping the down product as well went from
126 to 131-133 tok/s. Before the chunked loss computed its gradient by hand (nn/lm_loss.py: one
logits buffer, not four) it took the step to 3.01 GiB, over issue #32's 3 GiB, and was dropped;
with it the step peaks lower than with the attention output alone before
(benchmarks/results/memory.md).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["keep_costly_outputs_context", "widest_linear_input"]


def _attention_ops() -> tuple:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return tuple(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


def _policy(inner_min: int, attention: tuple, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op is torch.ops.aten.mm.default and args[0].shape[-1] >= inner_min:
        return CheckpointPolicy.MUST_SAVE
    if op in attention:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def keep_costly_outputs_context(widest_inner: int):
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint`` (non-reentrant) that keeps the
    attention kernel's outputs (any of torch's fused scaled-dot-product kernels) and those of
    matmuls with an inner dimension of at least ``widest_inner`` (the model's widest linear
    input: its MLP width), and recomputes the rest."""
    return functools.partial(create_selective_checkpoint_contexts,
                             functools.partial(_policy, int(widest_inner), _attention_ops()))


def widest_linear_input(model: torch.nn.Module) -> int:
    """The largest ``in_features`` of the model's linear layers (LC or dense)."""
    widest = 0
    for m in model.modules():
        n = getattr(m, "in_features", None)
        if isinstance(n, int):
            widest = max(widest, n)
    return widest
