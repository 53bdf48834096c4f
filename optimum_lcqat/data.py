"""Local text corpora and the project's fixed splits (nothing here touches the network).

Sources:
* ``pydoc_data.topics`` (ships with every CPython): the interactive help topics.
* Debian's ``python3.11-doc``: the reST sources of the Python documentation under
  ``/usr/share/doc/python3.11/html/_sources`` (``scripts/setup.sh`` installs it).

Splits, disjoint by construction:
* ``heldout``: the Python tutorial (``tutorial/*.rst.txt``). Only ever *evaluated* on.
* ``calibration``: ``pydoc_data.topics``. PTQ calibration data.
* ``train``: the rest of the Python docs (library, reference, howto, faq, ...), without the
  tutorial. QAT training data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PYDOC_SOURCES = Path(os.environ.get("OPTIMUM_LCQAT_PYDOCS", "/usr/share/doc/python3.11/html/_sources"))
HELDOUT_DIR = "tutorial"
SPLITS = ("heldout", "calibration", "train")


def _docs_root() -> Path:
    if not PYDOC_SOURCES.is_dir():
        raise FileNotFoundError(
            f"{PYDOC_SOURCES} not found: install Debian's python3.11-doc "
            "(`apt-get install python3.11-doc`; scripts/setup.sh does it) or set OPTIMUM_LCQAT_PYDOCS."
        )
    return PYDOC_SOURCES


def pydoc_topic_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def python_doc_texts(subset: str) -> list[str]:
    """``subset``: ``"tutorial"`` (held-out) or ``"rest"`` (everything else)."""
    root = _docs_root()
    files = sorted(root.rglob("*.rst.txt"))
    if subset == "tutorial":
        files = [f for f in files if f.relative_to(root).parts[0] == HELDOUT_DIR]
    elif subset == "rest":
        files = [f for f in files if f.relative_to(root).parts[0] != HELDOUT_DIR]
    else:
        raise ValueError(f"subset must be 'tutorial' or 'rest', got {subset!r}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def split_texts(split: str) -> list[str]:
    """The texts of one of :data:`SPLITS`."""
    if split == "heldout":
        return python_doc_texts("tutorial")
    if split == "calibration":
        return pydoc_topic_texts()
    if split == "train":
        return python_doc_texts("rest")
    raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


def read_text_files(paths: list[str | os.PathLike]) -> list[str]:
    """Texts from local ``.txt``/``.md``/``.rst`` files (one text per file) or ``.jsonl`` files
    (one text per line, from the ``text`` field)."""
    import json

    texts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist")
        if p.suffix == ".jsonl":
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{i + 1}: not valid JSON ({exc})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"{p}:{i + 1}: each JSONL line needs a string field 'text'")
                texts.append(rec["text"])
        else:
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
    return texts


def token_stream(texts: list[str], tokenizer, max_tokens: int | None = None):
    """Concatenate texts (EOS between them) into one 1-D LongTensor of token ids."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    out = torch.tensor(ids if max_tokens is None else ids[:max_tokens], dtype=torch.long)
    return out


class TokenWindows(torch.utils.data.Dataset):
    """Consecutive non-overlapping windows of ``seqlen`` tokens of a 1-D token stream, as
    causal-LM examples (labels = inputs; the model shifts them). A short tail is dropped."""

    def __init__(self, tokens: torch.Tensor, seqlen: int):
        if seqlen <= 0:
            raise ValueError(f"seqlen must be positive, got {seqlen}")
        n = tokens.numel() // seqlen
        if n == 0:
            raise ValueError(f"the training text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
        self.ids = tokens[: n * seqlen].view(n, seqlen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def token_windows(texts: list[str], tokenizer, seqlen: int, max_tokens: int | None = None) -> TokenWindows:
    """The training set of QAT (the CLI/demo recipe, examples/train_lcqat.py, benchmarks/qat.py):
    ``texts`` tokenized into one stream (:func:`token_stream`: EOS between texts, at most
    ``max_tokens`` tokens) cut into :class:`TokenWindows` of ``seqlen`` tokens."""
    return TokenWindows(token_stream(texts, tokenizer, max_tokens=max_tokens), seqlen)
