"""lm-evaluation-harness on lcqat models, for real: in memory (HFLM) and by path through
`optimum-lcqat lm-eval`, with the offline tasks shipped in optimum_lcqat/tasks."""

import json
import math
import subprocess
import sys

import pytest

from optimum_lcqat.tasks import TASKS_DIR
from optimum_lcqat.tasks.utils import last_word_examples


def test_last_word_examples_are_prose_with_a_word_target():
    ex = last_word_examples(["Intro\n\n" + " ".join(["word"] * 30) + " ending.\n\n    code = 1\n    more = 2\n"])
    assert ex == [{"context": " ".join(["word"] * 30), "target": "ending"}]


def test_hflm_in_memory_on_smollm2_lcqat(smollm2_lcqat, smollm2_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    model, _ = smollm2_lcqat
    small = tmp_path / "small.txt"
    small.write_text(
        "Python is a programming language that lets you work quickly and integrate systems more effectively. "
        * 8
    )
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(smollm2_dir), batch_size=4, max_length=512)
    res = simple_evaluate(
        model=lm,
        tasks=["lcqat_heldout_lastword", "lcqat_heldout_ppl"],
        task_manager=TaskManager(include_path=TASKS_DIR),
        limit=12,
        metadata={"text_files": [str(small)]},
    )
    r = res["results"]
    acc = r["lcqat_heldout_lastword"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    ppl = r["lcqat_heldout_ppl"]
    wp, bp, bpb = ppl["word_perplexity,none"], ppl["byte_perplexity,none"], ppl["bits_per_byte,none"]
    # (a data-free 2-bit model is far from full precision: the check is that lm-eval scored the
    # text through the LC layers and that its metrics are consistent, not a quality bar)
    assert math.isfinite(wp) and wp > bp > 1.0
    assert bpb == pytest.approx(math.log2(bp), rel=1e-6)


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
    assert "acc,none" in data["results"]["lcqat_heldout_lastword"]
