"""Serving in vLLM (optimum_lcqat/vllm_plugin.py), with real vLLM processes on its CPU backend.

vLLM 0.32 pins transformers <5.20, so it lives in its own venv (scripts/setup_vllm.sh;
scripts/test.sh builds it and sets OPTIMUM_LCQAT_VLLM_PYTHON and OPTIMUM_LCQAT_REQUIRE_VLLM=1,
so in CI these tests run and cannot skip). Checkpoints and the transformers reference decode
are made here, in the test environment; vLLM runs in the venv, in child processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import run_process_group

from optimum_lcqat._server import free_port, wait_for_health

CHILD = Path(__file__).with_name("vllm_child.py")
DEFAULT_VENV = Path.home() / ".cache" / "optimum_lcqat" / "vllm-venv"


@pytest.fixture(scope="module")
def vllm_python() -> str:
    py = os.environ.get("OPTIMUM_LCQAT_VLLM_PYTHON") or str(DEFAULT_VENV / "bin" / "python")
    if not Path(py).exists():
        msg = f"no vLLM venv at {py}: run bash scripts/setup_vllm.sh (scripts/test.sh does)"
        if os.environ.get("OPTIMUM_LCQAT_REQUIRE_VLLM"):
            pytest.fail(msg)
        pytest.skip(msg)
    return py


def vllm_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_PLUGINS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_LOGGING_LEVEL="WARNING")
    env.update(extra)
    return env


def run_llm(py: str, args: dict, timeout: int = 600, **env) -> dict:
    # The offline LLM's engine core in the child itself (vLLM's VLLM_ENABLE_V1_MULTIPROCESSING=0):
    # the same engine without a second process that imports vLLM again, ~half the time of a test
    # (`vllm serve` below keeps vLLM's default process layout; tensor-parallel workers are processes).
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env}
    r = run_process_group([py, str(CHILD), json.dumps(args)], timeout, env=vllm_env(**env), cwd="/")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"vLLM child failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def with_tokenizer(src: Path, dst: Path, tokenizer_dir: Path) -> Path:
    """A copy of checkpoint ``src`` with the tokenizer files vLLM loads from the same folder."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(dst)
    return dst


def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    out = []
    for p in prompts:
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        toks = g.sequences[0, len(p):].tolist()
        lps = [float(torch.log_softmax(s[0].double(), -1)[t]) for s, t in zip(g.scores, toks)]
        out.append({"tokens": toks, "logprobs": lps})
    return out


def held_out_prompts(tok, n: int = 4) -> list[list[int]]:
    from optimum_lcqat.data import split_texts

    texts = [t for t in split_texts("heldout") if len(t) > 200]
    return [tok(t[:120]).input_ids[:24] for t in texts[:n]]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_llm_greedy_matches_transformers(served):
    """``LLM(model=DIR)`` with no quantization flag serves the lcqat checkpoint; its greedy tokens
    equal transformers' greedy decode of the same checkpoint: 4 held-out prompts x 32 tokens,
    where fp32 summation order may make a later step drift: then the first 16 tokens are equal
    and every logprob of the common prefix within 2e-3."""
    from transformers import AutoModelForCausalLM

    lc_dir, prompts = served["dirs"]["smollm2"], served["prompts"]["smollm2"]
    got = served["results"]["smollm2"]
    assert "error" not in got, got.get("traceback")
    model = AutoModelForCausalLM.from_pretrained(lc_dir, dtype=torch.float32)
    ref = hf_greedy(model, prompts, 32)
    assert got["quantization"] == "lcqat"
    report = []
    for r, g in zip(ref, got["outputs"]):
        n = common_prefix(r["tokens"], g["tokens"])
        diff = max(abs(a - b) for a, b in zip(r["logprobs"][:n], g["logprobs"][:n]))
        report.append((n, diff))
        assert n >= 16, (r["tokens"], g["tokens"], report)
        assert diff < 2e-3, report
    print("common prefix / max logprob diff per prompt:", report)


