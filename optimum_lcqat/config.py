"""`LCQATConfig`: the quantization config of method ``lcqat`` (a transformers QuantizationConfigMixin)."""

from __future__ import annotations

import logging
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

logger = logging.getLogger(__name__)

QUANT_METHOD = "lcqat"
FORMAT_VERSION = 2  # version of the packed checkpoint layout this package writes (it reads 1 and 2)
# 2: each LC layer records its resolved rotation plans (<name>.rotation); 1: plans recomputed from the config

_ALLOWED_BITS = (2,)
_ALLOWED_VECTOR_DIMS = (1, 2, 4)
_ALLOWED_CODEBOOKS = ("affine", "scalar")
_ALLOWED_INITS = ("auto", "data_free", "ptq")
_ALLOWED_DENSE_DTYPES = ("bfloat16", "float16")


# The PTQ's less common knobs (LCQATConfig(ptq_options={...})):
#   e2e_memory_savers (default True): the end-to-end stage computes the next-token loss a chunk of
#     positions at a time and recomputes each decoder block's activations in the backward
#     (optimum_lcqat.init.e2e); False keeps the model's own loss and every block's activations.
#   memory_check (default True): from_pretrained predicts the in-memory PTQ's peak memory before
#     the weights load (optimum_lcqat.memory_plan) and refuses, with the numbers, when it exceeds
#     the memory available; False runs it anyway.
PTQ_OPTIONS = ("e2e_memory_savers", "memory_check")


def _check(cond: bool, field: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"LCQATConfig: invalid {field}={value!r}; allowed: {allowed}.")


