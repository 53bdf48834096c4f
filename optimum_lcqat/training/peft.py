"""LoRA adapters on a frozen LC-QAT model (QLoRA-style) with peft.

``LCLinear`` is not an ``nn.Linear`` subclass, so peft's built-in dispatch does not wrap it.
peft's (experimental) ``LoraConfig._register_custom_module`` maps it to :class:`LCLoraLinear`,
a LoRA layer whose base output comes from the frozen packed 2-bit layer (inference kernel,
differentiable in the input) and whose ``lora_B(lora_A(x)) * scaling`` is trained in the
adapter dtype. Merging is not supported (the base weight is 2-bit codes).

The registration is not stored in ``adapter_config.json``; load adapters with
:func:`load_lcqat_lora` (or pass ``config=lcqat_lora_config(...)`` to ``PeftModel.from_pretrained``).

    from optimum_lcqat.training.peft import get_lcqat_lora_model, load_lcqat_lora
    model = AutoModelForCausalLM.from_pretrained(lcqat_dir)
    peft_model = get_lcqat_lora_model(model, r=8, lora_alpha=16)     # LC layers frozen
    Trainer(model=peft_model, ...).train(); peft_model.save_pretrained(adapter_dir)
    model2 = load_lcqat_lora(AutoModelForCausalLM.from_pretrained(lcqat_dir), adapter_dir)
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer

from ..nn.lc_linear import LCLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LCLoraLinear(torch.nn.Module, LoraLayer):
    """LoRA around a frozen :class:`LCLinear`."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs):
        if config.use_dora:
            raise ValueError("LoRA on LC layers does not support DoRA")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module):
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    def merge(self, *args, **kwargs):
        raise NotImplementedError("LoRA adapters cannot be merged into 2-bit LC layers; keep them separate")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, lora_A.weight.dtype)
            out = lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
            result = result + out.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lcqat_lora_config(r: int = 8, lora_alpha: int = 16, target_modules=DEFAULT_TARGETS, **kwargs) -> LoraConfig:
    """A ``LoraConfig`` (task CAUSAL_LM) whose custom-module table maps LCLinear to LCLoraLinear."""
    kwargs.setdefault("task_type", "CAUSAL_LM")
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules) if target_modules else None, **kwargs)
    register(cfg)
    return cfg


def register(cfg: LoraConfig) -> LoraConfig:
    cfg._register_custom_module({LCLinear: LCLoraLinear})
    return cfg


def get_lcqat_lora_model(model, config: LoraConfig | None = None, **kwargs):
    """Freeze the LC-QAT model (LC layers in inference mode) and add LoRA adapters."""
    for m in model.modules():
        if isinstance(m, LCLinear):
            m.disable_training()
    model.requires_grad_(False)
    cfg = register(config) if config is not None else lcqat_lora_config(**kwargs)
    return get_peft_model(model, cfg)


def load_lcqat_lora(model, adapter_dir, is_trainable: bool = False, **kwargs):
    """Load LoRA adapters saved from :func:`get_lcqat_lora_model` onto an LC-QAT model."""
    cfg = LoraConfig.from_pretrained(adapter_dir)
    register(cfg)
    cfg.inference_mode = not is_trainable
    return PeftModel.from_pretrained(model, adapter_dir, config=cfg, is_trainable=is_trainable, **kwargs)
