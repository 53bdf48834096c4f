"""Int8 linear: a weight stored as int8 with one fp32 scale per output row (the compact lm_head).

For a small model the lm_head is a large share of the bytes read per decoded token
(SmolLM2-135M: 49152 x 576, 113 MB in fp32, more than a quarter of the 2-bit model's traffic).
Storing it as int8 (per-output-row absmax scale) reads 4x fewer bytes than fp32; the kernel is
``torch.ops.lcqat.int8_linear`` (CPU, AVX-512/AVX2) with a pure-PyTorch fallback. bf16
activations on an AVX-512 VNNI CPU, up to 64 rows a call, are rounded per row to 16-bit fixed
point and multiplied as exact integers (an error below bf16's own rounding for every element above
max|x| / 128; a row's result does not depend on the rows beside it), where the weight-only fp32
loop was bound by its int8 -> fp32 conversions; on AMX-INT8 CPUs the same integer sums run on
AMX tiles from 2 rows (csrc/cpu/amx.cpp: the same outputs, the head read once a call at any row
count up to 64); ``OPTIMUM_LCQAT_CPU_BF16=0`` computes them in fp32 instead (csrc/cpu/kernels.h).

Two ways to get one:

* in memory, after loading: ``compact_lm_head(model)``;
* in the checkpoint: ``LCQATConfig(lm_head_int8=True)`` saves the head as ``lm_head.weight_int8``
  (int8 [out, in]) and ``lm_head.scale`` (fp32 [out]); loading that checkpoint builds this module
  (see :mod:`optimum_lcqat.dense_storage`). A model whose head was compacted in memory saves the
  same keys.

The input embedding is left untouched: a tied embedding keeps its full-precision copy for the
lookup; only the lm_head matmul reads the int8 copy (the head is untied from it).
"""

from __future__ import annotations

import torch
from torch import nn

from .._deprecation import renamed_method


@torch.no_grad()
def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization: ``(q int8 [out, in], scale fp32 [out])`` with
    ``weight ≈ q * scale[:, None]`` and ``scale = max|row| / 127``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``y = x (q * scale)^T + bias`` with ``q`` int8 and ``scale`` fp32 per output row.

    The tensors are buffers (``weight_int8``, ``scale``, ``bias``), not parameters: the layer is
    for inference and is not trained."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
            raise ValueError(f"Int8Linear: weight_int8 must be a 2-D int8 tensor, got {weight_int8.dtype} {list(weight_int8.shape)}")
        self.out_features, self.in_features = weight_int8.shape
        if tuple(scale.shape) != (self.out_features,):
            raise ValueError(f"Int8Linear: scale has shape {list(scale.shape)}, expected [{self.out_features}] (one per row)")
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        q, scale = quantize_rows_int8(weight)
        return cls(q, scale, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls.from_weight(linear.weight, linear.bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool = False, device=None, bias_dtype=None) -> "Int8Linear":
        """An uninitialised layer of this shape (what a checkpoint loads into)."""
        return cls(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device),
            torch.empty(out_features, dtype=torch.float32, device=device),
            torch.empty(out_features, dtype=bias_dtype or torch.float32, device=device) if bias else None,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, per-row scale"

    def dense_weight(self) -> torch.Tensor:
        """The float32 weight the int8 one stands for [out, in]."""
        return self.weight_int8.float() * self.scale[:, None]

    dequantize_weight = renamed_method("Int8Linear.dequantize_weight", "Int8Linear.dense_weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import native_backend

        nat = native_backend()
        if nat is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) \
                and not (torch.is_grad_enabled() and x.requires_grad):
            return torch.ops.lcqat.int8_linear(x, self.weight_int8, self.scale, self.bias)
        w = self.dense_weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def untie_output_weight(model: nn.Module, head_name: str) -> None:
    """Drop ``<head_name>.weight`` from the model's weight-tying maps, so that transformers no
    longer ties the (now int8) head to the input embedding: not while loading, not on a later
    ``tie_weights()`` (which rebuilds the map from ``_tied_weights_keys``), not when saving."""
    key = f"{head_name}.weight"
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        for k in [k for k, v in tied.items() if key in (k, v)]:
            del tied[k]
    cls_map = getattr(model, "_tied_weights_keys", None)
    if isinstance(cls_map, dict) and any(key in (k, v) for k, v in cls_map.items()):
        # an instance attribute shadows the class's map for this model only
        model._tied_weights_keys = {k: v for k, v in cls_map.items() if key not in (k, v)}


def compact_lm_head(model) -> Int8Linear:
    """Replace ``model``'s output projection by an :class:`Int8Linear` (in place); return it.

    A tied input embedding keeps its full-precision weight; the head is untied from it. Saving
    the model then writes the head as ``weight_int8`` + ``scale`` and loading restores it."""
    head = model.get_output_embeddings()
    if isinstance(head, Int8Linear):
        return head
    if not isinstance(head, nn.Linear):
        raise TypeError(f"compact_lm_head: the output embedding is {type(head).__name__}, not nn.Linear")
    name = _module_name(model, head)
    new = Int8Linear.from_linear(head).to(head.weight.device)
    model.set_output_embeddings(new)
    if name is not None:
        untie_output_weight(model, name)
    return new


__all__ = ["Int8Linear", "compact_lm_head", "quantize_rows_int8", "untie_output_weight"]
