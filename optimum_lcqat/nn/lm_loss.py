"""A causal LM's next-token loss and distillation KL from its hidden states, a chunk of tokens at a time.

Why: the plain way materialises the [tokens x vocab] logits in fp32 for the whole batch, then their
log-softmax and, in the backward, their gradient: ~3 x 400 MB for SmolLM2 at 4 x 512 tokens (vocab
49152), ~3 x 1 GB for Llama-3's vocab of 128256. Here the head runs on one chunk of positions at a
time, the chunk is reduced to its loss sum and freed, and the backward recomputes it
(torch.utils.checkpoint), so at most one chunk's logits exist. Positions without a label are dropped
before the head runs. The loss is transformers' ForCausalLMLoss (the sum over valid next-token
positions divided by their count, or by ``num_items_in_batch`` where the Trainer passes it), up to
the order of fp32 sums; the KL is :func:`optimum_lcqat.training.trainer.distillation_loss`'s.

Cost: the head's forward once more in the backward (SmolLM2: the head is ~1/6 of the forward's
FLOPs at 4 x 512 tokens, so ~5% of a training step). Where no parameter of the head trains (the
default: embeddings and head frozen) and the model is not sharded by FSDP2, the next-token loss
skips that recomputation: each chunk's gradient with respect to its hidden rows is computed in
the forward, right after its loss (the loss is a sum of per-chunk terms, so the gradient of a
chunk is all its own), and kept ([tokens x hidden], the size of the hidden states); the backward
only scales it (:class:`_HeadCrossEntropy`, a fused linear + cross-entropy). Its loss and logits'
gradient are computed by hand in the logits' own buffer (:func:`_ce_sum_and_grad`), so a chunk
takes one [positions x vocab] float32 buffer where autograd through cross_entropy takes four. The
next-token loss and its gradients are the same either way, up to float32 rounding (the sums in
another order).

Pure torch (the nn layer imports no transformers): the model is reached through the attributes
every transformers causal LM has (``base_model``, ``get_output_embeddings``, ``config``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 1024
IGNORE_INDEX = -100

__all__ = [
    "DEFAULT_CHUNK_TOKENS", "chunked_loss_unsupported", "causal_lm_hidden_states", "chunked_next_token_loss",
    "chunked_distillation_kl",
]

# config attributes through which a model changes its logits after the head (Gemma 2/3 soft-capping,
# Cohere's logit_scale, Granite's logits_scaling): the chunked loss would not see that change
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def chunked_loss_unsupported(model: nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for ``model``'s own, or None when it can."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        return f"{type(model).__name__} has no output embeddings (lm_head) to run a chunk at a time"
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return f"{type(model).__name__} has no separate base model giving hidden states"
    config = getattr(model, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            return f"{type(model).__name__} post-processes its logits ({name}={value})"
    return None


def causal_lm_hidden_states(model: nn.Module, **inputs) -> torch.Tensor:
    """The last hidden states [B, T, H] of a causal LM (its base model's output, before the head)."""
    inputs.pop("labels", None)
    inputs.pop("num_items_in_batch", None)
    inputs.pop("logits_to_keep", None)
    inputs["use_cache"] = False
    out = model.base_model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _next_token_rows(hidden: torch.Tensor, labels: torch.Tensor):
    """The hidden rows that have a next-token label, and those labels (shifted as transformers does)."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    return hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep], keep


def _ce_sum(h: torch.Tensor, y: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def _ce_sum_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.cross_entropy(logits.float(), targets, reduction="sum")`` and its gradient with respect
    to the logits (``softmax - onehot``), in one float32 buffer of the chunk's logits: the softmax is
    taken in place where the logits are float32 already. autograd through cross_entropy keeps four
    such buffers at once (logits, log-softmax, their grads): 800 MB on SmolLM2 at 1024 positions,
    the QAT step's peak."""
    x = logits.float()
    picked = x.gather(1, targets[:, None]).squeeze(1)
    top = x.amax(1, keepdim=True)
    x.sub_(top).exp_()  # in place: x is logits' own buffer when they are float32 (logits is detached)
    s = x.sum(1, keepdim=True)
    loss = ((top + s.log()).squeeze(1) - picked).sum()
    x.div_(s)
    x[torch.arange(x.shape[0], device=x.device), targets] -= 1.0
    return loss, x


class _HeadCrossEntropy(torch.autograd.Function):
    """``sum_chunks _ce_sum(rows[chunk], targets[chunk], head)`` for a head none of whose parameters
    trains, the gradient of ``rows`` computed in the forward a chunk at a time (see the module
    docstring)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_tokens: int):
        grad = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        total = rows.new_zeros((), dtype=torch.float32)
        for i in range(0, rows.shape[0], chunk_tokens):
            with torch.enable_grad():
                h = rows[i:i + chunk_tokens].detach().requires_grad_(grad is not None)
                out = head(h)
            loss, g_logits = _ce_sum_and_grad(out.detach(), targets[i:i + chunk_tokens])
            if grad is not None:
                (grad[i:i + chunk_tokens],) = torch.autograd.grad(out, h, g_logits.to(out.dtype))
            del out, g_logits
            total = total + loss
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g_total):
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * g_total.to(grad.dtype)), None, None, None


def _head_may_fuse(head: nn.Module, owner: nn.Module | None) -> bool:
    """Whether the fused head loss applies: no head parameter trains (a chunk's gradient would
    need the head's too) and no FSDP2 sharding (its hooks expect the head's backward in the
    backward pass)."""
    if any(p.requires_grad for p in head.parameters()):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch builds without distributed
        return True
    return not any(isinstance(m, FSDPModule) for m in ((head,) if owner is None else (head, owner)))


def chunked_next_token_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                            num_items_in_batch=None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                            owner: nn.Module | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels`` [B, T] (-100: no label),
    ``chunk_tokens`` positions at a time. ``owner``: the model the head belongs to (FSDP2 sharding
    of it turns the fused path off)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    rows, targets, _ = _next_token_rows(hidden, labels)
    if _head_may_fuse(head, owner):
        total = _HeadCrossEntropy.apply(rows, targets, head, chunk_tokens)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, rows.shape[0], chunk_tokens):
            total = total + checkpoint(_ce_sum, rows[i:i + chunk_tokens], targets[i:i + chunk_tokens], head,
                                       use_reentrant=False)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / max(int(targets.numel()), 1)


def _kl_sum(hs: torch.Tensor, ht: torch.Tensor, head_s: nn.Module, head_t: nn.Module, temperature: float):
    logp_s = F.log_softmax(head_s(hs).float() / temperature, dim=-1)
    with torch.no_grad():
        logp_t = F.log_softmax(head_t(ht).float() / temperature, dim=-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum()


def chunked_distillation_kl(student_hidden: torch.Tensor, student_head: nn.Module, teacher_hidden: torch.Tensor,
                            teacher_head: nn.Module, labels: torch.Tensor | None = None, temperature: float = 1.0,
                            chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the positions with a next-token label
    (every position but the last when ``labels`` is None), ``chunk_tokens`` positions at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if labels is None:
        labels = torch.zeros(student_hidden.shape[:-1], dtype=torch.long, device=student_hidden.device)
    hs, _, keep = _next_token_rows(student_hidden, labels)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep].detach()
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hs.shape[0], chunk_tokens):
        total = total + checkpoint(_kl_sum, hs[i:i + chunk_tokens], ht[i:i + chunk_tokens], student_head,
                                   teacher_head, temperature, use_reentrant=False)
    return total / max(int(hs.shape[0]), 1) * temperature**2