def make_tiny_llama(path: Path, tokenizer_dir: Path, tie_word_embeddings: bool = False, **cfg_kw) -> Path:
    """A random-weight Llama whose head counts divide by 2 (SmolLM2's 9 heads do not), widths on
    whole Hadamard blocks per tensor-parallel rank, quantized data-free and saved with a tokenizer."""
    import transformers as tf

    from optimum_lcqat import LCQATConfig

    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=tie_word_embeddings, initializer_range=0.08)
    dense = tf.LlamaForCausalLM(cfg)
    dense.save_pretrained(path / "fp")
    model = tf.AutoModelForCausalLM.from_pretrained(path / "fp", dtype=torch.float32,
                                                    quantization_config=LCQATConfig(**cfg_kw))
    model.save_pretrained(path / "lc")
    tok.save_pretrained(path / "lc")
    return path / "lc"


def make_tiny_moe(path: Path, tokenizer_dir: Path, arch: str) -> Path:
    """A random-weight MoE (8 experts, top-2; widths on whole Hadamard blocks, head_dim 64 for vLLM's
    CPU attention), quantized data-free with its experts and saved with a tokenizer."""
    import transformers as tf

    from optimum_lcqat import LCQATConfig

    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False)
    if arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, head_dim=64, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=True)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2)
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=128, num_experts=8, num_experts_per_tok=2)
    elif arch == "qwen2_moe":  # a shared expert (plain linears, LC) beside the routed ones; its 1-output gate dense
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=512, moe_intermediate_size=128, shared_expert_intermediate_size=256,
                                num_experts=8, num_experts_per_tok=2)
    elif arch == "gpt_oss":
        cfg = tf.GptOssConfig(**common, head_dim=64, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
                              sliding_window=128)
    else:
        raise ValueError(arch)
    dense = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # a router that spreads the tokens
        for n, p in dense.named_parameters():
            if n.endswith(("gate.weight", "router.weight")):
                p.normal_(0, 0.3)
    dense.save_pretrained(path / "fp")
    model = tf.AutoModelForCausalLM.from_pretrained(path / "fp", dtype=torch.float32, quantization_config=LCQATConfig())
    model.save_pretrained(path / "lc")
    tok.save_pretrained(path / "lc")
    return path / "lc"


