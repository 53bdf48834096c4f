"""`LCQATCallback`: quantization-aware training of an LC-QAT model with the plain HF Trainer.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LCQATCallback()])
    trainer.train()
    model.save_pretrained(out)   # packed 2-bit; loads like any lcqat checkpoint

What it does, event by event:

* ``on_init_end`` (end of ``Trainer.__init__``, before the optimizer exists): every LC layer
  gets its latent codes (:meth:`LCLinear.enable_training`, at the centres of the current
  codes' bins) and ``requires_grad`` is set on every parameter from its category
  (:mod:`.params`), deterministically, so the optimizer (and a resumed optimizer) sees the same
  parameters in the same order.
* ``on_train_begin``: when the Trainer resumes (``global_step > 0``), the latents and the
  full-precision LC parameters are restored from ``lcqat_training_state.safetensors`` in the
  checkpoint folder; the Trainer has already loaded the packed weights (a load_state_dict
  pre-hook re-centres the latents on the loaded codes, so that even without the file the
  model is consistent; with it, the resumed run is exact). Only a file saved at the resumed
  step is used (never another checkpoint's); without one, ``resumed_exactly`` is False and a
  warning says the resume is not exact.
* ``on_pre_optimizer_step``: every trainable gradient must be finite; otherwise
  :class:`NonFiniteTrainingError` stops the run before the optimizer touches the weights,
  so the last checkpoint written stays the last good one. Under fp16 loss scaling a
  non-finite gradient is the GradScaler's overflow (it skips the step and lowers the scale):
  the run stops only when ``max_skipped_steps`` steps in a row are skipped.
* ``on_step_end``: the codes are re-derived from the latents (``sync_codes``); the number of
  codes that flipped this step is recorded; the token budget is checked.
* ``on_log``: adds ``lcqat/flip_share`` (codes flipped per step, averaged since the last log,
  as a share of all codes), ``lcqat/changed_share`` (share of codes that differ from the start
  of this ``train()`` call), ``lcqat/bits_per_weight`` (of the LC layers) and
  ``lcqat/tokens`` to the logs and to ``state.log_history``.
* ``on_save``: the Trainer's checkpoint is already a packed lcqat checkpoint (``save_pretrained``
  goes through the quantizer, which drops latents after syncing codes); the callback adds the
  training-state file next to it (written by process 0; under FSDP2 every process joins the
  gather of the sharded latents, see examples/README.md).
* ``on_train_end``: the latents are folded back into the packed codes and dropped, and the LC
  parameters are rounded to their 16-bit storage values: the in-memory model is then exactly
  what ``save_pretrained`` writes and what ``from_pretrained`` reads back.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from accelerate.utils import parse_flag_from_env
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .._heap import release_freed_memory, retain_freed_memory
from ..convert import lc_layers
from ..nn.block_checkpointing import DEFAULT_CHECKPOINT_KEEP_MIB
from ..nn.expert_linears import ExpertLinears
from ..nn.lm_loss import DEFAULT_CHUNK_TOKENS
from ..tensor.packing import latent_from_codes, unpack_codes
from .memory_savers import enable_activation_checkpointing, install_chunked_loss
from .params import resolve_decay, resolve_trainable, select_trainable
from .state import TRAINING_STATE_NAME, is_sharded, load_training_state, save_training_state, training_state_step

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """The loss or a gradient became NaN/inf: the run stops before the weights are updated."""


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _latent_from_loaded_codes(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    # Trainer resume loads a packed checkpoint with model.load_state_dict: it has codes but no
    # latent. Put the latent at the centres of the loaded codes' bins (instead of leaving a stale
    # latent that disagrees with the codes); the training-state file then restores it exactly.
    if module.latent is not None and prefix + "codes" in state_dict and prefix + "latent" not in state_dict:
        q = unpack_codes(state_dict[prefix + "codes"]).to(module.latent.dtype)
        state_dict[prefix + "latent"] = latent_from_codes(q, module.alpha)


FSDP1_UNSUPPORTED = (
    "LC-QAT training supports FSDP2 (fully_shard), not FSDP1: FSDP1 flattens the latent codes into "
    "one flat parameter per wrapped module, while the callback re-derives the packed codes from each "
    "layer's latent after every step. Use FSDP version 2: TrainingArguments(fsdp='full_shard', "
    "fsdp_config={'version': 2}) or `accelerate launch --use_fsdp --fsdp_version 2`."
)
FSDP2_NEEDS_LCQAT_TRAINER = (
    "LC-QAT training under FSDP2 needs LCQATTrainer (optimum_lcqat.training.LCQATTrainer) rather than "
    "Trainer(callbacks=[LCQATCallback()]): under FSDP the Trainer gathers the full state dict on every "
    "process and then saves on process 0 alone, and only LCQATTrainer hands that gathered state dict to "
    "the lcqat quantizer; with a plain Trainer process 0 would wait forever for the others to gather "
    "the sharded weights again."
)


ZERO3_UNSUPPORTED = (
    "LC-QAT training under DeepSpeed ZeRO-3 is not supported: ZeRO-3 partitions every parameter into "
    "flat shards outside the forward pass, while the callback re-derives each layer's packed codes from "
    "its whole latent after every step. Use FSDP2 with LCQATTrainer (the latents shard as DTensors), DDP, "
    "or DeepSpeed ZeRO-1/2 (optimizer and gradient sharding keep whole parameters on every process)."
)


def _deepspeed_zero3() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def fsdp_version(args) -> int | None:
    """The FSDP version the Trainer will run (None without FSDP): ``TrainingArguments.fsdp`` with
    ``fsdp_config['version']`` (transformers' default 2), or accelerate's launcher environment
    (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, accelerate's default 1)."""
    if getattr(args, "fsdp", None):
        return int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def grad_scaler(optimizer):
    """The GradScaler doing fp16 loss scaling for ``optimizer`` (accelerate's AcceleratedOptimizer
    holds it), or None: no loss scaling, so a non-finite gradient is a divergence."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def last_checkpoint(output_dir) -> str | None:
    """The newest ``checkpoint-*`` folder in ``output_dir``, or None."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    return get_last_checkpoint(output_dir)


# Every LC category learns at 3x the base learning rate, the latent codes included. For scales,
# codebook, bias and norms: measured on SmolLM2-135M from the default PTQ model, 50K QAT tokens at
# lr 1e-4 (benchmarks/results/ablation.md), held-out perplexity 21.2 (1.89x fp32) against 23.5
# (2.09x) at one learning rate. For the latents: a code changes only once its latent crosses a bin
# edge, which at 1e-4 hardly happens within 400K tokens; at 3e-4, on the same batches (rows
# `default` and `qat_lat3_1m`), 18.49 / 16.00 / 13.37 at 50K / 200K / 400K tokens against
# 18.49 / 16.26 / 15.22 (the same until the first flips, then ahead: 1.19x fp32 at 400K). At 10x
# (1e-3) the first flips arrive as one destructive wave (benchmarks/results/qat_part_lat10.md).
DEFAULT_LR_SCALE: dict[str, float] = {"latent": 3.0, "scales": 3.0, "codebook": 3.0, "bias": 3.0, "norm": 3.0}


class LCQATCallback(TrainerCallback):
    """Quantization-aware training of LC layers under the HF Trainer (see the module docstring).

    Args:
        train: parameter categories to train (see :mod:`optimum_lcqat.training.params`);
            default: latent, scales, codebook, bias, plus norms/embeddings per the flags below.
        train_norms: also train normalisation weights (default True, as the release does).
        train_embeddings: also train input/output embeddings (default False: large, and with
            little data they overfit; the LC-QAT release trains them).
        lr_scale: per-category multipliers of the learning rate, e.g. ``{"latent": 2.0}``, laid
            over :data:`DEFAULT_LR_SCALE` (x3 for latents, scales, codebook, bias, norms;
            embeddings and other parameters x1); used by :class:`LCQATTrainer` and by :meth:`optimizer_cls_and_kwargs`
            (a plain Trainer's own optimizer puts all parameters at one learning rate). Pass
            ``{c: 1.0 for c in CATEGORIES}`` for one learning rate everywhere.
        max_tokens: token budget: stop once the Trainer has seen this many input tokens
            (counted by the Trainer across processes; turns ``include_num_input_tokens_seen`` on).
        check_finite: stop on a NaN/inf gradient (:class:`NonFiniteTrainingError`). Under fp16 loss
            scaling (a GradScaler) such a step is the scaler's overflow skip, not a divergence: the
            run stops only after ``max_skipped_steps`` skipped steps in a row.
        max_skipped_steps: see ``check_finite`` (default 32: halving the GradScaler's default
            scale 2^16 that often leaves 2^-16, past any overflow that the scale itself causes).
        finalize_on_train_end: fold latents into codes and drop them when training ends.
        resume_from_checkpoint: folder to restore the training state from on resume; by default
            ``<output_dir>/checkpoint-<global_step>`` (:class:`LCQATTrainer` sets it exactly).
        max_flip_share: at most this share of each layer's codes may change in one optimizer
            step (:meth:`LCLinear.limit_code_changes`: the latents furthest past their bin edge
            go first, the rest wait inside their bins); None (default): no cap. For runs with a
            raised latent learning rate, where the first code changes otherwise arrive as one
            destructive wave. Measured on SmolLM2 (benchmarks/results/qat.md): latent lr x10 with
            a cap of 1e-4 trains without blowing up, but its flips still cost quality at 200K
            tokens (24.7 against 20.5 with no flips), so it is off by default. Not with FSDP or
            DeepSpeed yet.
        balance_scales: before training, rescale each LC layer's ``s_u`` and ``s_v`` to equal RMS
            (:meth:`LCLinear.balance_scales_`; the weights are unchanged) so that Adam moves both
            by the same relative amount a step, as the LC-QAT release does.
        decay_categories: parameter categories that get the Trainer's ``weight_decay``
            (default: only ``embedding`` and ``other``; the release decays everything it trains).
        chunked_loss: compute the next-token loss ``loss_chunk_tokens`` positions at a time
            (:mod:`optimum_lcqat.nn.lm_loss`) instead of the model's own loss over the whole batch's
            [tokens x vocab] fp32 logits (default True; the same loss up to fp32 summation order;
            the training forward then returns no logits). Models that post-process their logits
            (soft-capping, logit scales) keep their own loss, with a warning.
        loss_chunk_tokens: positions a chunk (default 1024).
        activation_checkpointing: recompute each decoder block's activations in the backward instead of
            keeping them (transformers' own ``activation_checkpointing_enable``, non-reentrant), for the
            training run (default True; a model that cannot is said once and trains without). What it
            saves and costs: benchmarks/results/memory.md. Already on (TrainingArguments'
            ``activation_checkpointing``): left as it is.
        checkpoint_keep_mib: with our checkpointing, MiB of LC layer products the forward may keep
            beyond the widest layers' (always kept) so that the backward's recompute skips their
            matmuls (:mod:`optimum_lcqat.nn.block_checkpointing`): the blocks that run first keep
            every product until the budget is full. Default 192: on SmolLM2-135M at 4 x 512 tokens
            about 4 of 30 blocks, for ~2-3% of a step; 0 keeps the widest products (and the
            attention outputs) only (benchmarks/results/memory_qat_speed.md).
    """

    def __init__(
        self,
        train=None,
        train_norms: bool = True,
        train_embeddings: bool = False,
        lr_scale: dict[str, float] | None = None,
        max_tokens: int | None = None,
        check_finite: bool = True,
        finalize_on_train_end: bool = True,
        resume_from_checkpoint: str | None = None,
        max_flip_share: float | None = None,
        max_skipped_steps: int = 32,
        balance_scales: bool = False,
        decay_categories=None,
        chunked_loss: bool = True,
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        activation_checkpointing: bool = True,
        checkpoint_keep_mib: float = DEFAULT_CHECKPOINT_KEEP_MIB,
    ):
        self.trainable = resolve_trainable(train, train_norms, train_embeddings)
        # Set by LCQATTrainer, whose save hands the Trainer's gathered FSDP state dict to the
        # quantizer (see FSDP2_NEEDS_LCQAT_TRAINER).
        self.saves_gathered_state_dict = False
        self.lr_scale = {**DEFAULT_LR_SCALE, **(lr_scale or {})}
        self.balance_scales = balance_scales
        self.decay_categories = resolve_decay(decay_categories)
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError(f"LCQATCallback: max_tokens must be positive, got {max_tokens}")
        self.max_tokens = max_tokens
        if max_flip_share is not None and not 0.0 <= max_flip_share <= 1.0:
            raise ValueError(f"LCQATCallback: max_flip_share must be in [0, 1] (a share of each layer's codes), got {max_flip_share}")
        self.max_flip_share = max_flip_share
        self.check_finite = check_finite
        if max_skipped_steps < 0:
            raise ValueError(f"LCQATCallback: max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0  # optimizer steps the GradScaler skipped for non-finite gradients
        self._skipped_in_a_row = 0
        self.finalize_on_train_end = finalize_on_train_end
        self.resume_from_checkpoint = resume_from_checkpoint
        self.selected: dict[str, list[str]] = {}
        self.history: list[dict] = []  # one record per optimizer step
        self.tokens_trained = 0
        self.resumed_exactly: bool | None = None
        self._model = None
        self._heap_held = False  # this callback holds the retained heap (on_train_begin .. on_train_end)
        if loss_chunk_tokens < 1:
            raise ValueError(f"LCQATCallback: loss_chunk_tokens must be positive, got {loss_chunk_tokens}")
        self.chunked_loss, self.loss_chunk_tokens = chunked_loss, loss_chunk_tokens
        self._own_forward = None  # puts the model's own forward back (install_chunked_loss)
        self.activation_checkpointing = activation_checkpointing
        number = isinstance(checkpoint_keep_mib, (int, float)) and not isinstance(checkpoint_keep_mib, bool)
        if not number or not checkpoint_keep_mib >= 0:
            raise ValueError(f"LCQATCallback: checkpoint_keep_mib must be >= 0 (MiB of kept products), got {checkpoint_keep_mib}")
        self.checkpoint_keep_mib = checkpoint_keep_mib
        self._checkpointing_set = False  # this callback turned the model's checkpointing on (off again at the end)
        self._start_codes: dict[str, torch.Tensor] = {}
        self._pending: list[dict] = []
        self._n_codes = 0
        self._bpw = float("nan")

    # ------------------------------------------------------------------ set-up
    def prepare(self, model) -> dict[str, list[str]]:
        """Put the LC layers into training and select the trainable parameters (idempotent)."""
        model = _unwrap(model)
        layers = list(lc_layers(model).items())
        if not layers:
            raise ValueError(
                "LCQATCallback: the model has no LC layer. Load it with quantization_config=LCQATConfig(...) "
                "or from an lcqat checkpoint before creating the Trainer."
            )
        for _, layer in layers:
            if self.balance_scales and layer.latent is None:  # once: prepare() is idempotent
                layer.balance_scales_()
            layer.enable_training()
            if not getattr(layer, "_lcqat_load_hook", False):
                layer.register_load_state_dict_pre_hook(_latent_from_loaded_codes)
                layer._lcqat_load_hook = True
        self.selected = select_trainable(model, self.trainable)
        m_total = sum(l.in_features * l.out_features for _, l in layers)
        self._n_codes = m_total
        self._bpw = sum(l.bits_per_weight() * l.in_features * l.out_features for _, l in layers) / m_total
        self._model = model
        return self.selected

    def optimizer_cls_and_kwargs(self, args):
        """For a plain ``Trainer``: ``Trainer(..., optimizer_cls_and_kwargs=cb.optimizer_cls_and_kwargs(args))``
        gives AdamW with one group per parameter category and ``lr_scale`` applied."""
        from .params import LCQATOptimizerFactory

        return LCQATOptimizerFactory(args, self.lr_scale, self.decay_categories), {}

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("LCQATCallback: the Trainer passed no model")
        if self.activation_checkpointing and not self._checkpointing_set and not getattr(args, "activation_checkpointing", False):
            # here, before the Trainer wraps the model (DDP decides find_unused_parameters from it)
            self._checkpointing_set = enable_activation_checkpointing(_unwrap(model), int(self.checkpoint_keep_mib * 2**20))
        if getattr(args, "ddp_find_unused_parameters", None) is None and any(
                isinstance(m, ExpertLinears) for m in _unwrap(model).modules()):
            # an expert no token of a rank's batch reached has no gradient there; DDP must be told
            # (the Trainer leaves find_unused_parameters off under activation checkpointing)
            args.ddp_find_unused_parameters = True
            logger.info("lcqat: MoE experts: DDP runs with find_unused_parameters=True")
        version = fsdp_version(args)
        if version is not None and version != 2:
            raise NotImplementedError(FSDP1_UNSUPPORTED)
        if version == 2 and not self.saves_gathered_state_dict:
            raise NotImplementedError(FSDP2_NEEDS_LCQAT_TRAINER)
        if _deepspeed_zero3():
            raise NotImplementedError(ZERO3_UNSUPPORTED)
        deepspeed = bool(getattr(args, "deepspeed", None)) or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
        if (version is not None or deepspeed) and self.max_flip_share is not None:
            raise NotImplementedError(
                "LCQATCallback(max_flip_share=...) is not supported under FSDP or DeepSpeed yet (the cap ranks each "
                "layer's whole latent and writes it back, which DeepSpeed's fp32 master copy would overwrite); use "
                "DDP, or leave max_flip_share=None."
            )
        self.prepare(model)
        if self.max_tokens is not None and args.include_num_input_tokens_seen in ("no", False):
            args.include_num_input_tokens_seen = "all"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model if model is not None else self._model)
        layers = list(lc_layers(model).items())
        if any(l.latent is None for _, l in layers):
            raise RuntimeError(
                "LCQATCallback: the LC layers are not in training mode (a previous train() finished and folded "
                "the latents into the codes). Create a new Trainer for another training run."
            )
        if self.max_tokens is not None and args.include_num_input_tokens_seen in ("no", False):
            raise ValueError("LCQATCallback(max_tokens=...) needs TrainingArguments(include_num_input_tokens_seen='all')")
        if self.chunked_loss and self._own_forward is None:
            self._own_forward = install_chunked_loss(model, self.loss_chunk_tokens)
        if any(p.device.type == "cpu" for p in model.parameters()) and not self._heap_held:
            # steps reuse the heap instead of page-faulting, until on_train_end gives it back (optimum_lcqat._heap)
            self._heap_held = retain_freed_memory()
        if state.global_step > 0:
            self.resumed_exactly = self._restore_training_state(args, state, model)
        self._warn_if_codes_cannot_change(args, state, layers, kwargs.get("optimizer"))
        self._start_codes = {n: l.codes.detach().clone() for n, l in layers}
        self._pending = []
        self._skipped_in_a_row = 0
        self.tokens_trained = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def _restore_training_state(self, args, state, model) -> bool:
        """Load the training state saved at this very step; True when the resume is exact.

        The folder is the one resumed from (:class:`LCQATTrainer` sets it, as can
        ``resume_from_checkpoint=``), else ``<output_dir>/checkpoint-<global_step>``: a plain
        Trainer does not tell its callbacks which folder it resumed from. Never another
        checkpoint of output_dir (the newest one, say): its latents belong to another step and
        would not match the codes, optimizer and scheduler the Trainer has just loaded."""
        folder = self.resume_from_checkpoint
        guessed = folder is None
        if guessed:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, TRAINING_STATE_NAME)
        if not os.path.isfile(path):
            reason = f"there is no {path}"
            if guessed:
                reason += (
                    " (a plain Trainer does not tell callbacks which checkpoint it resumed from; use LCQATTrainer, "
                    "or LCQATCallback(resume_from_checkpoint=FOLDER) with the folder passed to train())"
                )
        else:
            saved_step = training_state_step(folder)
            if saved_step is None or saved_step == state.global_step:
                return load_training_state(model, folder)
            reason = f"{path} was saved at step {saved_step}, not at step {state.global_step}, where the run resumes"
        logger.warning(
            "lcqat: the resume at step %d is NOT exact: %s. The latents restart at the centres of the loaded "
            "checkpoint's codes, so the run continues but is not bit-identical to an uninterrupted one.",
            state.global_step, reason,
        )
        return False

    def earliest_code_change_step(self, latent_lr: float) -> int | None:
        """How many optimizer steps must pass before any code can change, at latent learning rate
        ``latent_lr`` (None when the latent codes do not train).

        Latents start at the centres of their codes' bins, half a code unit from the nearest edge,
        and one Adam(W) step moves a parameter by about ``lr`` (a little more when a gradient grows
        suddenly), i.e. a layer's code by ``alpha * lr`` (``alpha`` = :attr:`LCLinear.alpha`, the
        latent-to-code scale). Measured on SmolLM2-135M (largest alpha 23.0): first flips at step 22
        with latent lr 1e-3 (predicted 22); with lr 1e-4 at step 184 (predicted 218), about 24 of 106M
        codes by step 196 (benchmarks/results/qat.md)."""
        if "latent" not in self.trainable or latent_lr <= 0 or self._model is None:
            return None
        alpha = max(l.alpha for l in lc_layers(self._model).values())
        return math.ceil(0.5 / (alpha * latent_lr))

    def _warn_if_codes_cannot_change(self, args, state, layers, optimizer=None) -> None:
        # A short run at a small learning rate trains scales, codebook and norms but can never
        # move a code: say so up front instead of leaving a run of zero flip shares to explain.
        # The latents' learning rate is the optimizer's where it holds them (a plain Trainer's own
        # optimizer does not apply lr_scale), else the one lr_scale asks for.
        latent_lr = args.learning_rate * self.lr_scale.get("latent", 1.0)
        latents = {id(l.latent) for _, l in layers if l.latent is not None}
        for group in getattr(optimizer, "param_groups", None) or ():
            if any(id(p) in latents for p in group["params"]):
                latent_lr = group.get("initial_lr", group["lr"])
                break
        first = self.earliest_code_change_step(latent_lr)
        if first is not None and state.max_steps and 0 < state.max_steps - state.global_step < first:
            logger.warning(
                "lcqat: codes can hardly change in this run: at latent learning rate %.3g the first codes flip "
                "after about %d optimizer steps (latents start half a code from the nearest bin edge), and the "
                "run has %d. Scales, codebook and norms will train. For code changes, raise "
                "LCQATCallback(lr_scale={'latent': ...}) (with LCQATTrainer or optimizer_cls_and_kwargs) or "
                "train longer.", latent_lr, first, state.max_steps - state.global_step,
            )

    # ------------------------------------------------------------------ every step
    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.check_finite:
            return
        model = _unwrap(model if model is not None else self._model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        if not named:
            return
        norms = torch._foreach_norm([p.grad for _, p in named])
        if bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum())):
            self._skipped_in_a_row = 0
            return
        bad = [n for (n, _), g in zip(named, norms) if not torch.isfinite(g)]
        last = last_checkpoint(args.output_dir)
        scaler = grad_scaler(optimizer)
        if scaler is not None:
            # fp16 loss scaling: overflowing (scaled) gradients are the GradScaler's to handle: it
            # skips this optimizer step and lowers the scale. Not a divergence, unless it keeps on.
            self.skipped_steps += 1
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row <= self.max_skipped_steps:
                logger.info(
                    "lcqat: non-finite gradients at step %d under fp16 loss scaling (scale %g): the GradScaler "
                    "skips this step and lowers the scale.", state.global_step + 1, float(scaler.get_scale()),
                )
                return
            raise NonFiniteTrainingError(
                f"lcqat: non-finite gradients in {self._skipped_in_a_row} optimizer steps in a row (up to step "
                f"{state.global_step + 1}; e.g. {', '.join(bad[:3])}) under fp16 loss scaling: lowering the scale "
                f"(now {float(scaler.get_scale()):g}) did not help, so the loss itself is NaN/inf (bad input, too "
                f"high a learning rate, or fp16 overflow in the forward pass: try bf16). The skipped steps did not "
                f"update the weights. Last good checkpoint: {last or 'none saved yet'}."
            )
        raise NonFiniteTrainingError(
            f"lcqat: non-finite gradient at step {state.global_step + 1} in {len(bad)} parameter(s) "
            f"(e.g. {', '.join(bad[:3])}); the loss was probably NaN/inf (bad input, too high a learning "
            f"rate, or fp16 overflow). The weights were not updated. Last good checkpoint: {last or 'none saved yet'}."
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model if model is not None else self._model)
        flipped = held = 0
        with torch.no_grad():
            for layer in lc_layers(model).values():
                if self.max_flip_share is not None:
                    held += layer.limit_code_changes(self._flip_cap(layer))
                flipped += layer.sync_codes()
        self.tokens_trained = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        rec = {
            "step": state.global_step,
            "flipped": flipped,
            "flip_share": flipped / max(self._n_codes, 1),
            "tokens": self.tokens_trained,
        }
        if self.max_flip_share is not None:
            rec["held_back"] = held  # latents past an edge that the cap kept in their bins
        self.history.append(rec)
        self._pending.append(rec)
        if self.max_tokens is not None and self.tokens_trained >= self.max_tokens:
            control.should_training_stop = True

    def _flip_cap(self, layer) -> int:
        # at least one code a step for any positive share: a small layer is not frozen by rounding
        cap = int(self.max_flip_share * layer.in_features * layer.out_features)
        return max(cap, 1) if self.max_flip_share > 0 else 0

    def code_change_share(self, model=None) -> float:
        """Share of codes that differ from the codes at the start of this ``train()`` call."""
        model = _unwrap(model if model is not None else self._model)
        changed = 0
        for name, layer in lc_layers(model).items():
            start = self._start_codes.get(name)
            if start is not None:
                changed += int((unpack_codes(start) != layer.hard_codes()).sum())
        return changed / max(self._n_codes, 1)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        extra = {"lcqat/bits_per_weight": round(self._bpw, 4)}
        if args.include_num_input_tokens_seen not in ("no", False):
            extra["lcqat/tokens"] = self.tokens_trained
        if self._pending:
            extra["lcqat/flip_share"] = sum(r["flip_share"] for r in self._pending) / len(self._pending)
            self._pending = []
        if self._model is not None and self._start_codes:
            extra["lcqat/changed_share"] = self.code_change_share()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model if model is not None else self._model)
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        writes = state.is_world_process_zero and os.path.isdir(folder)
        if is_sharded(model):
            # FSDP2: gathering the latents is a collective, every process joins; process 0 writes
            save_training_state(model, folder, write=writes, step=state.global_step)
        elif writes:
            save_training_state(model, folder, step=state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._own_forward is not None:
            self._own_forward()
            self._own_forward = None
        if self._checkpointing_set:
            self._checkpointing_set = False
            _unwrap(model if model is not None else self._model).activation_checkpointing_disable()
        if self._heap_held:  # the training heap goes back to the system, whether or not layers finalize
            self._heap_held = False
            release_freed_memory()
        if not self.finalize_on_train_end:
            return
        model = _unwrap(model if model is not None else self._model)
        for layer in lc_layers(model).values():
            layer.disable_training()
            layer.snap_to_storage()


def steps_for_token_budget(tokens: int, seq_len: int, per_device_batch_size: int, grad_accum: int = 1, world_size: int = 1) -> int:
    """Optimizer steps that consume at least ``tokens`` tokens of fixed-length sequences."""
    per_step = seq_len * per_device_batch_size * grad_accum * world_size
    return max(1, math.ceil(tokens / per_step))
