"""The peak-memory prediction (optimum_lcqat.memory_plan) and the paths it chooses or refuses.

Each run is `optimum-lcqat quantize` (or from_pretrained) in a fresh interpreter, with the memory
budget set by OPTIMUM_LCQAT_MEMORY_LIMIT; the measured peak is that process's VmHWM, printed by
the CLI beside the prediction it made before loading anything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from optimum_lcqat import memory_plan as mp


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != mp.LIMIT_ENV}
    env.update({"TQDM_DISABLE": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"), **extra})
    return env


def _cli(args, **env):
    return subprocess.run([sys.executable, "-P", "-m", "optimum_lcqat.cli", "quantize", *args], capture_output=True,
                          text=True, env=_env(**env), timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 4-layer Llama (width 256) with the SmolLM2 tokenizer, saved as fp32 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from optimum_lcqat.assets import smollm2_path

    d = tmp_path_factory.mktemp("mp") / "tiny"
    torch.manual_seed(0)
    c = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=1, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(c, dtype=torch.float32).save_pretrained(d)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from pydoc_data.topics import topics

    p = tmp_path_factory.mktemp("mp") / "calib.txt"
    p.write_text("\n\n".join(topics[k] for k in sorted(topics)[:120]))
    return p


def _figures(stdout: str) -> tuple[float, float]:
    m = re.search(r"peak RSS ([0-9.]+) GiB \(predicted ([0-9.]+) GiB\)", stdout)
    assert m, stdout[-2000:]
    return float(m.group(1)), float(m.group(2))


def test_parse_bytes_and_budget_from_the_environment(monkeypatch):
    assert mp.parse_bytes("6GiB") == 6 * 2**30 and mp.parse_bytes("6G") == 6 * 2**30
    assert mp.parse_bytes("1.5 GB") == 1_500_000_000 and mp.parse_bytes("512MiB") == 2**29
    assert mp.parse_bytes("1234") == 1234
    with pytest.raises(ValueError, match="not a memory size"):
        mp.parse_bytes("six gigs")
    monkeypatch.setenv(mp.LIMIT_ENV, "3GiB")
    assert mp.memory_budget() == (3 * 2**30, f"{mp.LIMIT_ENV}=3GiB")
    monkeypatch.setenv(mp.LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=mp.LIMIT_ENV):
        mp.memory_budget()
    monkeypatch.delenv(mp.LIMIT_ENV)
    budget, source = mp.memory_budget()
    assert mp.current_rss() < budget < 2**50 and "this process" in source


def test_shape_from_config_reads_no_weight(tiny):
    shape = mp.ModelShape.from_pretrained_config(tiny)
    assert shape.hidden == 256 and shape.widest == 768 and shape.layers == 4 and shape.vocab == 49152
    block = 256 * 256 * 2 + 256 * 64 * 2 + 3 * 256 * 768
    assert shape.linear_weights == 4 * block and shape.largest_linear == 256 * 768
    assert shape.params == 4 * block + 49152 * 256 + 9 * 256  # tied head, 2 norms a block + the final one


def test_in_memory_prediction_against_the_measured_peak(tiny, calib, tmp_path):
    """The in-memory PTQ (end-to-end stage included): printed before loading, within a band of the
    peak the same process reaches; the prediction errs high, never far."""
    r = _cli([str(tiny), str(tmp_path / "out"), "--text", str(calib), "--num-samples", "12", "--seqlen", "256",
              "--e2e-steps", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "in-memory PTQ: predicted peak" in r.stdout
    peak, predicted = _figures(r.stdout)
    print(f"in-memory PTQ: measured {peak:.2f} GiB, predicted {predicted:.2f} GiB")
    assert peak <= predicted * 1.05 and predicted <= peak * 1.5, (peak, predicted)


def test_a_budget_the_in_memory_path_exceeds_streams_within_it(tiny, calib, tmp_path):
    """With a budget below the in-memory prediction (and above the streaming one) the command
    streams instead, says why, and stays inside the budget. The streaming path's end-to-end stage
    holds the whole 2-bit model (on this small model, about what the in-memory path holds): with it
    the same budget is refused, naming --e2e-steps 0."""
    shape = mp.ModelShape.from_pretrained_config(tiny)
    from optimum_lcqat import LCQATConfig

    base = 450 * 2**20
    cfg = LCQATConfig(num_samples=12, model_seqlen=256, ptq_e2e_steps=2)
    mem = mp.in_memory_ptq(shape, cfg, base=base).total
    st = mp.streaming_ptq(shape, LCQATConfig(num_samples=12, model_seqlen=256, ptq_e2e_steps=0), base=base).total
    assert st < mem and mp.streaming_ptq(shape, cfg, base=base).total > (mem + st) // 2
    limit = (mem + st) // 2
    args = [str(tiny), str(tmp_path / "out"), "--text", str(calib), "--num-samples", "12", "--seqlen", "256"]
    r = _cli(args + ["--e2e-steps", "2"], **{mp.LIMIT_ENV: str(limit)})
    assert r.returncode == 2 and "streaming PTQ instead" in r.stdout, (r.stdout, r.stderr[-3000:])
    assert "end-to-end stage on the 2-bit model" in r.stderr and "--e2e-steps 0" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    r = _cli(args + ["--e2e-steps", "0"], **{mp.LIMIT_ENV: str(limit)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "streaming PTQ: predicted peak" in r.stdout, r.stdout
    peak, predicted = _figures(r.stdout)
    print(f"streaming PTQ: measured {peak:.2f} GiB, predicted {predicted:.2f} GiB, budget {limit / 2**30:.2f} GiB")
    assert peak * 2**30 <= limit
    assert peak <= predicted * 1.05 and predicted <= peak * 1.5, (peak, predicted)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == "lcqat"


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory, tiny):
    """Llama-3.2-1B's config and a tokenizer, no weights: every check below happens before loading."""
    from transformers import AutoTokenizer, LlamaConfig

    d = tmp_path_factory.mktemp("mp") / "llama-1b"
    LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(d)
    return d