class LCQATConfig(QuantizationConfigMixin):
    """Configuration of LC-QAT 2-bit linear-constrained vector quantization.

    Args:
        bits: bits per weight of the codes; only 2 is implemented.
        vector_dim: ``d``, weights per code vector (4: 256 codewords, one byte per vector).
        codebook: ``"affine"`` (learned ``A``, ``beta`` per layer; default) or ``"scalar"``
            (``A = a I``, ``beta = b 1`` frozen at the unit-variance 4-level grid).
        hadamard_block_size: block of the block-diagonal Hadamard rotations (a power of two,
            default 128) or ``"full"`` for full-dimension rotations. A dimension the block does
            not divide uses the largest power-of-two block that does (logged once per size);
            ``"full"`` falls back the same way where no construction is known.
        modules_to_not_convert: module names (or name suffixes) kept in full precision. ``None``
            keeps transformers' default skips (output embedding, tied weights); embeddings
            are never converted.
        dataset: calibration data for the Hessian-aware PTQ initialisation: a list of texts,
            a path to a local ``.txt``/``.jsonl`` file, or a ``datasets`` name. ``None`` selects
            the data-free initialisation.
        tokenizer: tokenizer (or its name/path) used to tokenize ``dataset``.
        num_samples / model_seqlen: number and length (tokens) of calibration samples.
        init: ``"auto"`` (PTQ when ``dataset`` is given, else data-free), ``"data_free"`` or
            ``"ptq"``.
        init_iters: alternations of codeword assignment and least-squares fit of ``(A, beta)``.
        seed: seed of the random sign vectors and of the calibration sampling.
        ptq_damp: PTQ Hessian damping, added to the diagonal after normalising by its mean.
        ptq_refine_passes: PTQ coordinate-descent re-assignment passes after each (A, beta) fit.
        ptq_finetune_steps: PTQ block-wise fine-tuning Adam steps per decoder block (0: none).
        ptq_finetune_lr: PTQ fine-tuning learning rate, relative to each tensor's RMS.
        ptq_batch_size: calibration samples per forward batch during PTQ.
        ptq_e2e_steps: PTQ end-to-end fine-tuning Adam steps after the last block (default 16;
            0: none): codes fixed, the model's ``s_u``, ``s_v``, ``A``, ``beta`` and norms tuned
            together on the next-token loss of the calibration samples
            (:mod:`optimum_lcqat.init.e2e`). Measured on SmolLM2-135M (benchmarks/results/
            ablation.md): held-out perplexity 2.57x -> 1.93x fp32, PTQ 592 s -> 690 s on 2 cores.
            Not in streaming PTQ (the whole model is never in memory there).
        ptq_e2e_lr: its learning rate, relative to each tensor's RMS (default 5e-3).
        ptq_e2e_batch_size: calibration samples per end-to-end step.
        ptq_options: less common PTQ knobs, a dict with keys among :data:`PTQ_OPTIONS`
            (``{"e2e_memory_savers": False}``: the end-to-end stage without its memory savers).
        dense_dtype: storage dtype, in the saved checkpoint, of the float tensors that are not
            LC layers (embeddings, norms, a dense lm_head, modules kept in full precision):
            ``"bfloat16"``, ``"float16"`` or ``None`` (as they are in the model). Loading casts
            them to the dtype the model is loaded in.
        lm_head_int8: save the output projection as int8 with one fp32 scale per row
            (``lm_head.weight_int8``, ``lm_head.scale``); loading builds an
            :class:`~optimum_lcqat.nn.Int8Linear` head. A tied input embedding is kept for the
            lookup (in ``dense_dtype``); only the head is int8.
        format_version: packed-format version; set by the package, checked on load.
    """

    def __init__(
        self,
        bits: int = 2,
        vector_dim: int = 4,
        codebook: str = "affine",
        hadamard_block_size: int | str = 128,
        modules_to_not_convert: list[str] | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        model_seqlen: int = 512,
        init: str = "auto",
        init_iters: int = 4,
        seed: int = 0,
        ptq_damp: float = 0.01,
        ptq_refine_passes: int = 1,
        ptq_finetune_steps: int = 24,
        ptq_finetune_lr: float = 1e-3,
        ptq_batch_size: int = 8,
        ptq_e2e_steps: int = 16,
        ptq_e2e_lr: float = 5e-3,
        ptq_e2e_batch_size: int = 4,
        dense_dtype: str | None = None,
        lm_head_int8: bool = False,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        self.bits = bits
        self.vector_dim = vector_dim
        self.codebook = codebook
        self.hadamard_block_size = hadamard_block_size
        self.modules_to_not_convert = modules_to_not_convert
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.model_seqlen = model_seqlen
        self.init = init
        self.init_iters = init_iters
        self.seed = seed
        self.ptq_damp = ptq_damp
        self.ptq_refine_passes = ptq_refine_passes
        self.ptq_finetune_steps = ptq_finetune_steps
        self.ptq_finetune_lr = ptq_finetune_lr
        self.ptq_batch_size = ptq_batch_size
        self.ptq_e2e_steps = ptq_e2e_steps
        self.ptq_e2e_lr = ptq_e2e_lr
        self.ptq_e2e_batch_size = ptq_e2e_batch_size
        self.dense_dtype = dense_dtype
        self.lm_head_int8 = lm_head_int8
        self.format_version = format_version
        # PTQ knobs (used by optimum_lcqat.init.ptq); kept in kwargs-free form for old checkpoints.
        self.ptq_options = dict(kwargs.pop("ptq_options", None) or {})
        if kwargs:
            logger.warning(
                "LCQATConfig: ignoring unknown keys %s (written by a newer optimum-lcqat?).",
                sorted(kwargs),
            )
        self.post_init()

    @classmethod
    def fast(cls, **kwargs) -> "LCQATConfig":
        """The fast PTQ preset: the defaults without the block fine-tune (``ptq_finetune_steps=0``;
        the end-to-end stage tunes the same parameters). SmolLM2-135M on 2 cores
        (benchmarks/results/ablation.md, rows ``fast`` and ``default``): 562 s and 2.04x fp32
        held-out perplexity, against 690 s and 1.93x for ``LCQATConfig()``. ``kwargs`` override."""
        return cls(**{"ptq_finetune_steps": 0, **kwargs})

    @classmethod
    def thorough(cls, **kwargs) -> "LCQATConfig":
        """The thorough PTQ preset: the defaults with 64 end-to-end steps instead of 16
        (``ptq_e2e_steps=64``). SmolLM2-135M on 2 cores of an Intel Xeon VM
        (benchmarks/results/ablation.md, rows ``e2e64`` and ``default``): 1126 s and 1.82x fp32
        held-out perplexity (licence texts 2.63x), against 682 s and 1.95x (2.73x) for
        ``LCQATConfig()``. ``kwargs`` override."""
        return cls(**{"ptq_e2e_steps": 64, **kwargs})

    def post_init(self) -> None:
        _check(self.bits in _ALLOWED_BITS, "bits", self.bits, "2")
        _check(
            isinstance(self.vector_dim, int) and self.vector_dim in _ALLOWED_VECTOR_DIMS,
            "vector_dim", self.vector_dim, "1, 2 or 4",
        )
        _check(self.codebook in _ALLOWED_CODEBOOKS, "codebook", self.codebook, "'affine' or 'scalar'")
        hb = self.hadamard_block_size
        _check(
            hb == "full" or (isinstance(hb, int) and not isinstance(hb, bool) and hb >= 1 and hb & (hb - 1) == 0),
            "hadamard_block_size", hb, "a power of two (e.g. 64, 128, 256) or 'full'",
        )
        mnc = self.modules_to_not_convert
        _check(
            mnc is None or (isinstance(mnc, (list, tuple)) and all(isinstance(m, str) for m in mnc)),
            "modules_to_not_convert", mnc, "None or a list of module names",
        )
        if mnc is not None:
            self.modules_to_not_convert = list(mnc)
        ds = self.dataset
        _check(
            ds is None or isinstance(ds, str) or (isinstance(ds, (list, tuple)) and all(isinstance(t, str) for t in ds)),
            "dataset", type(ds).__name__ if ds is not None else ds,
            "None, a list of texts, a local .txt/.jsonl path or a datasets name",
        )
        for name in ("num_samples", "model_seqlen", "init_iters"):
            v = getattr(self, name)
            minimum = 0 if name == "init_iters" else 1
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, name, v, f"an integer >= {minimum}")
        _check(self.init in _ALLOWED_INITS, "init", self.init, "'auto', 'data_free' or 'ptq'")
        if self.init == "ptq" and self.dataset is None:
            raise ValueError("LCQATConfig: init='ptq' needs calibration data; pass dataset=[texts] (and tokenizer).")
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", self.seed, "an integer")
        _check(
            isinstance(self.format_version, int) and 1 <= self.format_version <= FORMAT_VERSION,
            "format_version", self.format_version,
            f"1..{FORMAT_VERSION} (a newer checkpoint needs a newer optimum-lcqat: pip install -U optimum-lcqat)",
        )
        for name, minimum in (("ptq_refine_passes", 0), ("ptq_finetune_steps", 0), ("ptq_batch_size", 1),
                              ("ptq_e2e_steps", 0), ("ptq_e2e_batch_size", 1)):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, name, v, f"an integer >= {minimum}")
        for name in ("ptq_damp", "ptq_finetune_lr", "ptq_e2e_lr"):
            v = getattr(self, name)
            _check(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
                name, v, "a positive finite number",
            )
        _check(isinstance(self.ptq_options, dict) and set(self.ptq_options) <= set(PTQ_OPTIONS), "ptq_options",
               self.ptq_options, f"a dict with keys among {sorted(PTQ_OPTIONS)}")
        for key in PTQ_OPTIONS:
            _check(isinstance(self.ptq_options.get(key, True), bool), f"ptq_options[{key!r}]",
                   self.ptq_options.get(key), "True or False")
        dd = self.dense_dtype
        if dd is not None and not isinstance(dd, str) and str(dd).startswith("torch."):
            dd = self.dense_dtype = str(dd)[len("torch."):]  # torch.bfloat16 -> "bfloat16" (JSON-safe)
        _check(dd is None or dd in _ALLOWED_DENSE_DTYPES, "dense_dtype", dd,
               "None (keep the model's dtype), 'bfloat16' or 'float16'")
        _check(isinstance(self.lm_head_int8, bool), "lm_head_int8", self.lm_head_int8, "True or False")

    @property
    def uses_calibration(self) -> bool:
        return self.init == "ptq" or (self.init == "auto" and self.dataset is not None)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        # Calibration inputs are not part of the checkpoint: a list of texts could be huge and a
        # tokenizer object is not JSON. Names/paths are kept as a record of what was used.
        if not isinstance(out.get("dataset"), (str, type(None))):
            out["dataset"] = None
        if not isinstance(out.get("tokenizer"), (str, type(None))):
            out["tokenizer"] = getattr(out["tokenizer"], "name_or_path", None) or None
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

