"""The packed checkpoint format: what is saved per LC layer, and validation on load.

Per converted linear ``<name>``:
  ``<name>.codes``  uint8   [out, in/4]  four 2-bit codes per byte (see tensor/packing.py)
  ``<name>.A``      float16 [d, d]
  ``<name>.beta``   float16 [d]
  ``<name>.s_u``    float16 [in]
  ``<name>.s_v``    float16 [out]
  ``<name>.bias``   model dtype [out]   (when the linear has one)
The safetensors metadata carries ``lcqat_format_version``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

import torch

from .config import FORMAT_VERSION
from .nn.lc_linear import STORAGE_DTYPE, LCLinear, full_tensor

LC_PARAM_SUFFIXES = ("A", "beta", "s_u", "s_v")
METADATA_KEY = "lcqat_format_version"


class CheckpointError(ValueError):
    """A checkpoint that is not a valid lcqat checkpoint (truncated, corrupted, inconsistent)."""


def _shards(checkpoint_files) -> list[str]:
    return [str(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]


def read_layout(checkpoint_files) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (dtype string, shape)}`` of every tensor in the safetensors shards (headers only)."""
    layout = {}
    for path in _shards(checkpoint_files):
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise CheckpointError(f"{path}: safetensors header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc}); the file is corrupted") from exc
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                meta = info or {}
                version = meta.get(METADATA_KEY)
                if version is not None and int(version) > FORMAT_VERSION:
                    raise CheckpointError(
                        f"{path} is lcqat format {version}; this optimum-lcqat reads up to {FORMAT_VERSION}. "
                        "Upgrade: pip install -U optimum-lcqat"
                    )
                continue
            layout[key] = (info["dtype"], tuple(info["shape"]))
            end = max(end, info["data_offsets"][1])
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}. "
                "Re-download or re-save the checkpoint."
            )
    return layout


def lc_module_names(layout) -> list[str]:
    return sorted(k[: -len(".codes")] for k in layout if k.endswith(".codes"))


def validate_layer_layout(name: str, module, layout, vector_dim: int) -> None:
    """Check the tensors of LC layer ``name`` against the module it will load into."""
    m, n = module.out_features, module.in_features
    expect = {
        "codes": ("U8", (m, n // 4)),
        "A": (None, (vector_dim, vector_dim)),
        "beta": (None, (vector_dim,)),
        "s_u": (None, (n,)),
        "s_v": (None, (m,)),
    }
    for suffix, (dtype, shape) in expect.items():
        key = f"{name}.{suffix}"
        if key not in layout:
            raise CheckpointError(f"lcqat checkpoint: {key} is missing; the checkpoint is incomplete or corrupted")
        got_dtype, got_shape = layout[key]
        if dtype is not None and got_dtype != dtype:
            raise CheckpointError(f"lcqat checkpoint: {key} has dtype {got_dtype}; packed codes must be uint8 (U8)")
        if dtype is None and got_dtype not in ("F16", "BF16", "F32"):
            raise CheckpointError(f"lcqat checkpoint: {key} has dtype {got_dtype}; expected a float tensor")
        if got_shape != shape:
            hint = " (the config's vector_dim does not match the tensors)" if suffix in ("A", "beta") else ""
            raise CheckpointError(
                f"lcqat checkpoint: {key} has shape {list(got_shape)}, expected {list(shape)} for a "
                f"{m}x{n} linear{hint}"
            )
    if f"{name}.weight" in layout:
        raise CheckpointError(f"lcqat checkpoint: {name} has both packed codes and a dense weight")


# A full state dict that the caller already gathered, for the save in progress (see below).
_gathered_state_dict: contextvars.ContextVar = contextvars.ContextVar("lcqat_gathered_state_dict", default=None)


@contextlib.contextmanager
def saving_gathered_state_dict(state_dict):
    """Within this block, saving an lcqat model writes ``state_dict`` instead of reading
    ``model.state_dict()``.

    Why: transformers' ``save_pretrained`` takes the tensors to write from the quantizer and
    ignores its own ``state_dict`` argument. Under FSDP2 the Trainer gathers the full state dict
    on every rank and then saves on rank 0 alone, where reading the sharded model again would
    start a collective that the other ranks never join."""
    token = _gathered_state_dict.set(state_dict)
    try:
        yield
    finally:
        _gathered_state_dict.reset(token)


def packed_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict as saved: LC parameters in 16-bit, latents dropped.

    FSDP2-sharded tensors are gathered, so on a sharded model every rank must call this
    (``model.save_pretrained(dir, is_main_process=rank == 0)`` on all ranks), unless the caller
    passes a gathered state dict through :func:`saving_gathered_state_dict`."""
    lc_prefixes = {f"{n}." for n, m in model.named_modules() if isinstance(m, LCLinear)}
    sd = _gathered_state_dict.get()
    if sd is None:
        sd = model.state_dict()
    out = {}
    for key, value in sd.items():
        prefix, _, leaf = key.rpartition(".")
        if f"{prefix}." in lc_prefixes and leaf == "latent":
            continue
        value = full_tensor(value)
        if f"{prefix}." in lc_prefixes and leaf in LC_PARAM_SUFFIXES:
            value = value.to(STORAGE_DTYPE)
        out[key] = value
    return out


def check_loaded_layers(model) -> None:
    """After loading: every LC parameter is finite."""
    for name, module in model.named_modules():
        if isinstance(module, LCLinear):
            for pname in LC_PARAM_SUFFIXES:
                t = getattr(module, pname)
                if not torch.isfinite(t).all():
                    raise CheckpointError(
                        f"lcqat checkpoint: {name}.{pname} holds NaN or inf values; the checkpoint is corrupted"
                    )


def checkpoint_dir_files(path: str | Path) -> list[str]:
    path = Path(path)
    return sorted(str(p) for p in path.glob("*.safetensors"))
