"""The training state that a packed checkpoint does not hold, saved next to it for exact resume.

A Trainer checkpoint folder (``checkpoint-<step>``) holds a valid packed lcqat checkpoint
(codes 2-bit, ``A``/``beta``/``s_u``/``s_v`` rounded to 16 bits, latents dropped). To continue a
run exactly, :data:`TRAINING_STATE_NAME` stores, per LC layer, the real latent codes and the
full-precision ``A``, ``beta``, ``s_u``, ``s_v`` in their training dtype. ``from_pretrained``
ignores the file; the callback restores it when training resumes.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._atomic import atomic_path
from ..convert import lc_layers
from .fsdp import full_tensor, is_dtensor, row_sharded

logger = logging.getLogger(__name__)

TRAINING_STATE_NAME = "lcqat_training_state.safetensors"
_SAVED = ("latent", "A", "beta", "s_u", "s_v")


def is_sharded(model) -> bool:
    """Whether any LC layer's latent is an FSDP2-sharded DTensor."""
    return any(is_dtensor(l.latent) for l in lc_layers(model).values())


def training_state_dict(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full (gathered) tensors; on an FSDP2-sharded model a collective that every rank must call.
    ``keep=False`` (the ranks that do not write) joins the gathers and drops each tensor at once."""
    out = {}
    for name, layer in lc_layers(model).items():
        if layer.latent is None:
            continue
        for leaf in _SAVED:
            t = full_tensor(getattr(layer, leaf).detach())
            if keep:
                out[f"{name}.{leaf}"] = t.to("cpu").contiguous().clone()
    return out


def save_training_state(model, folder: str, write: bool = True, step: int | None = None) -> str | None:
    """Write the latents and full-precision LC parameters to ``folder``; atomic (tmp + rename).
    ``step``: the optimizer step they belong to, recorded so that a resume can check it.

    On an FSDP2-sharded model every rank calls this (the tensors are gathered) and only the rank
    with ``write=True`` writes."""
    sd = training_state_dict(model, keep=write)
    if not sd:
        return None
    path = os.path.join(folder, TRAINING_STATE_NAME)
    metadata = {"format": "pt", "lcqat": "training_state"}
    if step is not None:
        metadata["global_step"] = str(int(step))
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return path


def training_state_step(folder: str) -> int | None:
    """The optimizer step the training-state file in ``folder`` was saved at: its own record, or
    for a file without one the step of the Trainer checkpoint it sits in; None if unknown."""
    path = os.path.join(folder, TRAINING_STATE_NAME)
    if os.path.isfile(path):
        with safe_open(path, framework="pt") as f:
            step = (f.metadata() or {}).get("global_step")
        if step is not None:
            return int(step)
    trainer_state = os.path.join(folder, "trainer_state.json")
    if os.path.isfile(trainer_state):
        with open(trainer_state, encoding="utf-8") as f:
            step = json.load(f).get("global_step")
        return None if step is None else int(step)
    return None


def _load_shard(target, saved) -> None:
    """FSDP2: read only this rank's rows of a row-sharded tensor (torch.chunk layout); other
    placements read the whole tensor and keep their shard, both without communication."""
    from torch.distributed.tensor import distribute_tensor

    local = target.to_local()
    mesh = target.device_mesh
    if row_sharded(target):
        rows = target.shape[0]
        chunk = -(-rows // mesh.size())  # torch.chunk's chunk size
        start = min(rows, mesh.get_local_rank() * chunk)
        local.copy_(saved[start:start + local.shape[0]].to(local.device, local.dtype))
        return
    value = saved[:].to(local.device, target.dtype)
    target.copy_(distribute_tensor(value, mesh, target.placements, src_data_rank=None))


@torch.no_grad()
def load_training_state(model, folder: str) -> bool:
    """Restore latents and LC parameters saved by :func:`save_training_state`, in place (the
    optimizer keeps referring to the same tensors). Returns False when the folder has no file."""
    path = os.path.join(folder, TRAINING_STATE_NAME)
    if not os.path.isfile(path):
        return False
    layers = lc_layers(model)
    expected = {f"{n}.{leaf}" for n, l in layers.items() if l.latent is not None for leaf in _SAVED}
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = expected - keys, keys - expected
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the model: {len(missing)} missing tensors (e.g. {sorted(missing)[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}); was it written for another model "
                "or another set of converted layers?"
            )
        for key in sorted(keys):
            name, _, leaf = key.rpartition(".")
            target = getattr(layers[name], leaf)
            saved = f.get_slice(key)
            if list(target.shape) != list(saved.get_shape()):
                raise ValueError(f"{path}: {key} has shape {saved.get_shape()}, the model has {list(target.shape)}")
            if is_dtensor(target):
                _load_shard(target, saved)
            else:
                target.copy_(saved[:].to(target.device, target.dtype))
    for layer in layers.values():
        layer.sync_codes()
    return True
