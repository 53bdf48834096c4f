"""Tiny model builders used across the tests."""

from __future__ import annotations

import torch

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3")


def make_tiny_model(family: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    if family == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif family == "mistral":
        cfg, cls = tf.MistralConfig(**common, sliding_window=64), tf.MistralForCausalLM
    elif family == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, head_dim=32), tf.Qwen3ForCausalLM
    elif family == "gemma":
        cfg, cls = tf.GemmaConfig(**common, head_dim=24), tf.GemmaForCausalLM
    elif family == "gemma3":
        cfg, cls = tf.Gemma3TextConfig(**common, head_dim=24, sliding_window=64), tf.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg).to(torch.float32).eval()
    # Random init of tiny models leaves tiny weights; scale linears up a little so the
    # quantization error is visible in the logits (tests compare, they do not need quality).
    return model


def lc_names(model) -> list[str]:
    from optimum_lcqat import LCLinear

    return [n for n, m in model.named_modules() if isinstance(m, LCLinear)]