MOE_ARCHS = ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_lcqat, smollm2_dir, vllm_python) -> dict:
    """The single-process checkpoints of this module served by one vLLM process, one after another
    (one import of vLLM; its engine core in process): the data-free SmolLM2 (4 held-out prompts x
    32 tokens) and the tiny MoE of each architecture (2 prompts x 16 tokens). Each run's result, or
    the error that stopped it, by name; the tests check theirs against transformers."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("served")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    dirs, prompts, runs = {}, {}, []
    # the MoE models first: vLLM makes its expert-parallel group with the process's first engine,
    # and only for a MoE model (a MoE engine after a dense one fails: "EP group is not initialized")
    for arch in MOE_ARCHS + ["gpt_oss"]:
        dirs[arch] = make_tiny_moe(tmp / arch, smollm2_dir, arch)
        prompts[arch] = held_out_prompts(tok, n=2)
        runs.append({"model": str(dirs[arch]), "prompts": prompts[arch], "max_tokens": 16})
    dirs["smollm2"] = with_tokenizer(smollm2_lcqat[1], tmp / "smollm2", smollm2_dir)
    prompts["smollm2"] = held_out_prompts(tok)
    runs.append({"model": str(dirs["smollm2"]), "prompts": prompts["smollm2"], "max_tokens": 32})
    r = run_process_group([vllm_python, str(CHILD), json.dumps({"runs": runs})], 900,
                          env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), cwd="/")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"vLLM child failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return {"dirs": dirs, "prompts": prompts, "results": dict(zip(dirs, json.loads(lines[-1][len("RESULT "):])))}


def test_moe_experts_served_equal_transformers_and_gpt_oss_refused(served):
    """MoE models whose experts are LC layers (experts.gate_up.<e>, experts.down.<e>) are served by
    vLLM (LCQATFusedMoEMethod under vLLM's own routing): Qwen3-MoE, Mixtral (keys under
    block_sparse_moe / w1, w2), OLMoE, Qwen2-MoE (a shared expert of plain LC linears): greedy
    tokens equal transformers' decode of each checkpoint, logprobs within 2e-3 (fp32). gpt-oss's
    experts (biased, a clamped SwiGLU) are refused with the reason."""
    from transformers import AutoModelForCausalLM

    got = served["results"]
    for arch in MOE_ARCHS:
        assert "error" not in got[arch], (arch, got[arch].get("traceback"))
        assert got[arch]["quantization"] == "lcqat"
        model = AutoModelForCausalLM.from_pretrained(served["dirs"][arch], dtype=torch.float32)
        for ref, out in zip(hf_greedy(model, served["prompts"][arch], 16), got[arch]["outputs"]):
            assert ref["tokens"] == out["tokens"], (arch, ref["tokens"], out["tokens"])
            assert max(abs(a - b) for a, b in zip(ref["logprobs"], out["logprobs"])) < 2e-3, arch
    refused = got["gpt_oss"].get("error", "") + got["gpt_oss"].get("traceback", "")
    assert "LC experts are served for gated SiLU/GELU experts" in refused and "expert biases" in refused, got["gpt_oss"]


def test_tensor_parallel_2_equals_one_process(tmp_path, smollm2_dir, vllm_python):
    """The same lcqat checkpoint served with tensor_parallel_size=2 (two worker processes over
    gloo; q/k/v and gate/up split by output rows, o/down by input columns through
    LCWeight.shard; the head tied to the embedding, as in SmolLM2 and Llama-3.2-1B, and saved as
    an int8 copy (lm_head_int8) split by vocabulary rows, the embedding lookup left dense) gives
    the tokens one process gives: transformers' greedy decode of the checkpoint here
    (test_llm_greedy_matches_transformers ties vLLM's single-process output to it; a vLLM TP1
    engine as the reference would cost another ~45 s engine start)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lc_dir = make_tiny_llama(tmp_path, smollm2_dir, tie_word_embeddings=True, lm_head_int8=True)
    from safetensors import safe_open

    with safe_open(str(lc_dir / "model.safetensors"), "pt") as f:
        assert {"lm_head.weight_int8", "model.embed_tokens.weight"} <= set(f.keys()) and "lm_head.weight" not in f.keys()
    assert json.loads((lc_dir / "config.json").read_text())["tie_word_embeddings"] is True
    prompts = held_out_prompts(AutoTokenizer.from_pretrained(smollm2_dir))
    one = hf_greedy(AutoModelForCausalLM.from_pretrained(lc_dir, dtype=torch.float32), prompts, 16)
    two = run_llm(vllm_python, {"model": str(lc_dir), "prompts": prompts, "max_tokens": 16, "tp": 2})
    for a, b in zip(one, two["outputs"]):
        assert a["tokens"] == b["tokens"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3


def test_fused_layer_mixing_lc_and_dense_is_named(tmp_path, smollm2_dir, vllm_python):
    """k_proj kept dense while q_proj and v_proj are 2-bit: vLLM fuses them into qkv_proj, which
    the plugin cannot serve; the error names the layer and its parts."""
    lc_dir = make_tiny_llama(tmp_path, smollm2_dir, modules_to_not_convert=["k_proj", "lm_head"])
    r = run_process_group([vllm_python, str(CHILD), json.dumps({"model": str(lc_dir), "prompts": [[1, 2, 3]], "max_tokens": 2})],
                          600, env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), cwd="/")
    out = r.stdout + r.stderr  # vLLM's workers log to stdout
    assert r.returncode != 0
    assert "vLLM fuses" in out and "'model.layers.0.self_attn.qkv_proj'" in out and \
        "['model.layers.0.self_attn.k_proj'] dense" in out and "Quantize all of them" in out, out[-4000:]


