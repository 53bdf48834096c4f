"""Dataset builders and result processing for the shipped offline lm-eval tasks.

(lm-eval imports this file by path through ``!function utils.<name>`` in the task YAML.)
"""

from __future__ import annotations

import re


def _texts(text_files=None):
    from optimum_lcqat.data import read_text_files, split_texts

    if text_files:
        return read_text_files(list(text_files))
    return split_texts("heldout")


def load_documents(text_files=None, **kwargs):
    """One document per text (file)."""
    import datasets

    docs = [t for t in _texts(text_files) if t.strip()]
    if not docs:
        raise ValueError("lcqat_heldout_ppl: no non-empty text to evaluate")
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": docs})})


_WORD = re.compile(r"^[A-Za-z]{3,}$")


def last_word_examples(texts, min_words: int = 25, max_words: int = 120):
    """(context, target) pairs: prose paragraphs whose last token is a plain word."""
    out = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            lines = [l for l in para.splitlines() if l.strip()]
            # prose only: skip code blocks, directives, tables and headings
            if not lines or any(l.startswith((" ", "\t", "..", "*", "-", "=", ">>>", "|", "+")) for l in lines):
                continue
            words = " ".join(l.strip() for l in lines).split()
            if not (min_words <= len(words) <= max_words):
                continue
            last = words[-1].rstrip(".,;:!?")
            if not _WORD.match(last):
                continue
            context = " ".join(words[:-1])
            out.append({"context": context, "target": last})
    return out


def load_last_word(text_files=None, **kwargs):
    import datasets

    ex = last_word_examples(_texts(text_files))
    if not ex:
        raise ValueError("lcqat_heldout_lastword: no usable paragraph in the text")
    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict({"context": [e["context"] for e in ex], "target": [e["target"] for e in ex]})}
    )


def process_rolling(doc, results):
    (loglikelihood,) = results
    text = doc["page"]
    n_words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, n_words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
