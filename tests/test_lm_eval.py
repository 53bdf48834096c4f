"""lm-evaluation-harness on lcqat models, for real: in memory (HFLM) and by path through
`optimum-lcqat lm-eval`, with the offline tasks shipped in optimum_lcqat/tasks."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from optimum_lcqat.tasks import TASKS_DIR
from optimum_lcqat.tasks.utils import last_word_examples


def test_last_word_examples_are_prose_with_a_word_target():
    ex = last_word_examples(["Intro\n\n" + " ".join(["word"] * 30) + " ending.\n\n    code = 1\n    more = 2\n"])
    assert ex == [{"context": " ".join(["word"] * 30), "target": "ending"}]


def _heldout_snippets(tok, n_docs=3, max_tokens=480):
    """The first paragraphs of the first held-out documents, each at most ``max_tokens`` tokens
    (so that one lm-eval rolling window of 512 holds it whole)."""
    from optimum_lcqat.data import split_texts

    out = []
    for text in split_texts("heldout")[:n_docs]:
        snippet = ""
        for para in text.split("\n\n"):
            cand = snippet + para + "\n\n"
            if len(tok(cand.rstrip("\n"), add_special_tokens=False).input_ids) > max_tokens:
                break
            snippet = cand
        snippet = snippet.rstrip("\n")
        assert snippet.strip(), "the first paragraph of a held-out document no longer fits one window"
        out.append(snippet)
    return out


def _last_word_scores(model, tok, examples):
    """``[(log-likelihood of ' ' + target after context, whether greedy decoding yields it)]``,
    computed here with the model directly: the continuation is what tokenizing context + ' ' +
    target adds after the context's tokens (lm-eval's split for causal models)."""
    out = []
    for ex in examples:
        ctx = tok(ex["context"], add_special_tokens=False).input_ids
        whole = tok(ex["context"] + " " + ex["target"], add_special_tokens=False).input_ids
        assert whole[: len(ctx)] == ctx
        cont = whole[len(ctx):]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:].float()
        logp = torch.log_softmax(logits, -1)
        target = torch.tensor(cont)
        out.append((float(logp[torch.arange(len(cont)), target].sum()), bool((logits.argmax(-1) == target).all())))
    return out


def test_hflm_in_memory_rolling_loglikelihood_equals_package_perplexity(smollm2_lcqat, smollm2_dir, tmp_path):
    """lm-eval's rolling log-likelihood (lcqat_heldout_ppl) and optimum_lcqat.evaluation.perplexity
    score the same tokens with the same model: their total negative log-likelihoods must agree.

    Windowing: lm-eval's loglikelihood_rolling scores *every* token t_1..t_n of a document, the
    first conditioned on a prefix token p; a document of n <= max_length tokens is one window,
    input [p, t_1..t_{n-1}]. evaluation.perplexity cuts a stream into non-overlapping windows of
    ctx tokens and scores tokens 2..ctx of each. Fed [p, t_1..t_n] with ctx = n + 1 it is one window
    scoring exactly t_1..t_n after p. (With several windows the two differ: lm-eval's windows
    overlap by one context token, evaluation's do not, so each document here fits one window.)"""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from optimum_lcqat.evaluation import perplexity

    model, _ = smollm2_lcqat
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = _heldout_snippets(tok)
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    prefix = tok.eos_token_id  # set explicitly: the same prefix on both sides
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=512, prefix_token_id=prefix)
    res = simple_evaluate(
        model=lm,
        tasks=["lcqat_heldout_lastword", "lcqat_heldout_ppl"],
        # (the metadata goes to the TaskManager: simple_evaluate ignores its own metadata argument
        # when given a TaskManager, and the tasks would read the whole held-out tutorial instead)
        task_manager=TaskManager(include_path=TASKS_DIR, metadata={"text_files": [str(f) for f in files]}),
        log_samples=True,
    )

    # the package's own perplexity, one window per document
    own = []
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) < 512
        r = perplexity(model, torch.tensor([prefix, *ids]), ctx=len(ids) + 1, batch_size=1)
        assert r["windows"] == 1 and r["tokens_scored"] == len(ids)
        own.append(r["nll"] * r["tokens_scored"])  # total NLL (nats) of the document

    # per document: lm-eval's summed log-likelihood, in the order of the documents
    samples = sorted(res["samples"]["lcqat_heldout_ppl"], key=lambda s: s["doc_id"])
    assert [s["doc"]["page"] for s in samples] == texts
    theirs = [-float(s["filtered_resps"][0]) for s in samples]
    # measured (float32, 2-core CPU): relative differences <= 1.2e-7 on this data-free 2-bit model
    # (document NLLs 4017-4931 nats) and <= 1.1e-7 on the fp32 model (batched vs single-sequence
    # rounding); 1e-4 leaves room and still catches one token scored or dropped differently (a
    # token is ~1/450 of a document's NLL)
    for a, b in zip(theirs, own):
        assert a == pytest.approx(b, rel=1e-4)

    # and the aggregated metrics are these NLLs over the document's bytes and words
    r = res["results"]["lcqat_heldout_ppl"]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(re.split(r"\s+", t)) for t in texts)
    assert r["byte_perplexity,none"] == pytest.approx(math.exp(sum(own) / n_bytes), rel=1e-4)
    assert r["bits_per_byte,none"] == pytest.approx(sum(own) / n_bytes / math.log(2), rel=1e-4)
    assert r["word_perplexity,none"] == pytest.approx(math.exp(sum(own) / n_words), rel=1e-4)

    # last-word accuracy ran on the paragraphs of the same documents, scoring each target as the
    # model does here: the same log-likelihood per example, greedy exactly when it is here, and
    # the accuracy and perplexity are these over the examples
    examples = last_word_examples(texts)
    samples = sorted(res["samples"]["lcqat_heldout_lastword"], key=lambda s: s["doc_id"])
    assert len(examples) > 0 and [s["doc"]["target"] for s in samples] == [e["target"] for e in examples]
    own = _last_word_scores(model, tok, examples)
    for s, (ll, greedy) in zip(samples, own):
        assert float(s["filtered_resps"][0][0]) == pytest.approx(ll, rel=1e-4, abs=1e-3)
        assert s["acc"] == float(greedy)
    r = res["results"]["lcqat_heldout_lastword"]
    assert r["acc,none"] == pytest.approx(sum(g for _, g in own) / len(own))
    assert r["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in own) / len(own)), rel=1e-4)


def test_cli_lm_eval_by_path(smollm2_lcqat, tmp_path):
    _, saved = smollm2_lcqat
    # the saved folder has no tokenizer: point lm-eval at the bundled one
    from optimum_lcqat.assets import smollm2_path

    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "optimum_lcqat.cli", "lm-eval", "--model", "hf",
         "--model_args", f"pretrained={saved},tokenizer={smollm2_path()},max_length=512",
         "--tasks", "lcqat_heldout_lastword", "--limit", "8", "--batch_size", "4", "--output_path", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(out.rglob("results_*.json"))
    assert results, proc.stdout[-2000:]
    data = json.loads(results[0].read_text())
    # the first 8 examples of the shipped held-out text, scored by the saved model (the same
    # tensors as the in-memory one): lm-eval's accuracy and perplexity are what the model gives here
    from transformers import AutoTokenizer

    from optimum_lcqat.tasks.utils import load_last_word

    model, _ = smollm2_lcqat
    examples = list(load_last_word()["test"])[:8]
    own = _last_word_scores(model, AutoTokenizer.from_pretrained(smollm2_path()), examples)
    r = data["results"]["lcqat_heldout_lastword"]
    assert r["acc,none"] == pytest.approx(sum(g for _, g in own) / len(own))
    assert r["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in own) / len(own)), rel=1e-3)
