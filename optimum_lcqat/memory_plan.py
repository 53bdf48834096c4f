"""Peak memory of each quantization path, predicted before the weights load, and the memory free.

Why: the in-memory PTQ holds the whole float model, its calibration activations and then the
end-to-end stage's training step; the streaming PTQ holds one decoder block. A user's OOM killer
counts the process's resident memory (RSS), so the CLI and the quantizer compare the prediction
of the path they would take with what the machine has *before* loading, and stream or refuse
(with these numbers) instead of being killed half way.

The prediction is a sum of named parts, each a count of the tensors that path keeps alive at its
peak times its bytes, plus what the process already holds (``base``: imports, tokenizer). Where
freed memory is kept for reuse (training steps, see ``_heap.py``), measured constants for the way
it is kept cover it. The constants were fitted on SmolLM2-135M and random Llama models (benchmarks/memory.py
prints the prediction beside each measured peak; tests/test_memory_plan.py checks it), and err
on the high side.
"""

from __future__ import annotations

import dataclasses
import os
import re

GiB = 2**30

__all__ = ["ModelShape", "PeakEstimate", "MemoryPlanError", "in_memory_ptq", "streaming_ptq", "qat",
           "memory_budget", "check_fits", "current_rss", "parse_bytes", "LIMIT_ENV"]

# A user's budget in place of the machine's free memory (e.g. "6GiB", "6G", "6442450944"): for a
# process sharing the machine, and for the tests.
LIMIT_ENV = "OPTIMUM_LCQAT_MEMORY_LIMIT"


