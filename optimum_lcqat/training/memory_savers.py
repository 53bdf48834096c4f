"""What LCQATCallback changes in a model for the length of a training run, to save memory: the chunked
next-token loss (optimum_lcqat.nn.lm_loss) in place of the model's own, and activation checkpointing.

The Trainer calls ``model(**inputs)`` and reads ``.loss``, and under DDP or FSDP that call must go
through the wrapper's forward. So the model's ``forward`` is replaced (an instance attribute, for the
training run only) by one that, for a training call with ``labels``, runs the base model, then the
chunked loss over the head, and returns ``loss``, no logits, and the last hidden state as the only
entry of ``hidden_states`` (what distillation needs). Other calls (no labels, eval mode, logits or
attentions asked for) go to the model's own forward unchanged.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..nn.block_checkpointing import keep_costly_outputs_context, widest_linear_input
from ..nn.lm_loss import causal_lm_hidden_states, chunked_loss_unsupported, chunked_next_token_loss
from ..sdpa_registry import keep_attention_outputs

logger = logging.getLogger(__name__)

__all__ = ["install_chunked_loss", "enable_activation_checkpointing"]


def install_chunked_loss(model: nn.Module, chunk_tokens: int):
    """Replace ``model.forward`` for training calls with labels; returns the function that puts the
    model's own forward back, or None (logged, with the reason) where the model cannot take it."""
    reason = chunked_loss_unsupported(model)
    if reason is not None:
        logger.warning("lcqat: the chunked next-token loss is off for this run: %s. The model's own loss runs "
                       "(the whole batch's [tokens x vocab] fp32 logits in memory).", reason)
        return None
    own = model.forward

    def forward(*args, **kwargs):
        if (args or kwargs.get("labels") is None or not model.training or kwargs.get("return_dict") is False
                or kwargs.get("output_hidden_states") or kwargs.get("output_attentions")):
            return own(*args, **kwargs)
        labels = kwargs.pop("labels")
        num_items = kwargs.pop("num_items_in_batch", None)
        hidden = causal_lm_hidden_states(model, **kwargs)
        loss = chunked_next_token_loss(hidden, model.get_output_embeddings(), labels, num_items, chunk_tokens, owner=model)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=(hidden,))

    model.forward = forward

    def uninstall():
        if model.__dict__.get("forward") is forward:
            del model.__dict__["forward"]

    return uninstall


def enable_activation_checkpointing(model: nn.Module, keep_bytes: int = 0) -> bool:
    """transformers' own per-block activation checkpointing (non-reentrant: the LC layers' parameters
    get their gradients whatever requires grad at the block's input), keeping each block's
    attention output and down product, and the other LC products of the first blocks up to ``keep_bytes``
    (nn.block_checkpointing); True when this call turned it on, False when it was on already or the
    model cannot (said once)."""
    if getattr(model, "is_activation_checkpointing", False):
        return False
    if not getattr(model, "supports_gradient_checkpointing", False) or not hasattr(model, "activation_checkpointing_enable"):
        logger.warning("lcqat: %s does not support activation checkpointing; it trains keeping every block's "
                       "activations (more memory).", type(model).__name__)
        return False
    # selective: each block keeps its attention output and widest LC product, the first blocks all
    # their LC products (nn.block_checkpointing)
    keep_attention_outputs()
    model.activation_checkpointing_enable(
        {"use_reentrant": False, "context_fn": keep_costly_outputs_context(widest_linear_input(model), keep_bytes)})
    return True
