"""Model-level conversion helpers: which linears become LC layers, LC skeletons for loading, and
the way back to nn.Linear (the swap into LC layers is optimum_lcqat.quant_api.quantize)."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from .config import LCQATConfig
from .nn.expert_linears import ExpertLinears, fused_experts_layout_problem
from .nn.lc_linear import LCLinear, lc_layers
from .tensor.hadamard import RotationPlan

logger = logging.getLogger(__name__)


class NoConvertibleLayerError(ValueError):
    pass


MIN_OUT_FEATURES = 8  # narrower linears (gates, scores) stay dense


def unfuse_experts(model: nn.Module, skip: list[str]) -> list[str]:
    """Put an :class:`~optimum_lcqat.nn.expert_linears.ExpertLinears` in the place of every fused
    mixture-of-experts module of ``model`` that ``skip`` does not keep dense (its expert projections
    then convert as linears); returns their names. Layouts it cannot take stay dense, said once."""
    names, refused = [], {}
    for name, module in list(model.named_modules()):
        problem = fused_experts_layout_problem(module)
        if problem is None and should_convert_module(name, skip):
            model.set_submodule(name, ExpertLinears(module))
            names.append(name)
        elif problem:
            refused.setdefault(type(module).__name__, problem)
    for cls, why in refused.items():
        logger.warning("lcqat: the experts of %s stay dense (%s); the layouts converted are those of Qwen3-MoE, "
                       "Mixtral, OLMoE, Qwen2-MoE and gpt-oss.", cls, why)
    return names


def unfuse_saved_experts(model: nn.Module, lc_names: list[str]) -> list[str]:
    """Before a checkpoint loads: every fused-experts module whose expert projections the checkpoint
    holds as LC layers (``<experts>.gate_up.<e>``, ``<experts>.down.<e>``) becomes an ExpertLinears,
    so that the LC skeletons find their linears; returns the names."""
    prefixes = dict.fromkeys(m.group(1) for n in lc_names if (m := re.match(r"^(.*)\.(?:gate_up|down)\.\d+$", n)))
    names = []
    for prefix in prefixes:
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue  # the skeleton step names the missing module
        if fused_experts_layout_problem(module) is None:
            model.set_submodule(prefix, ExpertLinears(module))
            names.append(prefix)
    return names


def convertible_linears(model: nn.Module, config: LCQATConfig, skip: list[str]) -> list[str]:
    """Names of the nn.Linear modules that the config converts, in module order."""
    names, too_narrow, gates = [], [], []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not should_convert_module(name, skip):
            continue
        if module.in_features % max(config.vector_dim, 4):
            too_narrow.append(name)
            continue
        if module.out_features < MIN_OUT_FEATURES:
            gates.append(name)
            continue
        names.append(name)
    if too_narrow:
        logger.warning(
            "lcqat: keeping %d linear(s) dense because in_features is not a multiple of 4: %s",
            len(too_narrow), ", ".join(too_narrow[:5]) + (" ..." if len(too_narrow) > 5 else ""),
        )
    if gates:
        logger.info("lcqat: keeping %d linear(s) with fewer than %d outputs dense (gates such as Qwen2-MoE's "
                    "shared_expert_gate: a few weights, and a decision the model's routing hangs on): %s",
                    len(gates), MIN_OUT_FEATURES, ", ".join(gates[:5]) + (" ..." if len(gates) > 5 else ""))
    return names


def lc_layer_kwargs(config: LCQATConfig) -> dict:
    return {
        "vector_dim": config.vector_dim,
        "hadamard_block_size": config.hadamard_block_size,
        "codebook": config.codebook,
    }


def build_lc_skeleton(linear: nn.Linear, config: LCQATConfig, device=None, dtype=None,
                      plans: tuple[RotationPlan, RotationPlan] | None = None) -> LCLinear:
    """An LC layer shaped like ``linear`` (values to be loaded); ``plans``: recorded rotation
    plans (a checkpoint's), else the config's."""
    plan_in, plan_out = plans or (None, None)
    return LCLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device=device,
        dtype=dtype if dtype is not None else linear.weight.dtype,
        plan_in=plan_in,
        plan_out=plan_out,
        **lc_layer_kwargs(config),
    )


def dequantize_model(model: nn.Module, dtype=None) -> nn.Module:
    """Replace every LC layer by an nn.Linear holding its effective dense weight, and every
    ExpertLinears by the model's own fused-experts module (what stock transformers loads)."""
    for name, layer in list(lc_layers(model).items()):
        w = layer.dense_weight()
        dt = dtype or w.dtype
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device, dtype=dt)
        with torch.no_grad():
            dense.weight.copy_(w)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        model.set_submodule(name, dense)
    for name, experts in [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertLinears)]:
        model.set_submodule(name, experts.fused())
    return model
