"""Model cards and atomic saving of lcqat checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import checkpoint_dir_files, read_layout

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
    lc = sorted(k[: -len(".codes")] for k in layout if k.endswith(".codes"))
    lc_weights = sum(numel[f"{n}.codes"] * 4 for n in lc)
    lc_bits = sum(numel[f"{n}.codes"] * 8 + 16 * sum(numel[f"{n}.{s}"] for s in ("A", "beta", "s_u", "s_v")) for n in lc)
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


def model_card(info: dict, base_model: str | None = None, metrics: dict | None = None) -> str:
    """A Hub model card with the Hub's metadata conventions (YAML front matter)."""
    base = base_model or info.get("base_model")
    q = info["config"]
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:",
            "- optimum-lcqat", "- lcqat", "- 2-bit", "- quantized"]
    if base:
        meta.append(f"base_model: {base}")
    meta.append("---")
    lines = meta + [
        "",
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
    return "\n".join(lines)


def write_model_card(path: str | os.PathLike, base_model: str | None = None, metrics: dict | None = None) -> Path:
    path = Path(path)
    card = model_card(checkpoint_info(path), base_model, metrics)
    out = path / CARD_NAME
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, out)
    return out


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
    out = prepare_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