class MemoryPlanError(RuntimeError):
    """The path asked for does not fit the memory available (the message has the numbers and the fix)."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the memory of a causal LM's quantization depends on, read from its (meta) modules."""

    params: int  # every parameter
    linear_weights: int  # weights of the nn.Linear layers that may become LC layers (not the head)
    largest_linear: int  # m * n of the largest of them
    widest: int  # the widest linear dimension (MLP intermediate size)
    hidden: int
    layers: int
    vocab: int
    experts: int = 0  # MoE: experts per block (their projections count in linear_weights)
    expert_width: int = 0  # MoE: an expert's intermediate size
    attention_width: int = 0  # heads x head_dim, the attention output's width (0: the hidden size)

    @classmethod
    def of(cls, model) -> "ModelShape":
        """From a model, on the meta device or loaded (sizes only; nothing is read)."""
        from torch import nn

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        from .nn.expert_linears import fused_experts_layout_problem

        lin = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
        # fused MoE experts (3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I]): E linears each
        fused = [m for m in model.modules() if fused_experts_layout_problem(m) != ""]
        expert_mats = [(m.gate_up_proj.shape, m.down_proj.shape) for m in fused]
        cfg = getattr(model, "config", None)
        hidden = getattr(cfg, "hidden_size", None) or (emb.embedding_dim if emb is not None else 0)
        vocab = getattr(cfg, "vocab_size", None) or (emb.num_embeddings if emb is not None else 0)
        layers = getattr(cfg, "num_hidden_layers", None) or 1
        heads = getattr(cfg, "num_attention_heads", None)
        head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0)
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            linear_weights=sum(m.weight.numel() for m in lin) + sum(g.numel() + d.numel() for g, d in expert_mats),
            largest_linear=max([m.weight.numel() for m in lin] + [g[1] * g[2] for g, _ in expert_mats], default=0),
            widest=max([max(m.in_features, m.out_features) for m in lin] + [g[1] for g, _ in expert_mats], default=hidden),
            hidden=hidden, layers=layers, vocab=vocab,
            experts=max((g[0] for g, _ in expert_mats), default=0),
            expert_width=max((d[2] for _, d in expert_mats), default=0),
            attention_width=(heads * head_dim) if heads else 0,
        )

    @classmethod
    def from_pretrained_config(cls, config) -> "ModelShape":
        """From a transformers config (a ``PretrainedConfig`` or a model folder): the model is built
        on the meta device, so this costs no memory and reads no weight."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        if isinstance(config, (str, os.PathLike)):
            config = AutoConfig.from_pretrained(config)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # (from_config leaves a tied head untied under init_empty_weights)
        return cls.of(model)


@dataclasses.dataclass
class PeakEstimate:
    path: str  # "in-memory PTQ", "streaming PTQ", "data-free", "QAT"
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        inner = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v >= GiB / 200)
        return f"{self.path}: predicted peak {self.total / GiB:.2f} GiB ({inner})"


# ------------------------------------------------------------------------------------------ parts
# Fitted constants (SmolLM2-135M and a random 4-layer Llama, 2-core AMD EPYC; see the module
# docstring). A training step (end-to-end PTQ stage, QAT) runs with freed memory kept for reuse
# (_heap.py), and how it is kept sets how far the peak exceeds the live tensors: per way, a factor
# on the step's live activations and bytes per LC weight for the LC layers' weight-sized temporaries.
#   cache: the extension's caching allocator, pages reused across sizes: about the live tensors;
#   glibc: glibc's retained heap, fragmented by those temporaries (about twice the live peak).
# Without either (OPTIMUM_LCQAT_RETAIN_HEAP=0) the peak is the live one: the cache's constants.
_BLOCK_ACT_UNITS = 12  # values per token a recomputed decoder block keeps, per (hidden + widest)
_STEP_CONSTANTS = {  # way: (factor on live activations, bytes per LC weight: end-to-end stage, QAT)
    "cache": (1.0, 2, 2),
    "glibc": (1.7, 34, 18),  # the end-to-end stage's reference forward keeps more than QAT's Function
}
# fp32 copies of a loss chunk's logits alive at once: under a frozen head (QAT's and the end-to-end
# stage's default) nn/lm_loss.py computes the loss and its gradient in the logits' own buffer (one,
# counted twice: the head's 16-bit output and the cast gradient beside it in bf16 models; a tiny
# model's PTQ measured above one); a trained head goes through autograd (four)
_LOGIT_COPIES = 2
_CREEP_BYTES_PER_LC_WEIGHT = 3  # the block-wise PTQ's heap grows by ~3/4 of each block's fp32 weights


def _loss_chunk(shape: ModelShape, tokens: int) -> int:
    from .nn.lm_loss import DEFAULT_CHUNK_TOKENS

    return _LOGIT_COPIES * min(tokens, DEFAULT_CHUNK_TOKENS) * shape.vocab * 4


def _default_keep_bytes() -> int:
    """The budget of kept products of LCQATCallback's default and of the end-to-end stage (init/e2e.py)."""
    from .nn.block_checkpointing import DEFAULT_CHECKPOINT_KEEP_MIB

    return DEFAULT_CHECKPOINT_KEEP_MIB * 2**20


