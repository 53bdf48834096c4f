"""Sharded tensors (FSDP2's DTensors): tests, whole tensors, and the codes gathered from sharded
latents. A tensor primitive: LCLinear (nn), the checkpoint writer and the training state all use
it, so it sits below them (``optimum_lcqat.training.fsdp`` re-exports it)."""

from __future__ import annotations

import torch

from .packing import pack_codes, round_latent, unpack_codes

try:  # FSDP2 shards parameters as DTensors; absent only from torch builds without distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (FSDP2 holds sharded parameters as DTensors)."""
    return DTensor is not None and isinstance(t, DTensor)


def row_sharded(t) -> bool:
    """Whether DTensor ``t`` is split by rows over a 1-D mesh (FSDP2's default placement)."""
    from torch.distributed.tensor import Shard

    return t.device_mesh.ndim == 1 and len(t.placements) == 1 and t.placements[0] == Shard(0)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of an FSDP2-sharded DTensor (an all-gather)."""
    return t.full_tensor() if is_dtensor(t) else t


def gathered_codes(latent, alpha: float, codes_like: torch.Tensor) -> torch.Tensor:
    """The integer codes [m, n] of a sharded latent: each rank rounds its own rows and the codes
    are gathered, packed 4 to a byte when the latent is sharded by rows (FSDP2's default; a
    quarter of the uint8 traffic), else as uint8. A collective: every rank must call it."""
    if row_sharded(latent):
        # rows pack independently: pack the local rows, gather a quarter of the bytes
        local = round_latent(latent.to_local(), alpha)
        packed = DTensor.from_local(
            pack_codes(local), latent.device_mesh, latent.placements, run_check=False,
            shape=torch.Size(codes_like.shape), stride=codes_like.stride(),
        )
        return unpack_codes(packed.full_tensor())
    return full_tensor(round_latent(latent, alpha))
