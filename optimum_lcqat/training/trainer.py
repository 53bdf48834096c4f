"""`LCQATTrainer`: the HF Trainer with the LC-QAT callback, per-group learning rates and
optional knowledge distillation from the full-precision model.

Knowledge distillation (``teacher_model=...``): the loss is
``kd_alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - kd_alpha) * CE`` over every position
with a valid next-token label (``T`` = ``kd_temperature``; logit KL as in BitDistiller/ParetoQ's
forward-KL variant). Cost: the teacher's weights in memory (a second copy of the
full-precision model, frozen, no optimizer state), one extra no-grad forward per step (about
a third of a training step's compute). With the callback's chunked loss (its default) the KL is
computed a chunk of positions at a time (optimum_lcqat.nn.lm_loss); without it, two more
``batch x seq x vocab`` float32 tensors (teacher log-probabilities and the student's log-softmax),
e.g. 4 x 512 x 49152 x 4 B = 400 MB each for SmolLM2. benchmarks/qat.py measures the time cost.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from ..nn.lm_loss import causal_lm_hidden_states, chunked_distillation_kl, chunked_loss_unsupported
from .callback import LCQATCallback, NonFiniteTrainingError, _unwrap, grad_scaler, last_checkpoint
from .params import LCQATOptimizerFactory

logger = logging.getLogger(__name__)


def fsdp_plugin_problems(plugin) -> list[str]:
    """What in an accelerate FSDP plugin LC-QAT cannot train under, each with its fix (empty: fine)."""
    problems = []
    mp = getattr(plugin, "mixed_precision_policy", None)
    param_dtype = getattr(mp, "param_dtype", None)
    if param_dtype is not None and param_dtype != torch.float32:
        problems.append(
            f"mixed precision with param_dtype {param_dtype} all-gathers the latent codes in that dtype, so latents "
            "near a bin edge round to one code in the forward and another in the saved codes; use --mixed_precision "
            "no (or a policy with param_dtype float32), or DDP with bf16 autocast (latents stay float32)."
        )
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        problems.append(
            "cpu_ram_efficient_loading moves the model to the meta device and reloads a full state dict into it, "
            "which the packed 2-bit codes buffer does not survive; set fsdp_cpu_ram_efficient_loading false."
        )
    offload = getattr(plugin, "cpu_offload", None)
    if type(offload).__name__ == "CPUOffloadPolicy" or getattr(offload, "offload_params", False):
        problems.append(
            "CPU offload keeps the latent shards on the CPU, where the per-step gather of the codes cannot run over "
            "NCCL; turn fsdp_offload_params off (the latents of a 7B model are 28 GB in fp32, divided by the GPUs)."
        )
    return problems


def distillation_loss(student_logits, teacher_logits, labels=None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over valid positions of ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (next-token positions:
    position i is scored when ``labels[:, i+1] != -100``; all positions when ``labels`` is None)."""
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    logp_s = F.log_softmax(s, dim=-1)
    logp_t = F.log_softmax(t, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # [B, T-1]
    if labels is not None:
        mask = (labels[:, 1:] != -100).to(kl.dtype)
        kl = (kl * mask).sum() / mask.sum().clamp_min(1)
    else:
        kl = kl.mean()
    return kl * temperature**2


class LCQATTrainer(Trainer):
    """``Trainer`` for LC-QAT. Adds an :class:`LCQATCallback` when none is passed, builds AdamW
    with one parameter group per category (``lr_scale`` multipliers), resumes exactly, stops on a
    non-finite loss (under fp16 loss scaling, where the GradScaler skips such a step, once
    ``max_skipped_steps`` steps in a row were skipped), and distils from ``teacher_model`` when given.

    Args (besides the Trainer's):
        teacher_model: the full-precision model (frozen) for knowledge distillation, or None.
        kd_alpha: weight of the KL term (1.0: pure distillation; 0.0: plain cross-entropy).
        kd_temperature: softmax temperature of the KL term.
        lr_scale: per-category learning-rate multipliers (ignored if a callback is passed).
    """

    def __init__(self, *args, teacher_model=None, kd_alpha: float = 1.0, kd_temperature: float = 1.0,
                 lr_scale: dict[str, float] | None = None, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        cb = next((c for c in callbacks if isinstance(c, LCQATCallback)), None)
        if cb is None:
            cb = LCQATCallback(lr_scale=lr_scale)
            callbacks.append(cb)
        cb.saves_gathered_state_dict = True  # see _save
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.lcqat = cb
        if self.is_fsdp_enabled:
            self._prepare_fsdp_plugin(self.accelerator.state.fsdp_plugin)
        if not 0.0 <= kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {kd_alpha}")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be positive, got {kd_temperature}")
        self.teacher_model = teacher_model
        self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            teacher_model.to(self.args.device)
            # our KD loss is a per-micro-batch mean: let the Trainer divide it by the GA steps
            self.loss_is_scaled_for_ga = False

    @staticmethod
    def _prepare_fsdp_plugin(plugin) -> None:
        """Refuse FSDP settings LC-QAT cannot train under; make checkpoints full (packed) state dicts."""
        problems = fsdp_plugin_problems(plugin)
        if problems:
            raise NotImplementedError("LC-QAT under FSDP2: " + " ".join(problems))
        if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            # accelerate's FSDP2 default is SHARDED_STATE_DICT, under which the Trainer writes no
            # model file at all (neither in checkpoints nor in save_model)
            logger.warning(
                "lcqat: FSDP state_dict_type %s -> FULL_STATE_DICT, so that every checkpoint and save_model write a "
                "packed lcqat model.safetensors (set fsdp_state_dict_type FULL_STATE_DICT to silence this).",
                plugin.state_dict_type,
            )
            plugin.state_dict_config = plugin.optim_state_dict_config = None
            plugin.set_state_dict_type("FULL_STATE_DICT")

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            opt_model = self.model if model is None else model
            self.optimizer = LCQATOptimizerFactory(self.args, self.lcqat.lr_scale, self.lcqat.decay_categories)()(opt_model)
        return super().create_optimizer(model)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, str):
            self.lcqat.resume_from_checkpoint = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        # Under FSDP the Trainer passes the full state dict it gathered on every process; the lcqat
        # quantizer must write that one (save_pretrained would otherwise read the sharded model
        # again, on process 0 alone). Elsewhere state_dict is None and nothing changes.
        if state_dict is None or not self.is_fsdp_enabled:
            return super()._save(output_dir, state_dict=state_dict)
        from ..checkpoint import saving_gathered_state_dict

        with saving_gathered_state_dict(state_dict):
            return super()._save(output_dir, state_dict=state_dict)

    def _chunked_kd(self, model, outputs, t_inputs, labels):
        reason = chunked_loss_unsupported(self.teacher_model)
        if reason is not None:
            raise ValueError(f"lcqat: the student trains with the chunked loss but the teacher cannot give hidden states "
                             f"for it ({reason}); pass LCQATCallback(chunked_loss=False).")
        with torch.no_grad():
            t_hidden = causal_lm_hidden_states(self.teacher_model, **t_inputs)
        student = _unwrap(model)
        return chunked_distillation_kl(outputs.hidden_states[-1], student.get_output_embeddings(), t_hidden,
                                       self.teacher_model.get_output_embeddings(), labels, self.kd_temperature,
                                       self.lcqat.loss_chunk_tokens)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is None:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
        else:
            labels = inputs.get("labels")
            outputs = model(**inputs)
            t_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            if outputs.logits is None:
                # the callback's chunked loss is in place (no [tokens x vocab] logits): the KL too, a chunk
                # of positions at a time, from the student's last hidden state and the teacher's
                kd = self._chunked_kd(model, outputs, t_inputs, labels)
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher_model(**t_inputs).logits
                kd = distillation_loss(outputs.logits, teacher_logits, labels, self.kd_temperature)
            loss = self.kd_alpha * kd
            if self.kd_alpha < 1.0:
                if outputs.loss is None:
                    raise ValueError("kd_alpha < 1 mixes in cross-entropy: the batch needs 'labels'")
                loss = loss + (1.0 - self.kd_alpha) * outputs.loss
            out = (loss, outputs) if return_outputs else loss
        if model.training and not bool(torch.isfinite(loss.detach()).all()):
            if grad_scaler(self.optimizer) is not None:
                # fp16 loss scaling: the GradScaler skips this step (its gradients are non-finite
                # too); LCQATCallback stops the run if steps keep being skipped (max_skipped_steps)
                return out
            last = last_checkpoint(self.args.output_dir)
            raise NonFiniteTrainingError(
                f"lcqat: the loss is {float(loss.detach())} at step {self.state.global_step + 1}; stopping before "
                f"any update (bad input, too high a learning rate, or fp16 overflow). Last good checkpoint: "
                f"{last or 'none saved yet'}."
            )
        return out
