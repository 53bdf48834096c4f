"""What a checkpointed decoder block keeps: selective activation checkpointing for QAT and the
end-to-end PTQ stage.

Per-block checkpointing (issue #32) keeps each block's input and recomputes the block in the
backward: a second forward, ~25% of a QAT step on SmolLM2-135M. The recomputed op that costs the
most compute per byte of its output is the attention kernel: its FLOPs grow with the sequence
length, its output is one ``hidden``-wide row per token. The policy here keeps that output and
recomputes everything else, through torch's selective checkpointing
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the recompute reads it back
instead of running the kernel again. The output is the one the forward computed, so gradients are
bit-identical to plain checkpointing (tested).

Measured (benchmarks/results/memory.md, SmolLM2 at 4 x 512): keeping also the down projection's
product (the matmul with the widest inner dimension, as costly at 512 tokens) took the default
QAT step to 3.01 GiB, over issue #32's 3 GiB; the attention output alone keeps it under.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["keep_attention_output_context", "KEPT_ATTENTION_OUTPUTS"]

# attention outputs (per token: heads x head_dim values, not always the hidden size: Qwen3-30B-A3B's
# are 4096 wide, its hidden 2048) that the policy keeps per block (memory_plan)
KEPT_ATTENTION_OUTPUTS = 1


def _attention_ops() -> tuple:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return tuple(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


def _policy(attention: tuple, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in attention else CheckpointPolicy.PREFER_RECOMPUTE


def keep_attention_output_context():
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint`` (non-reentrant) that keeps the
    attention kernel's outputs (any of torch's fused scaled-dot-product kernels) and recomputes
    the rest."""
    return functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, _attention_ops()))
