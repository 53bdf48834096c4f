"""The packed checkpoint format: what is saved per LC layer, and validation on load.

Per converted linear ``<name>`` (the keys of :class:`~optimum_lcqat.tensor.lc_weight.LCWeight`):
  ``<name>.codes``     uint8   [out, in/4]  four 2-bit codes per byte (see tensor/packing.py)
  ``<name>.A``         float16 [d, d]
  ``<name>.beta``      float16 [d]
  ``<name>.s_u``       float16 [in]
  ``<name>.s_v``       float16 [out]
  ``<name>.rotation``  int32   [2, 2]  resolved rotation plans [[left_in, right_in], [left_out, right_out]]
                                       (format version 2; version 1 files have none and get the
                                       plans version-1 code chose, recomputed from the config)
  ``<name>.bias``      model dtype [out]   (when the linear has one)
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
from .dense_storage import apply_dense_storage
from .errors import CheckpointError  # noqa: F401  (defined below dense_storage, which raises it too)
from .nn.lc_linear import LCLinear, lc_prefixes
from .tensor.dtensor import full_tensor
from .tensor.lc_weight import PARAM_KEYS, STORAGE_DTYPE, LCWeight

LC_PARAM_SUFFIXES = PARAM_KEYS
METADATA_KEY = "lcqat_format_version"


def _shards(checkpoint_files) -> list[str]:
    return [str(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]


def read_header(path: str) -> tuple[dict, int, int]:
    """``(header, header length, file size)`` of one safetensors shard."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: safetensors header length {n} does not fit a {size}-byte file")
            return json.loads(f.read(n)), n, size
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc}); the file is corrupted") from exc


def _declared_version(path: str, header: dict) -> int | None:
    """The ``lcqat_format_version`` a shard's metadata declares (None: none), checked."""
    version = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if version is None:
        return None
    if not str(version).strip().isdigit():
        raise CheckpointError(
            f"{path}: {METADATA_KEY}={version!r} is not a whole number; the checkpoint's metadata is "
            "corrupted (re-save it with optimum-lcqat)"
        )
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is lcqat format {version}; this optimum-lcqat reads up to {FORMAT_VERSION}. "
            "Upgrade: pip install -U optimum-lcqat"
        )
    return int(version)


def read_layout(checkpoint_files) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (dtype string, shape)}`` of every tensor in the safetensors shards (headers only)."""
    layout = {}
    for path in _shards(checkpoint_files):
        header, n, size = read_header(path)
        _declared_version(path, header)
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            layout[key] = (info["dtype"], tuple(info["shape"]))
            end = max(end, info["data_offsets"][1])
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}. "
                "Re-download or re-save the checkpoint."
            )
    return layout


def read_format_version(checkpoint_files) -> int | None:
    """The format version the shards' metadata declares (the highest; None when none declares one)."""
    versions = [_declared_version(p, read_header(p)[0]) for p in _shards(checkpoint_files)]
    return max((v for v in versions if v is not None), default=None)


def lc_module_names(layout) -> list[str]:
    """Names of the LC layers in a checkpoint layout (keys, or a ``{key: ...}`` mapping)."""
    return sorted(k[: -len(".codes")] for k in layout if k.endswith(".codes"))


def validate_layer_layout(name: str, module, layout, vector_dim: int, format_version: int = 1) -> None:
    """Check the tensors of LC layer ``name`` against the module it will load into. A missing
    ``rotation`` record is allowed in a format-1 checkpoint only (version 1 wrote none; from
    version 2 on every layer has one, so a missing one is a damaged file, not an old one)."""
    m, n = module.out_features, module.in_features
    for suffix, (dtype, shape) in LCWeight.expected_layout(m, n, vector_dim).items():
        key = f"{name}.{suffix}"
        if key not in layout:
            if suffix == "rotation" and format_version < 2:
                continue
            if suffix == "rotation":
                raise CheckpointError(
                    f"lcqat checkpoint: {key} is missing from a format-{format_version} checkpoint, which "
                    f"records every layer's rotation plans; layer {name} cannot be loaded with the plans it "
                    "was quantized with. The file is incomplete or was edited: re-save the model with "
                    "optimum-lcqat, or re-quantize it from the full-precision model."
                )
            raise CheckpointError(f"lcqat checkpoint: {key} is missing; the checkpoint is incomplete or corrupted")
        got_dtype, got_shape = layout[key]
        if dtype is not None and got_dtype != dtype:
            what = {"U8": "packed codes must be uint8 (U8)", "I32": "rotation records are int32 (I32)"}[dtype]
            raise CheckpointError(f"lcqat checkpoint: {key} has dtype {got_dtype}; {what}")
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


