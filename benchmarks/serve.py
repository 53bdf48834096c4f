"""Serving benchmark: vLLM (CPU backend, this package's plugin) against dense fp32 and bf16.

Models: the bundled SmolLM2-135M, and a random-weight model with Llama-3.2-1B's shapes (hidden
2048, 16 layers, 32/8 heads, MLP 8192) where weights, not per-step overhead, dominate. Its
vocabulary is the SmolLM2 tokenizer's (49152, not 128256: vLLM detokenizes every generated id).
Speed does not depend on the values, so the LC checkpoints of this benchmark are data-free
(SmolLM2) or random codes and scales (the 1B one); quality is measured elsewhere.

Each (model, variant, mode) runs in a fresh vLLM engine, in vLLM's own venv
(scripts/setup_vllm.sh), one after the other: batch-1 decode tokens/s (64 new tokens, after a
warm-up; (N-1) / (t(N) - t(1))), time to first token (a 6-token prompt, 1 new token), and
aggregate output tokens/s with 1, 4, 16 and 64 concurrent requests (offline ``LLM.generate``,
32 new tokens each). Modes: ``eager`` (enforce_eager) and ``compiled`` (vLLM's default:
dynamo + inductor). Through the server (``--server-modes``, default eager): the real ``vllm
serve DIR`` on 127.0.0.1, c concurrent streaming /v1/completions requests (HTTP, one thread
each, 32 new tokens, ignore_eos): aggregate output tokens/s and the median time to the first
streamed chunk. transformers' ``generate`` (eager, batch 1) is measured beside it in this
process for the same checkpoints.

    python -P benchmarks/serve.py                    # everything (~45 min on 2 cores)
    python -P benchmarks/serve.py --models smollm2 --modes eager

Writes benchmarks/results/serve_cpu.json, .md and .png.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from _common import RESULTS, environment, md_env, write  # noqa: E402

from optimum_lcqat._atomic import atomic_path  # noqa: E402
from optimum_lcqat._server import free_port, wait_for_health  # noqa: E402

CACHE = Path.home() / ".cache" / "optimum_lcqat" / "serve_bench"
VENV_PY = Path(os.environ.get("OPTIMUM_LCQAT_VLLM_PYTHON") or Path.home() / ".cache/optimum_lcqat/vllm-venv/bin/python")
PROMPT = [504, 3125, 314, 260, 28, 416]  # 6 tokens of SmolLM2's vocabulary
CONCURRENCY = (1, 4, 16, 64)

# Runs in the vLLM venv (engine created under __main__: vLLM spawns its engine process).
_CHILD = r'''
import json, sys, time
def main():
    a = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t = time.perf_counter()
    llm = LLM(model=a["model"], dtype=a["dtype"], enforce_eager=a["eager"], max_model_len=512, seed=0,
              max_num_seqs=64)
    startup = time.perf_counter() - t
    prompt = TokensPrompt(prompt_token_ids=a["prompt"])
    sp = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm.generate([prompt] * 4, sp(8), use_tqdm=False)  # warm-up (compiles the shapes it meets)
    def timed(prompts, n):
        t = time.perf_counter(); llm.generate(prompts, sp(n), use_tqdm=False); return time.perf_counter() - t
    t1 = min(timed([prompt], 1) for _ in range(3))
    t65 = min(timed([prompt], 65) for _ in range(2))
    agg = {}
    for c in a["concurrency"]:
        # distinct prompts (prefix caching would share a repeated one)
        prompts = [TokensPrompt(prompt_token_ids=a["prompt"] + [100 + i]) for i in range(c)]
        agg[c] = c * 32 / timed(prompts, 32)
    print("RESULT " + json.dumps({"startup_s": startup, "ttft_s": t1, "decode_tok_s": 64 / (t65 - t1),
                                  "aggregate_tok_s": agg}), flush=True)
if __name__ == "__main__":
    main()
'''


def vllm_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_PLUGINS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="2",
               VLLM_LOGGING_LEVEL="WARNING")
    return env


def run_vllm(model_dir: Path, dtype: str, eager: bool, concurrency) -> dict:
    args = {"model": str(model_dir), "dtype": dtype, "eager": eager, "prompt": PROMPT, "concurrency": list(concurrency)}
    r = subprocess.run([str(VENV_PY), "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                       env=vllm_env(), cwd="/", timeout=1800)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stdout + r.stderr)[-3000:]}
    return json.loads(lines[-1][len("RESULT "):])


def _stream_completion(port: int, model: str, prompt: list[int], n: int, out: dict) -> None:
    """One streaming /v1/completions request: time to the first chunk and to the end."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                       "stream": True})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        out["error"] = f"HTTP {resp.status}: {resp.read()[:500]!r}"
        return
    first = None
    while True:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data:") and b"[DONE]" not in line and first is None:
            first = time.perf_counter() - t0
    out.update(ttft=first, end=time.perf_counter(), start=t0)
    conn.close()