def _training_step(shape: ModelShape, tokens: int, stage: str, keep_bytes: int = 0) -> int:
    """Peak bytes of one training step (``stage``: ``"e2e"`` or ``"qat"``) with the chunked loss and
    per-block checkpointing, freed memory kept (see _STEP_CONSTANTS): the blocks' inputs and kept
    products (``keep_bytes``: the budget for the narrower layers' ones), one block recomputed and one
    loss chunk (times the way's factor), and the LC layers' weight-sized temporaries."""
    from ._heap import planned_mode

    factor, e2e_bytes, qat_bytes = _STEP_CONSTANTS["glibc" if planned_mode() == "glibc" else "cache"]
    # each block's input, and what selective checkpointing keeps (nn.block_checkpointing): the
    # attention output, the down product (hidden wide), and up to keep_bytes of the other LC layers'
    # products (their outputs: about linear_weights / hidden values a token over the model)
    attention = shape.attention_width or shape.hidden
    inputs = shape.layers * tokens * (2 * shape.hidden + attention) * 4
    kept = min(int(keep_bytes), tokens * 4 * shape.linear_weights // max(shape.hidden, 1))
    block = _BLOCK_ACT_UNITS * tokens * (shape.hidden + shape.widest) * 4
    live = inputs + kept + block + _loss_chunk(shape, tokens)
    return int(factor * live) + (e2e_bytes if stage == "e2e" else qat_bytes) * shape.linear_weights


def _lc_bytes(shape: ModelShape) -> int:
    """An LC model's LC layers: 2-bit codes plus per-row/column scales (about 0.3 byte a weight)."""
    return int(0.3 * shape.linear_weights)


def in_memory_ptq(shape: ModelShape, cfg, *, dtype_bytes: int = 4, base: int | None = None) -> PeakEstimate:
    """``from_pretrained(..., quantization_config=LCQATConfig(dataset=...))``: the float model, the
    block-wise PTQ's calibration activations (inputs and outputs of the current block, kept in the
    compute dtype), then the end-to-end stage's training steps over the whole model."""
    base = current_rss() if base is None else base
    weights = shape.params * dtype_bytes
    acts = 2 * cfg.num_samples * cfg.model_seqlen * shape.hidden * dtype_bytes
    blockwise = acts + _block_compute(shape, cfg) + _CREEP_BYTES_PER_LC_WEIGHT * shape.linear_weights
    e2e = 0
    if cfg.ptq_e2e_steps > 0:
        tokens = cfg.ptq_e2e_batch_size * cfg.model_seqlen
        # the stage runs in float32 (dense parts cast up) with the heap retained
        dense32 = (shape.params - shape.linear_weights) * max(0, 4 - dtype_bytes)
        e2e = _training_step(shape, tokens, "e2e", _default_keep_bytes()) + dense32
    parts = {"process": base, "float weights": weights}
    if e2e > blockwise:
        parts["end-to-end stage"] = e2e
    else:
        parts["block-wise PTQ"] = blockwise
    return PeakEstimate("in-memory PTQ", parts)


def _block_compute(shape: ModelShape, cfg) -> int:
    """One decoder block's PTQ work: its forward on a batch of calibration samples, the Hessians of
    its inputs (float64) and the per-weight temporaries of the layers quantized at once: the largest
    alone, or as many small ones as quant_api runs together (PTQ_WORKERS, one per torch thread)."""
    import torch

    from .quant_api import PARALLEL_PTQ_MAX_WEIGHTS, PTQ_WORKERS

    block_fwd = cfg.ptq_batch_size * cfg.model_seqlen * (4 * shape.hidden + 3 * shape.widest) * 4
    together = min(PTQ_WORKERS, torch.get_num_threads()) * min(shape.largest_linear, PARALLEL_PTQ_MAX_WEIGHTS)
    hessians = 3 * shape.hidden**2 * 8 + shape.widest**2 * 8 + 4 * max(shape.largest_linear, together) * 8
    # MoE: each expert's two Hessians (its input, and its intermediate), float64, as many experts at
    # once as a Hessian pass takes (quant_api.hessian_passes)
    from .quant_api import EXPERT_HESSIAN_BYTES_PER_PASS

    per_expert = (shape.hidden**2 + shape.expert_width**2) * 8
    hessians += min(shape.experts * per_expert, EXPERT_HESSIAN_BYTES_PER_PASS + per_expert)
    return block_fwd + hessians


def streaming_ptq(shape: ModelShape, cfg, *, dtype_bytes: int = 4, act_bytes: int = 2, base: int | None = None) -> PeakEstimate:
    """``optimum-lcqat quantize`` streaming: one block's float weights (and its LC layers), the
    calibration activations (two file-backed buffers, resident as they are touched), the block's
    forward, Hessians; before and after the blocks, the embedding (and an untied head) alone; then,
    with ``ptq_e2e_steps``, the end-to-end stage on the 2-bit model (its dense parts in float32)."""
    base = current_rss() if base is None else base
    block = shape.linear_weights // max(1, shape.layers) * dtype_bytes
    acts = 2 * cfg.num_samples * cfg.model_seqlen * shape.hidden * act_bytes
    embedding = 3 * shape.vocab * shape.hidden * dtype_bytes  # read, cast, then packed (copies)
    # (the block's compute and the embedding's packing do not coexist; summed, the estimate errs high)
    blockwise = {"one block": 2 * block, "calibration activations": acts,
                 "block compute": _block_compute(shape, cfg), "embedding": embedding}
    if cfg.ptq_e2e_steps > 0:
        tokens = cfg.ptq_e2e_batch_size * cfg.model_seqlen
        lc_model = _lc_bytes(shape) + (shape.params - shape.linear_weights) * 4
        e2e = lc_model + _training_step(shape, tokens, "e2e", _default_keep_bytes())
        if e2e > sum(blockwise.values()):
            return PeakEstimate("streaming PTQ", {"process": base, "end-to-end stage on the 2-bit model": e2e})
    return PeakEstimate("streaming PTQ", {"process": base, **blockwise})


# bytes of optimizer state a trained weight, by TrainingArguments.optim (Adam's two states: fp32, or
# torchao's 8-bit / 4-bit with a scale a block)
OPTIMIZER_STATE_BYTES = {"adamw_torch_8bit": 2, "adamw_torch_4bit": 1, "adamw_8bit": 2, "adamw_bnb_8bit": 2}


def qat(shape: ModelShape, tokens_per_step: int, *, optim: str = "adamw_torch", base: int | None = None,
        checkpoint_keep_mib: float | None = None) -> PeakEstimate:
    """QAT of the LC model (LCQATCallback defaults: chunked loss, activation checkpointing keeping
    ``checkpoint_keep_mib`` of products (None: the callback's default), frozen embeddings): the fp32
    latent and its gradient (8 bytes an LC weight), the optimizer's states (``optim``: 8 bytes for
    fp32 Adam, see OPTIMIZER_STATE_BYTES), the frozen rest in fp32 (the norms, which train, are too
    few to count), and one step's activations."""
    base = current_rss() if base is None else base
    keep = _default_keep_bytes() if checkpoint_keep_mib is None else int(checkpoint_keep_mib * 2**20)
    state = (8 + OPTIMIZER_STATE_BYTES.get(optim, 8)) * shape.linear_weights + 4 * (shape.params - shape.linear_weights)
    return PeakEstimate("QAT", {"process": base, "weights and optimizer state": state,
                                "training step": _training_step(shape, tokens_per_step, "qat", keep)})


def data_free(shape: ModelShape, *, dtype_bytes: int = 4, base: int | None = None) -> PeakEstimate:
    """Data-free quantization in memory: the float model, and the LC layers built beside it."""
    base = current_rss() if base is None else base
    return PeakEstimate("data-free", {"process": base, "float weights": shape.params * dtype_bytes,
                                      "LC layers": _lc_bytes(shape) + 4 * shape.largest_linear * 8})


# --------------------------------------------------------------------------------- the machine
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"6GiB"``, ``"6G"`` (GiB), ``"6GB"`` (10^9), ``"512MiB"``, ``"123456"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 6GiB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def memory_budget() -> tuple[int, str]:
    """(the resident memory this process may reach, where the figure comes from):
    OPTIMUM_LCQAT_MEMORY_LIMIT when set, else what the process holds now plus the smaller of the
    kernel's MemAvailable and the cgroup's limit less its usage (containers)."""
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        try:
            return parse_bytes(limit), f"{LIMIT_ENV}={limit}"
        except ValueError as exc:
            raise ValueError(f"{LIMIT_ENV}: {exc}") from None
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "free memory (MemAvailable)"))
    except OSError:
        pass
    for lim_path, use_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                               ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(lim_path), _read_int(use_path)
        if lim is not None and use is not None and lim < 2**60:
            found.append((max(0, lim - use), f"the cgroup's limit less its usage ({lim_path})"))
    if not found:
        return 2**62, "unknown (no /proc/meminfo, no cgroup limit)"
    free, source = min(found)
    return current_rss() + free, f"this process now + {source}"


def check_fits(estimate: PeakEstimate, fix: str, budget: tuple[int, str] | None = None) -> None:
    """Raise :class:`MemoryPlanError` with the numbers and ``fix`` when ``estimate`` exceeds the
    budget (``(bytes, where from)``; default :func:`memory_budget`)."""
    limit, source = memory_budget() if budget is None else budget
    if estimate.total > limit:
        raise MemoryPlanError(
            f"{estimate.describe()}, above the {limit / GiB:.2f} GiB available ({source}): the operating "
            f"system would kill the process. {fix}")


def current_rss() -> int:
    """This process's resident memory now (bytes; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
