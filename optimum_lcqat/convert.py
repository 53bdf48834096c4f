"""Model-level conversion: which linears become LC layers, and the swap itself."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.quantizers.quantizers_utils import should_convert_module

from .config import LCQATConfig
from .nn.lc_linear import LCLinear

logger = logging.getLogger(__name__)


class NoConvertibleLayerError(ValueError):
    pass


def convertible_linears(model: nn.Module, config: LCQATConfig, skip: list[str]) -> list[str]:
    """Names of the nn.Linear modules that the config converts, in module order."""
    names, too_narrow = [], []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not should_convert_module(name, skip):
            continue
        if module.in_features % max(config.vector_dim, 4):
            too_narrow.append(name)
            continue
        names.append(name)
    if too_narrow:
        logger.warning(
            "lcqat: keeping %d linear(s) dense because in_features is not a multiple of 4: %s",
            len(too_narrow), ", ".join(too_narrow[:5]) + (" ..." if len(too_narrow) > 5 else ""),
        )
    return names


def lc_layer_kwargs(config: LCQATConfig) -> dict:
    return {
        "vector_dim": config.vector_dim,
        "hadamard_block_size": config.hadamard_block_size,
        "codebook": config.codebook,
    }


def build_lc_skeleton(linear: nn.Linear, config: LCQATConfig, device=None, dtype=None) -> LCLinear:
    return LCLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device=device,
        dtype=dtype if dtype is not None else linear.weight.dtype,
        **lc_layer_kwargs(config),
    )


def lc_layer_from_params(linear: nn.Linear, params, config: LCQATConfig) -> LCLinear:
    """A ready LC layer from initialiser output, on the linear's device and dtype, snapped to storage."""
    w = linear.weight
    layer = build_lc_skeleton(linear, config, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.codes.copy_(params.packed.to(w.device))
        layer.A.copy_(params.A)
        layer.beta.copy_(params.beta)
        layer.s_u.copy_(params.s_u)
        layer.s_v.copy_(params.s_v)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    layer.snap_to_storage()
    return layer


def quantize_linears_data_free(model: nn.Module, names: list[str], config: LCQATConfig) -> dict[str, float]:
    """Replace each named linear by an LC layer initialised without data; return per-layer errors."""
    from .init import get_initializer

    init = get_initializer("data_free")
    errors = {}
    for name in tqdm(names, desc="lcqat: data-free init", leave=False):
        linear = model.get_submodule(name)
        layer_probe = build_lc_skeleton(linear, config, device="meta")
        params = init(
            linear.weight.detach(),
            vector_dim=config.vector_dim,
            codebook=config.codebook,
            plan_in=layer_probe.plan_in,
            plan_out=layer_probe.plan_out,
            seed=config.seed,
            name=name,
            iters=config.init_iters,
        )
        model.set_submodule(name, lc_layer_from_params(linear, params, config))
        errors[name] = params.error
        logger.info("lcqat: %s %dx%d rotated-domain rel. error %.4f", name, linear.out_features, linear.in_features, params.error)
    return errors


def lc_layers(model: nn.Module) -> dict[str, LCLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LCLinear)}


def dequantize_model(model: nn.Module, dtype=None) -> nn.Module:
    """Replace every LC layer by an nn.Linear holding its effective dense weight."""
    for name, layer in list(lc_layers(model).items()):
        w = layer.dequantize_weight()
        dt = dtype or w.dtype
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device, dtype=dt)
        with torch.no_grad():
            dense.weight.copy_(w)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        model.set_submodule(name, dense)
    return model