def run_server(model_dir: Path, dtype: str, eager: bool, concurrency) -> dict:
    """``vllm serve`` (the venv's console script) and concurrent streaming HTTP requests."""
    port = free_port()
    cmd = [str(VENV_PY.with_name("vllm")), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, "--max-model-len", "512", "--max-num-seqs", "64", "--seed", "0"]
    if eager:
        cmd.append("--enforce-eager")
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), cwd="/")
    try:
        if wait_for_health(proc, port, 900, interval=1) is not None:
            log.seek(0)
            return {"error": "vllm serve did not come up:\n" + log.read()[-3000:]}
        startup = time.perf_counter() - t_start

        def burst(c: int, n: int) -> list[dict]:
            outs = [{} for _ in range(c)]
            ths = [threading.Thread(target=_stream_completion, args=(port, str(model_dir), PROMPT + [100 + i], n, o))
                   for i, o in enumerate(outs)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            bad = [o["error"] for o in outs if "error" in o or "end" not in o]
            if bad:
                raise RuntimeError(bad[0] if isinstance(bad[0], str) else "no response")
            return outs

        burst(4, 8)  # warm-up
        agg, ttft = {}, {}
        for c in concurrency:
            outs = burst(c, 32)
            wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
            agg[c] = c * 32 / wall
            ttft[c] = 1000 * statistics.median(o["ttft"] for o in outs)
        return {"startup_s": startup, "aggregate_tok_s": agg, "ttft_ms_median": ttft}
    except (RuntimeError, OSError) as e:
        log.seek(0)
        return {"error": f"{e}\n" + log.read()[-3000:]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        os.unlink(log.name)


# ---------------------------------------------------------------------------- checkpoints
def smollm2_dirs() -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_lcqat import LCQATConfig
    from optimum_lcqat.assets import smollm2_path

    fp = smollm2_path()
    lc = CACHE / "smollm2-lcqat-datafree"
    if not (lc / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float32, quantization_config=LCQATConfig())
        model.save_pretrained(lc)
        AutoTokenizer.from_pretrained(fp).save_pretrained(lc)
    return {"dense": Path(fp), "lcqat": lc}


def with_int8_head(lc: Path) -> Path:
    """``lc`` with its tied output projection also stored as int8 (``lm_head_int8``): what
    ``LCQATConfig(lm_head_int8=True)`` saves for a tied model (the embedding as it is, for the
    lookup, plus ``lm_head.weight_int8`` and ``lm_head.scale`` per row), built from ``lc``'s
    tensors in seconds. Cached beside ``lc``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from optimum_lcqat._atomic import write_dir_atomic
    from optimum_lcqat.nn.int8_linear import quantize_rows_int8

    out = lc.parent / (lc.name + "-int8head")
    if (out / "config.json").exists():
        return out
    conf = json.loads((lc / "config.json").read_text())
    if not conf.get("tie_word_embeddings", False):
        raise SystemExit(f"{lc}: with_int8_head builds the int8 head of a tied model only")
    with safe_open(str(lc / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # a tied model's head is its embedding (the random 1B checkpoint also holds a stray, unused
    # lm_head.weight: to_empty() broke the tie before it was saved; vLLM and transformers ignore it)
    tensors.pop("lm_head.weight", None)
    q, scale = quantize_rows_int8(tensors["model.embed_tokens.weight"])
    tensors.update({"lm_head.weight_int8": q, "lm_head.scale": scale})
    conf["quantization_config"]["lm_head_int8"] = True

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata=meta)
        (tmp / "config.json").write_text(json.dumps(conf, indent=1))
        for f in lc.iterdir():  # tokenizer and generation config as they are
            if f.is_file() and f.name not in ("model.safetensors", "config.json"):
                (tmp / f.name).write_bytes(f.read_bytes())

    return write_dir_atomic(out, write)


def llama1b_dirs() -> dict[str, Path]:
    """Llama-3.2-1B's shapes, random weights (dense fp32 checkpoint), and the same shapes as an
    lcqat checkpoint with random codes and scales (built in seconds; data-free init of 1.2B
    weights takes ~10 min on 2 cores and changes nothing here)."""
    import transformers as tf
    from safetensors.torch import save_file

    from optimum_lcqat import LCQATConfig
    from optimum_lcqat.assets import smollm2_path
    from optimum_lcqat.checkpoint import METADATA_KEY
    from optimum_lcqat.config import FORMAT_VERSION
    from optimum_lcqat.tensor.hadamard import plan_rotation
    from optimum_lcqat.tensor.lc_weight import LCWeight

    tok = tf.AutoTokenizer.from_pretrained(smollm2_path())
    dense, lc = CACHE / "llama1b-shapes-dense", CACHE / "llama1b-shapes-lcqat"
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=500000.0, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    if not (dense / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = tf.LlamaForCausalLM(cfg)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(dense)
        tok.save_pretrained(dense)
        del model
    if not (lc / "config.json").exists():
        lc.mkdir(parents=True, exist_ok=True)
        from optimum_lcqat.streaming import SourceCheckpoint

        g = torch.Generator().manual_seed(0)
        tensors = {}
        src = SourceCheckpoint(dense)  # sharded or not
        for key in src.entries:
            t = src.read(key)
            lin = key.endswith("_proj.weight") and ".layers." in key
            if not lin:
                tensors[key] = t
                continue
            m, n = t.shape
            w = LCWeight(torch.randint(0, 256, (m, n // 4), dtype=torch.uint8, generator=g),
                         torch.eye(4) * 0.01, torch.zeros(4), torch.ones(n), torch.ones(m),
                         plan_rotation(n, 128), plan_rotation(m, 128))
            tensors.update(w.state_dict(key[: -len("weight")]))
        save_file(tensors, str(lc / "model.safetensors"), metadata={"format": "pt", METADATA_KEY: str(FORMAT_VERSION)})
        qc = LCQATConfig().to_dict()
        conf = json.loads((dense / "config.json").read_text())
        conf["quantization_config"] = qc
        (lc / "config.json").write_text(json.dumps(conf, indent=1))
        tok.save_pretrained(lc)
    return {"dense": dense, "lcqat": lc}


# ---------------------------------------------------------------------------- transformers
def hf_decode(model_dir: Path, dtype, new_tokens: int = 48) -> float:
    """transformers generate, batch 1, eager: decode tok/s = (N-1) / (t(N) - t(1))."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ids = torch.tensor([PROMPT])

    def t(n):
        s = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - s

    t(4)
    t1 = min(t(1) for _ in range(3))
    tn = min(t(new_tokens + 1) for _ in range(2))
    return new_tokens / (tn - t1)


VARIANTS = {"fp32": ("dense", "float32"), "bf16": ("dense", "bfloat16"), "lcqat": ("lcqat", "float32"),
            "lcqat-bf16": ("lcqat", "bfloat16"),  # LC weights, the rest of the model (attention, norms) in bf16
            "lcqat-bf16-int8head": ("lcqat_int8head", "bfloat16")}  # and the tied head also stored int8 (lm_head_int8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2", "llama1b"], choices=["smollm2", "llama1b"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--server-modes", nargs="*", default=["eager"], choices=["eager", "compiled"],
                   help="modes measured through `vllm serve` and HTTP (none: offline only)")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    if not VENV_PY.exists():
        raise SystemExit(f"no vLLM venv at {VENV_PY}: bash scripts/setup_vllm.sh")
    torch.set_num_threads(2)
    env = environment()
    rows = []
    for model in args.models:
        dirs = smollm2_dirs() if model == "smollm2" else llama1b_dirs()
        if any(VARIANTS[v][0] == "lcqat_int8head" for v in args.variants):  # built only when asked for
            dirs["lcqat_int8head"] = with_int8_head(dirs["lcqat"])
        runs = [("vllm", m, run_vllm) for m in args.modes] + [("vllm-server", m, run_server) for m in args.server_modes]
        for engine, mode, runner in runs:
            for var in args.variants:
                kind, dtype = VARIANTS[var]
                print(f"{engine} {model} {var} {mode} ...", flush=True)
                res = runner(dirs[kind], dtype, mode == "eager", args.concurrency)
                rows.append({"engine": engine, "model": model, "variant": var, "mode": mode, **res})
                print("  ", {k: v for k, v in res.items() if k != "error"} or res["error"][-500:], flush=True)
                save(rows, env, args, partial=True)  # a long run killed midway keeps what it measured
        if not args.no_hf:
            for var in args.variants:
                kind, dtype = VARIANTS[var]
                tps = hf_decode(dirs[kind], getattr(torch, dtype))
                rows.append({"engine": "transformers", "model": model, "variant": var, "mode": "eager", "decode_tok_s": tps})
                print(f"transformers {model} {var}: {tps:.1f} tok/s", flush=True)
                save(rows, env, args, partial=True)
    print(save(rows, env, args, partial=False))


def save(rows, env, args, partial: bool) -> str:
    md = render(rows, env, args)
    if partial:
        md = "**Partial: the run was still going (or was stopped) when this was written.**\n\n" + md
    name = f"serve_{args.tag}"
    paths = write(name, {"environment": env, "args": vars(args), "partial": partial, "rows": rows}, md)
    plot(rows, os.path.join(RESULTS, name + ".png"))
    return md + "\nwrote " + " ".join(paths)


def render(rows, env, args) -> str:
    lines = ["# Serving benchmark: vLLM CPU backend (plugin) vs dense, and transformers generate", md_env(env),
             "vLLM 0.32.0 (vllm-cpu), greedy, max_model_len 512, prompt of 6 tokens. decode = batch-1 tok/s after "
             "warm-up; TTFT = 1-token request; aggregate = c distinct concurrent requests x 32 new tokens "
             "/ wall time (offline LLM.generate). x = ratio to the faster dense dtype in the same engine and mode. "
             "LC checkpoints: data-free (SmolLM2) / random codes (1B shapes); speed does not depend on values. "
             "lcqat-bf16: LC linears, the rest of the model in bf16 (bf16 activations: bf16 products where the CPU "
             "has AVX512_BF16). lcqat-bf16-int8head: the same with the output projection read from an int8 copy of the "
             "tied embedding (LCQATConfig(lm_head_int8=True); one fp32 scale per row), the embedding lookup unchanged. "
             "vLLM's CPU worker binds its OpenMP threads to the cores it does not reserve for its "
             "scheduler process: on a 2-core machine every variant computes on one thread.\n"]
    for model in args.models:
        lines += [f"## {model}", "", "| engine | mode | variant | decode tok/s | x best dense | TTFT ms | "
                  + " | ".join(f"agg c={c}" for c in args.concurrency) + " |",
                  "|---|---|---|---:|---:|---:|" + "---:|" * len(args.concurrency)]
        for mode in args.modes + ["hf"]:
            group = [r for r in rows if r["model"] == model and
                     ((r["engine"] == "vllm" and r["mode"] == mode) if mode != "hf" else r["engine"] == "transformers")]
            dense = [r.get("decode_tok_s", 0) for r in group if r["variant"] in ("fp32", "bf16") and "error" not in r]
            best = max(dense) if dense else None
            for r in group:
                if "error" in r:
                    lines.append(f"| {r['engine']} | {r['mode']} | {r['variant']} | error: see JSON | | |" + " |" * len(args.concurrency))
                    continue
                x = f"{r['decode_tok_s'] / best:.2f}" if best else ""
                agg = r.get("aggregate_tok_s", {})
                lines.append(f"| {r['engine']} | {r['mode']} | {r['variant']} | {r['decode_tok_s']:.1f} | {x} | "
                             + (f"{1000 * r['ttft_s']:.0f}" if "ttft_s" in r else "") + " | "
                             + " | ".join(f"{agg[str(c)] if str(c) in agg else agg.get(c, float('nan')):.1f}"
                                          if agg else "" for c in args.concurrency) + " |")
        lines.append("")
        srv = [r for r in rows if r["model"] == model and r["engine"] == "vllm-server"]
        if srv:
            lines += ["Through `vllm serve` (HTTP, streaming; aggregate tok/s / median time to first chunk ms):", "",
                      "| mode | variant | startup s | " + " | ".join(f"c={c}" for c in args.concurrency) + " |",
                      "|---|---|---:|" + "---:|" * len(args.concurrency)]
            for r in srv:
                if "error" in r:
                    lines.append(f"| {r['mode']} | {r['variant']} | error: see JSON |" + " |" * len(args.concurrency))
                    continue
                cells = []
                for c in args.concurrency:
                    a, t = r["aggregate_tok_s"], r["ttft_ms_median"]
                    k = str(c) if str(c) in a else c
                    cells.append(f"{a[k]:.1f} / {t[k]:.0f}" if k in a else "")
                lines.append(f"| {r['mode']} | {r['variant']} | {r['startup_s']:.0f} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    vr = [r for r in rows if r["engine"] in ("vllm", "vllm-server") and "aggregate_tok_s" in r]
    keys = sorted({(r["model"], r["mode"], r["engine"]) for r in vr})
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (model, mode, engine) in zip(axes[0], keys):
        for r in vr:
            if (r["model"], r["mode"], r["engine"]) == (model, mode, engine):
                agg = {int(c): v for c, v in r["aggregate_tok_s"].items()}
                cs = sorted(agg)
                ax.plot(cs, [agg[c] for c in cs], marker="o", label=r["variant"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{'vllm serve (HTTP)' if engine == 'vllm-server' else 'vLLM offline'}, {model}, {mode}", fontsize=9)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:  # keeps the .png suffix savefig picks the format from
        fig.savefig(tmp, dpi=90)


if __name__ == "__main__":
    main()
