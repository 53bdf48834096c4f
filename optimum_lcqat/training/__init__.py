"""Quantization-aware training of LC-QAT models with the Hugging Face Trainer.

* :class:`LCQATCallback`: plain ``Trainer(..., callbacks=[LCQATCallback()])`` does LC-QAT.
* :class:`LCQATTrainer`: the Trainer plus per-group learning rates and knowledge distillation.
* :mod:`.params`: which parameters train (deterministic categories) and optimizer groups.
* :mod:`.state`: the latents saved next to each checkpoint for exact resume.
* :mod:`.peft`: LoRA adapters on a frozen LC-QAT model (imported on demand; needs peft).
"""

from .callback import LCQATCallback, NonFiniteTrainingError, steps_for_token_budget
from .params import (
    CATEGORIES,
    DEFAULT_TRAINABLE,
    LCQATOptimizerFactory,
    lcqat_param_groups,
    parameter_categories,
    select_trainable,
)
from .state import TRAINING_STATE_NAME, load_training_state, save_training_state
from .trainer import LCQATTrainer, distillation_loss

__all__ = [
    "LCQATCallback",
    "LCQATTrainer",
    "NonFiniteTrainingError",
    "LCQATOptimizerFactory",
    "lcqat_param_groups",
    "parameter_categories",
    "select_trainable",
    "steps_for_token_budget",
    "distillation_loss",
    "save_training_state",
    "load_training_state",
    "TRAINING_STATE_NAME",
    "CATEGORIES",
    "DEFAULT_TRAINABLE",
]
