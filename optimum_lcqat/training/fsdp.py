"""FSDP2 helpers: sharded latents (DTensors) and the codes gathered from them.

They live in :mod:`optimum_lcqat.tensor.dtensor` (LCLinear and the checkpoint writer need them,
and those may not import training); this module keeps the training-side names."""

from __future__ import annotations

from ..tensor.dtensor import DTensor, full_tensor, gathered_codes, is_dtensor, row_sharded

__all__ = ["DTensor", "full_tensor", "gathered_codes", "is_dtensor", "row_sharded"]
