"""The optimum-lcqat command: real subprocesses, exit codes and messages a script can rely on."""

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from helpers import lc_names


def cli(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-P", "-m", "optimum_lcqat.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tiny_fp_dirs, smollm2_dir, tmp_path_factory):
    # A tiny llama with a real tokenizer (SmolLM2's), vocab resized to match.
    from helpers import make_tiny_model

    d = tmp_path_factory.mktemp("tiny_tok")
    model = make_tiny_model("llama")
    model.resize_token_embeddings(49152)
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, d / f)
    return d


def test_help_explains_every_subcommand():
    out = cli("--help")
    assert out.returncode == 0
    for sub in ("quantize", "eval", "info", "push", "lm-eval", "demo"):
        assert sub in out.stdout
    q = cli("quantize", "--help").stdout
    for opt in ("--text", "--split", "--dataset", "--num-samples", "--qat-tokens", "--overwrite", "--codebook", "--e2e-steps"):
        assert opt in q


def test_quantize_info_eval_and_refusals(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "q"
    r = cli("quantize", tiny_with_tokenizer, out)
    assert r.returncode == 0, r.stderr
    assert lc_names(AutoModelForCausalLM.from_pretrained(out))
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "optimum-lcqat" in card and "pip install optimum-lcqat" in card

    info = cli("info", out, "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["quant_method"] == "lcqat" and data["format_version"] == 2 and data["converted_layers"] == 14
    assert 2.0 < data["bits_per_weight_converted"] < 3.0

    # an existing output is refused before any work, and left untouched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = cli("quantize", tiny_with_tokenizer, out)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    ev = cli("eval", out, "--text", text, "--ctx", "128", "--json")
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert res["ppl"] > 1 and res["tokens_scored"] > 0


def test_quantize_with_calibration_runs_the_end_to_end_stage_in_memory(tiny_with_tokenizer, tmp_path):
    """A local model that fits takes the in-memory PTQ with the default end-to-end stage (the
    streaming PTQ has none: --e2e-steps 0 selects it, tested in test_streaming.py)."""
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Sentence {i} says something about item {i % 7} and its colour." for i in range(400)))
    out = tmp_path / "q"
    r = cli("-v", "quantize", tiny_with_tokenizer, out, "--text", text, "--num-samples", "16", "--seqlen", "64")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "in-memory PTQ (with 16 end-to-end steps" in r.stderr
    assert "end-to-end fine-tune, 16 steps" in r.stderr
    assert lc_names(AutoModelForCausalLM.from_pretrained(out))


@pytest.mark.parametrize(
    "args,code,msg",
    [
        (("info", "/nonexistent/dir"), 2, "no config.json"),
        (("eval", "/nonexistent/dir", "--split", "heldout"), 2, "neither a local directory"),
        (("eval", "smollm2", "--text", "/nonexistent.txt"), 2, "does not exist"),
        (("eval", "smollm2"), 2, "exactly one of"),
        (("quantize", "smollm2", "/tmp/x", "--codebook", "bad"), 2, "invalid choice"),
        (("quantize", "smollm2", "/tmp/optimum-lcqat-never", "--hadamard-block-size", "100"), 2, "hadamard_block_size"),
    ],
)
def test_bad_input_exit_codes(args, code, msg):
    r = cli(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert msg in r.stderr
    assert "Traceback" not in r.stderr


def test_lm_eval_without_lm_eval_installed_names_the_extra():
    # lm-eval is installed here: make `import lm_eval` fail in the child the way a missing package does
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from optimum_lcqat.cli import main\n"
            "sys.exit(main(['lm-eval', '--tasks', 'lcqat_heldout_ppl', '--model', 'hf']))")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "lm-evaluation-harness is not installed" in r.stderr
    assert "pip install 'optimum-lcqat[eval]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_info_refuses_a_float_checkpoint(tiny_fp_dirs):
    r = cli("info", tiny_fp_dirs["llama"])
    assert r.returncode == 2 and "not an lcqat checkpoint" in r.stderr


def test_machine_description_of_the_demo_and_benchmarks():
    # The demo's JSON and every benchmark describe their machine with optimum_lcqat._machine.
    from optimum_lcqat import demo
    from optimum_lcqat._machine import cpu_info, git_commit

    info = cpu_info()
    assert info["model"] and info["logical_cpus"] >= 1 and isinstance(info["flags"], list)
    m = demo._machine()
    assert m["cpu"] == info["model"] and m["cores"] == info["logical_cpus"]
    assert git_commit("/") is None  # not a checkout: no commit, no error
    # the installed copy the tests import is not a source checkout: no (foreign) commit is recorded
    assert m["git_commit"] is None and m["optimum_lcqat"]
