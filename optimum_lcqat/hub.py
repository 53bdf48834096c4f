"""Model cards and atomic saving of lcqat checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._atomic import write_dir_atomic, write_text_atomic
from .checkpoint import checkpoint_dir_files, lc_module_names, read_layout
from .tensor.lc_weight import storage_bits

CARD_NAME = "README.md"


def checkpoint_info(path: str | os.PathLike) -> dict:
    """What a saved lcqat checkpoint holds (read from headers and config only)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint")
    cfg = json.loads(cfg_file.read_text())
    qcfg = cfg.get("quantization_config") or {}
    files = checkpoint_dir_files(path)
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    layout = read_layout(files)
    numel = {k: _prod(shape) for k, (_, shape) in layout.items()}
    lc = lc_module_names(layout)
    shapes = {n: (layout[f"{n}.codes"][1][0], layout[f"{n}.codes"][1][1] * 4, layout[f"{n}.A"][1][0]) for n in lc}  # m, n, d
    lc_weights = sum(m * n for m, n, _ in shapes.values())
    lc_bits = sum(storage_bits(*shape) for shape in shapes.values())
    size = sum(os.path.getsize(f) for f in files)
    return {
        "path": str(path),
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "base_model": cfg.get("_name_or_path") or qcfg.get("base_model"),
        "quant_method": qcfg.get("quant_method"),
        "format_version": qcfg.get("format_version"),
        "config": qcfg,
        "converted_layers": len(lc),
        "converted_weights": lc_weights,
        "bits_per_weight_converted": (lc_bits / lc_weights) if lc_weights else None,
        "total_parameters_stored": sum(numel.values()),
        "size_bytes": size,
    }


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


CARD_TAGS = ["optimum-lcqat", "lcqat", "2-bit", "quantized"]


def model_card(info: dict, base_model: str | None = None, metrics: dict | None = None) -> str:
    """A Hub model card: metadata through huggingface_hub's ``ModelCardData`` (the YAML front
    matter the Hub reads), the body a table of what :func:`checkpoint_info` found."""
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model or info.get("base_model")
    q = info["config"]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=list(CARD_TAGS),
                         base_model=base or None)
    lines = [
        f"# {Path(info['path']).name} (LC-QAT 2-bit)",
        "",
        f"{base or 'This model'} quantized to 2 bits per weight with LC-QAT (linear-constrained vector "
        "quantization) by [optimum-lcqat](https://pypi.org/project/optimum-lcqat/).",
        "",
        "| | |",
        "|---|---|",
        f"| method | lcqat, format version {q.get('format_version')} |",
        f"| codebook | {q.get('codebook')}, vector dim {q.get('vector_dim')}, Hadamard block {q.get('hadamard_block_size')} |",
        f"| converted linears | {info['converted_layers']} ({info['converted_weights']:,} weights) |",
        f"| bits per weight (converted linears) | {info['bits_per_weight_converted']:.3f} |",
        f"| checkpoint size | {info['size_bytes'] / 2**20:.1f} MiB |",
    ]
    for k, v in (metrics or {}).items():
        lines.append(f"| {k} | {v} |")
    lines += [
        "",
        "## How to load",
        "",
        "```bash",
        "pip install optimum-lcqat",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        f"model = AutoModelForCausalLM.from_pretrained(\"{Path(info['path']).name}\")  # lcqat registers itself",
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_model_card(path: str | os.PathLike, base_model: str | None = None, metrics: dict | None = None) -> Path:
    path = Path(path)
    card = model_card(checkpoint_info(path), base_model, metrics)
    return write_text_atomic(path / CARD_NAME, card)


def prepare_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output before any work is done (unless ``overwrite``)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    return out


def save_atomically(out: str | os.PathLike, write_fn, overwrite: bool = False) -> Path:
    """Call ``write_fn(tmp_dir)`` then move the result to ``out`` in one rename.

    An existing ``out`` is replaced only with ``overwrite``, and only after the new copy is
    complete; a failure leaves the old directory untouched.
    """
    return write_dir_atomic(prepare_output_dir(out, overwrite), write_fn)
