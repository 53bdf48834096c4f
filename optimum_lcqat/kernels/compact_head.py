"""Compact lm_head: the output projection stored as int8 with one fp32 scale per row.

For a small model the lm_head is a large share of the bytes read per decoded token
(SmolLM2-135M: 49152 x 576, 113 MB in fp32, more than a quarter of the 2-bit model's traffic).
Storing it as int8 (per-output-row absmax scale) reads 4x fewer bytes than fp32; the kernel is
``torch.ops.lcqat.int8_linear`` (CPU, AVX-512/AVX2) with a pure-PyTorch fallback.

This is an opt-in inference transform, applied after loading: ``compact_lm_head(model)``. The
input embedding is left untouched (a tied embedding keeps its full-precision copy for the
lookup; only the lm_head matmul reads the int8 copy). It is not (yet) part of the checkpoint
format or of LCQATConfig.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        return cls(q, scale, linear.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, per-row scale"

    def dequantize_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import native_backend

        nat = native_backend()
        if nat is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) \
                and not (torch.is_grad_enabled() and x.requires_grad):
            return torch.ops.lcqat.int8_linear(x, self.weight_int8, self.scale, self.bias)
        w = self.dequantize_weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def compact_lm_head(model) -> Int8Linear:
    """Replace ``model``'s output projection by an :class:`Int8Linear` (in place); return it."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"compact_lm_head: the output embedding is {type(head).__name__}, not nn.Linear")
    new = Int8Linear.from_linear(head).to(head.weight.device)
    model.set_output_embeddings(new)
    return new
