"""Tiny model builders and the child-process launcher used across the tests."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
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


def run_process_group(cmd, timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """``cmd`` to completion with stdout/stderr captured (text), in a session of its own: on timeout
    the whole process group is killed and the test fails with the output's tail. Launchers (accelerate,
    vLLM's engine, lm-eval) start grandchildren that subprocess.run's timeout would leave running:
    once (2026-12-05) a two-process training run sat past its timeout with one rank alive, and the
    orphan ran on beside the tests after it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:8]))} ... still running after {timeout:.0f} s (killed with its "
                    f"process group); its last stderr:\n{err[-3000:]}\nlast stdout:\n{out[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def saved_bytes(fn, exclude=()):
    """``(bytes, fn())``: the bytes of the unique storages autograd saves for backward while ``fn``
    runs, leaving out those of ``exclude`` (parameters: alive anyway). Also used by
    benchmarks/lc_training_fn.py."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