def model_keys(model, layout: dict) -> tuple[dict, dict]:
    """``(layout, file_keys)``: the checkpoint layout keyed by the names the model's modules have
    (transformers' own key renamings for the architecture applied, as its loading does: Mixtral's
    ``block_sparse_moe`` is ``mlp`` in the model), and each such key's name in the files."""
    from transformers.core_model_loading import apply_renamings

    from .source_keys import conversion_transforms

    renamings, _ = conversion_transforms(model)
    if not renamings:
        return layout, {k: k for k in layout}
    file_keys = {apply_renamings(k, renamings): k for k in layout}
    return {m: layout[f] for m, f in file_keys.items()}, file_keys


def read_rotation_records(checkpoint_files, names, file_keys: dict | None = None) -> dict[str, torch.Tensor]:
    """``{layer name: rotation record}`` for the layers whose ``<name>.rotation`` is in the
    files (tiny tensors, read before the weights load so each layer is built with its plans);
    ``file_keys``: the files' name of a model key, where they differ (:func:`model_keys`)."""
    from safetensors import safe_open

    file_keys = file_keys or {}
    wanted = {file_keys.get(f"{n}.rotation", f"{n}.rotation"): n for n in names}
    out = {}
    for path in _shards(checkpoint_files):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    out[wanted[key]] = f.get_tensor(key)
    return out


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
    """The model's state dict as saved: LC parameters in 16-bit, latents dropped; the other
    tensors as the config's ``dense_dtype`` / ``lm_head_int8`` ask (see dense_storage.py).

    FSDP2-sharded tensors are gathered, so on a sharded model every rank must call this
    (``model.save_pretrained(dir, is_main_process=rank == 0)`` on all ranks), unless the caller
    passes a gathered state dict through :func:`saving_gathered_state_dict`."""
    lc = lc_prefixes(model)
    sd = _gathered_state_dict.get()
    if sd is None:
        sd = model.state_dict()
    out = {}
    for key, value in sd.items():
        prefix, _, leaf = key.rpartition(".")
        if f"{prefix}." in lc and leaf == "latent":
            continue
        if type(value) is not torch.Tensor:  # a subclass: FSDP2's DTensor is gathered
            value = full_tensor(value)
        if f"{prefix}." in lc and leaf in LC_PARAM_SUFFIXES:
            value = value.to(STORAGE_DTYPE)
        out[key] = value
    return apply_dense_storage(model, out)  # dense_dtype, lm_head_int8 (dense_storage.py)


def check_loaded_layers(model) -> None:
    """After loading: every LC parameter is finite and every rotation record is the layer's plan."""
    for name, module in model.named_modules():
        if isinstance(module, LCLinear):
            try:
                module.check_rotation_record()
            except ValueError as exc:
                raise CheckpointError(f"lcqat checkpoint: {name}.rotation: {exc}") from None
            for pname in LC_PARAM_SUFFIXES:
                t = getattr(module, pname)
                if not torch.isfinite(t).all():
                    raise CheckpointError(
                        f"lcqat checkpoint: {name}.{pname} holds NaN or inf values; the checkpoint is corrupted"
                    )


def checkpoint_dir_files(path: str | Path) -> list[str]:
    path = Path(path)
    return sorted(str(p) for p in path.glob("*.safetensors"))