def test_the_1b_config_is_refused_with_numbers_where_it_cannot_stream(llama_1b, calib, tmp_path):
    """QAT needs the whole model: above the budget the command stops before loading, exit 2, with
    the prediction, the budget and the ways out; --no-memory-check would run it."""
    r = _cli([str(llama_1b), str(tmp_path / "out"), "--text", str(calib), "--qat-tokens", "4096"], **{mp.LIMIT_ENV: "8GiB"})
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    msg = r.stderr
    # (the larger of the PTQ before the QAT and the QAT itself)
    assert re.search(r"(QAT|in-memory PTQ): predicted peak [0-9.]+ GiB .* above the 8.00 GiB available", msg), msg
    assert "--no-memory-check" in msg and "streaming PTQ" in msg and "Traceback" not in msg
    assert not (tmp_path / "out").exists()
    shape = mp.ModelShape.from_pretrained_config(llama_1b)
    assert 1.2e9 < shape.params < 1.3e9


def test_the_1b_config_streams_when_memory_is_short(llama_1b, calib, tmp_path):
    """Calibration text from a local folder: above the budget the in-memory PTQ gives way to the
    streaming one (which then needs the weights this folder lacks: the point is the choice)."""
    r = _cli([str(llama_1b), str(tmp_path / "out"), "--text", str(calib)], **{mp.LIMIT_ENV: "9GiB"})
    assert "streaming PTQ instead" in r.stdout and "streaming PTQ: predicted peak" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert r.returncode == 2 and "no model.safetensors" in r.stderr, r.stderr[-2000:]


def test_from_pretrained_refuses_a_ptq_above_the_budget(tiny, calib):
    code = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from optimum_lcqat import LCQATConfig
from optimum_lcqat.memory_plan import MemoryPlanError
tok = AutoTokenizer.from_pretrained({str(tiny)!r})
cfg = LCQATConfig(dataset=[open({str(calib)!r}).read()], tokenizer=tok, num_samples=4, model_seqlen=64)
try:
    AutoModelForCausalLM.from_pretrained({str(tiny)!r}, quantization_config=cfg)
except MemoryPlanError as exc:
    print("REFUSED", exc)
    sys.exit(0)
sys.exit(3)
"""
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                       env=_env(**{mp.LIMIT_ENV: "200MiB"}), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"REFUSED in-memory PTQ: predicted peak [0-9.]+ GiB .* above the 0.20 GiB available", r.stdout)
    assert "quantize_streaming" in r.stdout and "memory_check" in r.stdout
