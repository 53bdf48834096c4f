"""Calibration data for the Hessian-aware PTQ: texts -> a fixed ``[num_samples, seqlen]`` token batch.

Accepted ``LCQATConfig.dataset`` values:

* a list of texts;
* a path to a local ``.txt``/``.md``/``.rst``/``.jsonl`` file, or a directory (every such file
  in it, sorted, recursively);
* any other string is taken as a ``datasets`` name (the online path): ``load_dataset(name,
  split="train")`` and its ``text`` column. Tests and benchmarks only use local data.

Sampling: the texts are tokenized and concatenated (EOS between texts), the stream is cut into
non-overlapping windows of ``seqlen`` tokens and ``num_samples`` of them are drawn without
replacement by a ``torch.Generator`` seeded with ``seed``: the same inputs give the same batch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .data import read_text_files, token_stream

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")


class CalibrationDataError(ValueError):
    """Calibration data that is missing, empty or too short."""


def load_calibration_texts(dataset: Any) -> list[str]:
    """The calibration texts named by ``dataset`` (see module docstring)."""
    if dataset is None:
        raise CalibrationDataError("lcqat PTQ: no calibration data; pass LCQATConfig(dataset=[texts], tokenizer=...).")
    if isinstance(dataset, (list, tuple)):
        texts = list(dataset)
    elif isinstance(dataset, (str, os.PathLike)):
        p = Path(dataset)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
            if not files:
                raise CalibrationDataError(f"lcqat PTQ: directory {p} holds no {'/'.join(_TEXT_SUFFIXES)} file")
            texts = read_text_files(files)
        elif p.is_file():
            texts = read_text_files([p])
        elif p.suffix in _TEXT_SUFFIXES or os.sep in str(dataset) and p.parent.is_dir():
            raise CalibrationDataError(f"lcqat PTQ: calibration file {p} does not exist")
        else:
            texts = _load_hf_dataset(str(dataset))
    else:
        raise CalibrationDataError(
            f"lcqat PTQ: dataset must be a list of texts, a local path or a datasets name, got {type(dataset).__name__}"
        )
    if not all(isinstance(t, str) for t in texts):
        raise CalibrationDataError("lcqat PTQ: every calibration text must be a str")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationDataError("lcqat PTQ: the calibration data is empty (no non-blank text)")
    return texts


def _load_hf_dataset(name: str) -> list[str]:  # pragma: no cover - needs the network
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationDataError(
            f"lcqat PTQ: {name!r} is not a local file, and loading it as a datasets name needs "
            "`pip install datasets`"
        ) from exc
    logger.info("lcqat PTQ: loading calibration dataset %r (split 'train') with datasets", name)
    ds = datasets.load_dataset(name, split="train")
    if "text" not in ds.column_names:
        raise CalibrationDataError(f"lcqat PTQ: dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"])


def resolve_tokenizer(tokenizer: Any, model=None):
    """A tokenizer object from the config's ``tokenizer`` (object, name or path); ``None`` uses the
    model's ``name_or_path`` (the GPTQ convention)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = tokenizer
    if source is None and model is not None:
        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise CalibrationDataError(
            "lcqat PTQ: no tokenizer; pass LCQATConfig(tokenizer=...) (an object, a name or a path)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


def calibration_samples(texts: list[str], tokenizer, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[num_samples, seqlen]`` token ids drawn deterministically from the texts."""
    stream = token_stream(texts, tokenizer)
    total = int(stream.numel())
    if total == 0:
        raise CalibrationDataError("lcqat PTQ: the calibration data tokenizes to 0 tokens")
    n_windows = total // seqlen
    if n_windows < num_samples:
        raise CalibrationDataError(
            f"lcqat PTQ: the calibration data has {total} tokens, {n_windows} window(s) of model_seqlen={seqlen}; "
            f"num_samples={num_samples} x model_seqlen={seqlen} needs {num_samples * seqlen} tokens. "
            "Pass more text, or lower num_samples / model_seqlen."
        )
    windows = stream[: n_windows * seqlen].view(n_windows, seqlen)
    g = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(n_windows, generator=g)[:num_samples]
    return windows[pick].clone()