def test_vllm_serve_answers_completions(smollm2_lcqat, smollm2_dir, tmp_path, vllm_python):
    """``vllm serve DIR`` (the venv's console script, no quantization flag) on 127.0.0.1 answers
    an OpenAI-style completions request with transformers' greedy continuation. (vllm-cpu's
    console script needs the "vllm" metadata alias that scripts/setup_vllm.sh writes.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, saved = smollm2_lcqat
    lc_dir = with_tokenizer(saved, tmp_path / "lc", smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = "The Python interpreter reads a program from"
    model = AutoModelForCausalLM.from_pretrained(lc_dir, dtype=torch.float32)
    expected = tok.decode(hf_greedy(model, [tok(prompt).input_ids], 8)[0]["tokens"])
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    vllm_bin = str(Path(vllm_python).with_name("vllm"))
    proc = subprocess.Popen([vllm_bin, "serve", str(lc_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"],
                            stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), cwd="/", start_new_session=True)
    try:
        why = wait_for_health(proc, port, 420, interval=2)
        assert why is None, f"vllm serve {why}:\n" + (tmp_path / "serve.log").read_text()[-6000:]
        body = json.dumps({"model": str(lc_dir), "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        proc.terminate()  # vLLM stops its engine process on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and every process it started
            proc.wait()
        log.close()
    assert answer["choices"][0]["text"] == expected, (answer, expected)
    assert answer["usage"]["completion_tokens"] == 8



def test_lm_eval_vllm_backend_agrees_with_hf(smollm2_lcqat, smollm2_dir, tmp_path, vllm_python):
    """``optimum-lcqat lm-eval --model vllm`` (lm-eval's vLLM backend, in the venv; its engine core
    in-process as in run_llm, 29 s where vLLM's default three processes take 66 s: `vllm serve`
    below runs that layout) and lm-eval's HF backend (transformers, here, on the same checkpoint in memory; the CLI's
    HF path is tests/test_lm_eval.py's) score the shipped held-out perplexity task alike: per-byte
    log-likelihood within 1e-3 relative (fp32 on both sides; they differ in summation order only).
    lm-eval 0.4.13's vLLM backend cuts the rolling windows at max_model_len - 2 tokens and the HF
    backend at max_length: 510 on both here, so the windows are the same (512 vs 512 differs by
    ~3% in byte perplexity from the windows alone)."""
    import math

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from optimum_lcqat.tasks import TASKS_DIR

    model, saved = smollm2_lcqat
    lc_dir = with_tokenizer(saved, tmp_path / "lc", smollm2_dir)
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(lc_dir), max_length=510, batch_size=1)
    hf = simple_evaluate(model=lm, tasks=["lcqat_heldout_ppl"], limit=2,
                         task_manager=TaskManager(include_path=TASKS_DIR))["results"]["lcqat_heldout_ppl"]
    out = tmp_path / "vllm"
    r = run_process_group([vllm_python, "-m", "optimum_lcqat.cli", "lm-eval", "--model", "vllm", "--model_args",
                           f"pretrained={lc_dir},dtype=float32,enforce_eager=True,max_model_len=512",
                           "--tasks", "lcqat_heldout_ppl", "--limit", "2", "--output_path", str(out)],
                          900, env=vllm_env(HF_DATASETS_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0"), cwd="/")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    files = list(out.rglob("results_*.json"))
    assert files, r.stdout[-2000:]
    vl = json.loads(files[0].read_text())["results"]["lcqat_heldout_ppl"]
    for metric in ("byte_perplexity,none", "word_perplexity,none"):
        a, b = math.log(hf[metric]), math.log(vl[metric])
        assert abs(a - b) <= 1e-3 * abs(a), (metric, hf[metric], vl[metric])
