"""How the tensors that are not LC layers are stored: their dtype, and the int8 lm_head.

A 2-bit model's LC layers are small; what is left in the checkpoint is the embedding, the norms
and the output projection, in whatever dtype the model was loaded in (fp32 by default: for
SmolLM2-135M, 113 MiB of a 134 MiB checkpoint is the tied embedding). Two config fields shrink it:

* ``LCQATConfig.dense_dtype`` ("bfloat16" / "float16"): the non-LC float tensors are saved in
  that dtype. Loading casts them to the dtype the model is loaded in (transformers' ordinary
  cast of a checkpoint tensor into the parameter it loads into).
* ``LCQATConfig.lm_head_int8``: the output projection is saved as ``<head>.weight_int8`` (int8
  [out, in]) and ``<head>.scale`` (fp32 [out], one per row), as
  :class:`~optimum_lcqat.nn.Int8Linear` holds it. A model whose head is already an Int8Linear
  (``compact_lm_head``) saves those keys whatever the config says.

Tied embeddings: transformers ties ``lm_head.weight`` to ``model.embed_tokens.weight`` (its
``_tied_weights_keys`` / ``all_tied_weights_keys`` maps) and, on save, drops whichever tied key
shares storage with the one it keeps. With an int8 head the embedding is saved as it is (it is
still needed for the lookup) and ``lm_head.weight`` is not saved at all; on load,
:func:`prepare_int8_head` replaces the head by an Int8Linear skeleton *and* removes the head from
the model's tie maps, so transformers neither ties the embedding into the int8 module nor reports
``lm_head.weight`` as missing. With ``dense_dtype`` alone the tie is preserved: tensors sharing
storage are cast once, to one shared tensor, so transformers still recognises them as tied.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import CheckpointError
from .nn.int8_linear import Int8Linear, quantize_rows_int8, untie_output_weight
from .nn.lc_linear import LCLinear, lc_prefixes

DENSE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
INT8_SUFFIXES = ("weight_int8", "scale")


def _quant_config(model):
    quantizer = getattr(model, "hf_quantizer", None)
    cfg = getattr(quantizer, "quantization_config", None)
    if cfg is None:
        cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    return cfg


def _field(cfg, name: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def output_head(model) -> tuple[str | None, nn.Module | None]:
    """``(name, module)`` of the model's output projection, or ``(None, None)``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None, None
    for name, module in model.named_modules():
        if module is head:
            return name, head
    return None, None


def apply_dense_storage(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The save-time state dict with the config's ``dense_dtype`` and ``lm_head_int8`` applied
    (``state_dict`` is modified in place and returned). LC layers' tensors are left alone."""
    cfg = _quant_config(model)
    dense_dtype = _field(cfg, "dense_dtype")
    if dense_dtype is not None and not isinstance(dense_dtype, torch.dtype):
        if dense_dtype not in DENSE_DTYPES:
            raise ValueError(f"lcqat: dense_dtype={dense_dtype!r} is not one of {sorted(DENSE_DTYPES)} or None")
        dense_dtype = DENSE_DTYPES[dense_dtype]
    lc = lc_prefixes(model)

    keep_as_is = set()
    name, head = output_head(model)
    if isinstance(head, Int8Linear):
        keep_as_is = {f"{name}.{s}" for s in INT8_SUFFIXES}
    elif _field(cfg, "lm_head_int8", False):
        if head is None or name is None:
            raise ValueError("lcqat: lm_head_int8=True but this model has no output embedding (get_output_embeddings)")
        if isinstance(head, LCLinear) or not isinstance(head, nn.Linear):
            raise ValueError(
                f"lcqat: lm_head_int8=True but the output projection {name!r} is a {type(head).__name__}, "
                "not a dense nn.Linear; keep it out of the 2-bit conversion (the default) or set lm_head_int8=False"
            )
        wkey = f"{name}.weight"
        if wkey not in state_dict:
            raise ValueError(f"lcqat: lm_head_int8=True but the state dict to save has no {wkey}")
        q, scale = quantize_rows_int8(state_dict.pop(wkey))
        state_dict[f"{name}.weight_int8"] = q
        state_dict[f"{name}.scale"] = scale
        keep_as_is = {f"{name}.{s}" for s in INT8_SUFFIXES}

    if dense_dtype is not None:
        cast: dict[tuple, torch.Tensor] = {}  # tensors sharing storage (tied weights) stay shared
        for key, value in state_dict.items():
            prefix = key.rpartition(".")[0] + "."
            if key in keep_as_is or prefix in lc:
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dense_dtype:
                continue
            ident = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
            if ident not in cast or value.device.type == "meta":
                cast[ident] = value.to(dense_dtype)
            state_dict[key] = cast[ident]
    return state_dict


def prepare_int8_head(model, layout) -> str | None:
    """Before a pre-quantized checkpoint's weights load: when ``layout`` (the checkpoint's
    ``{key: (dtype, shape)}``) holds ``<head>.weight_int8``, replace the output projection by an
    :class:`Int8Linear` skeleton of the checkpoint's shapes and untie it from the input
    embedding. Returns the head's name, or None when the checkpoint has a dense head."""
    name, head = output_head(model)
    int8_keys = [k for k in layout if k.endswith(".weight_int8")]
    if not int8_keys:
        return None
    if name is None or f"{name}.weight_int8" not in layout:
        where = f"the model's output projection is {name!r}" if name is not None else "the model has no output embedding"
        raise CheckpointError(
            f"lcqat checkpoint: int8 tensors {sorted(int8_keys)} but {where}; the checkpoint was saved from a "
            "different model or is corrupted"
        )
    if isinstance(head, Int8Linear):
        return name
    if not isinstance(head, nn.Linear):
        raise CheckpointError(f"lcqat checkpoint: {name}.weight_int8 is for a Linear, but {name} is a {type(head).__name__}")
    m, n = head.out_features, head.in_features
    for key, dtype, shape in ((f"{name}.weight_int8", "I8", (m, n)), (f"{name}.scale", "F32", (m,))):
        if key not in layout:
            raise CheckpointError(f"lcqat checkpoint: {key} is missing; the checkpoint is incomplete or corrupted")
        got_dtype, got_shape = layout[key]
        if got_dtype != dtype or tuple(got_shape) != shape:
            raise CheckpointError(
                f"lcqat checkpoint: {key} is {got_dtype} {list(got_shape)}, expected {dtype} {list(shape)} "
                f"for the {m}x{n} output projection"
            )
    if f"{name}.weight" in layout:
        raise CheckpointError(f"lcqat checkpoint: {name} has both an int8 weight and a dense weight")
    w = head.weight
    skeleton = Int8Linear.empty(n, m, bias=f"{name}.bias" in layout, device=w.device, bias_dtype=w.dtype)
    model.set_output_embeddings(skeleton)
    untie_output_weight(model, name)
    return name


__all__ = ["DENSE_DTYPES", "apply_dense_storage", "output_head", "prepare_int8_head"]
