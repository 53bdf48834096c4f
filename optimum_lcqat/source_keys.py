"""Which tensors of a full-precision checkpoint make each tensor of the model, for streaming PTQ.

A checkpoint's keys are not always the model's: transformers 5 renames some on load (Mixtral's
``block_sparse_moe`` is ``mlp`` in the model) and fuses the per-expert projections of a
mixture-of-experts layer into 3-D parameters (``experts.<e>.gate_proj.weight`` and
``experts.<e>.up_proj.weight`` into ``experts.gate_up_proj`` [E, 2I, H]). Its loader does both
with the architecture's own transforms (``get_model_conversion_mapping``). Streaming PTQ reads one
block at a time and never builds the fused tensors: its experts are
:class:`~optimum_lcqat.nn.expert_linears.ExpertLinears` (``experts.gate_up.<e>.weight`` [2I, H]),
so each is made of that expert's pieces, read from the files and concatenated. The file keys are
mapped with transformers' own ``rename_source_key`` (renamings, then at most one converter), so
what counts as a piece is what the loader would have fused.

Checkpoints that already hold the fused tensors (gpt-oss: ``experts.gate_up_proj`` [E, H, 2I],
stored transposed, and ``experts.gate_up_proj_bias`` [E, 2I]) give each expert its slice, transposed
back where the layout is, and its bias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

__all__ = ["TensorSource", "model_tensor_sources", "file_key_renamer", "conversion_transforms"]


@dataclass(frozen=True)
class TensorSource:
    """One model tensor from the files: ``parts`` (file key, index into its first axis or None for
    the whole tensor), concatenated on the first axis in this order; ``transposed``: each part is
    stored [in, out] and is transposed when read."""

    parts: tuple[tuple[str, int | None], ...]
    transposed: bool = False


def conversion_transforms(model: nn.Module):
    """(renamings, converters): transformers' own weight transforms for ``model``'s architecture."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _expert_index(file_key: str, pattern: str) -> int:
    """The expert number that ``pattern``'s ``*`` matched in ``file_key``."""
    rx = re.escape(pattern).replace(r"\*", r"(\d+)")
    m = re.search(rx, file_key)
    if m is None:  # pragma: no cover - transformers matched it
        raise ValueError(f"{file_key}: the expert index of pattern {pattern!r} is not found")
    return int(m.group(1))


def model_tensor_sources(model: nn.Module, file_keys, expert_modules: list[str]) -> dict[str, TensorSource]:
    """``{model key: TensorSource}`` for every file key, in the model's names. ``expert_modules``:
    the ExpertLinears of ``model`` (their fused source tensors become per-expert ones)."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = conversion_transforms(model)
    fused_to_linears = {}  # a fused parameter's model key -> the ModuleList of its per-expert linears
    transposed, biases = set(), {}
    for name in expert_modules:
        fused_to_linears[f"{name}.gate_up_proj"] = f"{name}.gate_up"
        fused_to_linears[f"{name}.down_proj"] = f"{name}.down"
        biases[f"{name}.gate_up_proj_bias"] = f"{name}.gate_up"
        biases[f"{name}.down_proj_bias"] = f"{name}.down"
        if getattr(model.get_submodule(name), "is_transposed", False):
            transposed.update({f"{name}.gate_up", f"{name}.down"})
    pieces: dict[str, dict[int, list]] = {}  # fused key -> expert -> its per-expert file keys, in order
    saved_fused: dict[str, str] = {}  # fused key -> the file key holding it fused
    out: dict[str, TensorSource] = {}
    for fk in file_keys:
        key, pattern = rename_source_key(fk, renamings, converters)
        if key in fused_to_linears and pattern is not None:
            conv = next(c for c in converters if pattern in c.source_patterns)
            e = _expert_index(fk, pattern)
            pieces.setdefault(key, {}).setdefault(e, [None] * len(conv.source_patterns))
            pieces[key][e][conv.source_patterns.index(pattern)] = fk
        elif key in fused_to_linears:  # saved fused: one slice per expert
            saved_fused[key] = fk
        elif key in biases:  # saved fused biases: one row per expert
            linears = biases[key]
            for e in range(len(model.get_submodule(linears))):
                out[f"{linears}.{e}.bias"] = TensorSource(((fk, e),))
        else:
            out[key] = TensorSource(((fk, None),))
    for fused, fk in saved_fused.items():
        linears = fused_to_linears[fused]
        for e in range(len(model.get_submodule(linears))):
            out[f"{linears}.{e}.weight"] = TensorSource(((fk, e),), transposed=linears in transposed)
    for fused, by_expert in pieces.items():
        linears = fused_to_linears[fused]
        for e, parts in by_expert.items():
            if any(p is None for p in parts):
                continue  # incomplete: left out, so the caller's completeness check names it
            out[f"{linears}.{e}.weight"] = TensorSource(tuple((p, None) for p in parts))
    return out


def file_key_renamer(model: nn.Module):
    """A function from a model key to the name transformers' ``save_pretrained`` gives it in the
    files (the architecture's renamings reversed), so that a streamed checkpoint has the keys an
    in-memory one saved by transformers has."""
    from transformers.core_model_loading import apply_renamings

    renamings, _ = conversion_transforms(model)
    if not renamings:
        return lambda k: k
    reverse = [r.reverse_transform() for r in renamings][::-1]
    return lambda k: apply_renamings(k, reverse)
