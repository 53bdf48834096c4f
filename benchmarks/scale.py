"""Cost of streaming PTQ against model size: SmolLM2-135M to Llama-3.1-8B (random weights).

Each model is built from its public ``config.json`` values (written out below by hand), with
random weights (normal, std 0.02; norms 1) saved once as bf16 safetensors shards under
``~/.cache/optimum_lcqat/scale/<name>-L<blocks>/``, together with the bundled SmolLM2 tokenizer
(its 49152 ids are valid for every vocabulary here). Quality means nothing on random weights:
only cost is measured.

Each run is ``optimum_lcqat.streaming.quantize_streaming`` in a fresh interpreter (its peak RSS
is that process's VmHWM), compute dtype bf16, activations bf16, with the **fast PTQ preset**:
16 calibration samples x 256 tokens (pydoc topics), affine codebook, d = 4, Hadamard block
128, ``init_iters=2``, ``ptq_refine_passes=1``, ``ptq_finetune_steps=8``, ``ptq_batch_size=8``.

Whole runs for the small models; for the large ones the source is the model's width and
vocabulary with only its first ``k`` decoder blocks (``num_hidden_layers=k``; every block of a
model has the same shapes, and the tests show peak memory flat in depth), and the whole-model
time is extrapolated as ``k``-block time / k x L + the measured non-block time (marked
``extrapolated``). Time per billion weights is per block (block linear weights only).

Run (from the repository root):
    PYTHONPATH=$PWD nice -n 10 python -P benchmarks/scale.py               # writes results/scale.*
    PYTHONPATH=$PWD nice -n 10 python -P benchmarks/scale.py --only smollm2-135m qwen2.5-0.5b
    PYTHONPATH=$PWD python -P benchmarks/scale.py --quick                  # smoke run (scale_quick.*)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, environment, md_env, write  # noqa: E402

CACHE = Path(os.environ.get("OPTIMUM_LCQAT_SCALE_CACHE", Path.home() / ".cache" / "optimum_lcqat" / "scale"))

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# Public config.json values (huggingface.co/<repo>/blob/main/config.json), the fields that set shapes.
CONFIGS = {
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, hidden_act="silu"),
    "qwen2.5-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, hidden_act="silu"),
    "llama-3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu"),
    "llama-3.2-3b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu"),
    "llama-3.1-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, hidden_act="silu"),
}
# Blocks run per model (None: all). The large ones: the first blocks only (see the docstring).
PLAN = {"smollm2-135m": None, "qwen2.5-0.5b": 4, "llama-3.2-1b": 2, "llama-3.2-3b": 1, "llama-3.1-8b": 1}
PRESET = dict(num_samples=16, model_seqlen=256, init_iters=2, ptq_refine_passes=1, ptq_finetune_steps=8, ptq_batch_size=8)
QUICK_PRESET = dict(num_samples=4, model_seqlen=64, init_iters=1, ptq_refine_passes=1, ptq_finetune_steps=2, ptq_batch_size=4)


def _config(name: str, layers: int | None):
    from transformers import AutoConfig

    kw = dict(CONFIGS[name])
    mt = kw.pop("model_type")
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return AutoConfig.for_model(mt, **kw)


def block_weights(name: str) -> int:
    c = CONFIGS[name]
    h, i = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return h * q + 2 * h * kv + q * h + 3 * h * i


def total_weights(name: str) -> int:
    c = CONFIGS[name]
    emb = c["vocab_size"] * c["hidden_size"]
    return c["num_hidden_layers"] * block_weights(name) + emb * (1 if c["tie_word_embeddings"] else 2)


def make_source(name: str, layers: int | None) -> Path:
    """The random-weight bf16 checkpoint (cached): written tensor by tensor, 2 GB shards."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_lcqat._atomic import write_dir_atomic
    from optimum_lcqat.assets import smollm2_path

    L = layers or CONFIGS[name]["num_hidden_layers"]
    path = CACHE / f"{name}-L{L}"
    if (path / "model.safetensors.index.json").exists():
        return path
    config = _config(name, L)
    with init_empty_weights():
        skel = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tied = set((getattr(skel, "all_tied_weights_keys", None) or {}).keys())
    shapes = [(k, tuple(v.shape)) for k, v in skel.state_dict().items() if k not in tied]

    def build(tmp: Path) -> None:  # in a temporary folder beside the cache entry, renamed into place
        shards, cur, size = [], {}, 0
        for key, shape in shapes:
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16) if "norm" in key else torch.randn(shape, generator=g).to(torch.bfloat16) * 0.02
            else:
                t = (torch.randn(shape, generator=g, dtype=torch.bfloat16) * 0.02).contiguous()
            cur[key] = t
            size += t.numel() * 2
            if size >= 2 * 10**9:
                shards.append(cur)
                save_file(cur, str(tmp / f"part{len(shards)}.safetensors"), metadata={"format": "pt"})
                cur, size = {}, 0
        if cur:
            shards.append(cur)
            save_file(cur, str(tmp / f"part{len(shards)}.safetensors"), metadata={"format": "pt"})
        n = len(shards)
        weight_map, total = {}, 0
        for i, sh in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / f"part{i}.safetensors", tmp / fname)
            for k, v in sh.items():
                weight_map[k] = fname
                total += v.numel() * 2
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(tmp)

    return write_dir_atomic(path, build)


def _reset_peak_rss() -> None:
    """Restart the process's RSS high-water mark (VmHWM) at its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:  # not Linux: the peak may then include writing an uncached source
        print(f"scale.py: cannot reset the peak RSS (/proc/self/clear_refs: {exc}); run again once the source "
              "is cached for a peak of the PTQ alone", file=sys.stderr)


def child(name: str, layers: int | None, quick: bool) -> dict:
    """One streaming PTQ run in this (fresh) process; prints its figures as JSON."""
    import logging

    import torch
    from transformers import AutoTokenizer

    from optimum_lcqat import LCQATConfig
    from optimum_lcqat.init.ptq_blocks import peak_rss_bytes
    from optimum_lcqat.streaming import quantize_streaming

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("optimum_lcqat.init.ptq_blocks").setLevel(logging.WARNING)
    logging.getLogger("optimum_lcqat.quant_api").setLevel(logging.WARNING)
    logging.getLogger("optimum_lcqat.streaming").setLevel(logging.INFO)
    t0 = time.perf_counter()
    src = make_source(name, layers)
    t_src = time.perf_counter() - t0
    _reset_peak_rss()  # the peak reported is the PTQ run's, not that of writing an uncached source
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)][::2]
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LCQATConfig(dataset=texts, tokenizer=tok, **(QUICK_PRESET if quick else PRESET))
    out = Path(tempfile.mkdtemp(prefix="lcqat-scale-")) / "out"
    peak_before = peak_rss_bytes()
    try:
        rep = quantize_streaming(src, out, cfg, dtype=torch.bfloat16, activation_dtype=torch.bfloat16)
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {"source_seconds": t_src, "peak_rss_before_bytes": peak_before, "report": rep, "output_bytes": out_bytes}


def run_one(name: str, layers: int | None, quick: bool) -> dict:
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--child", name, "--quick" if quick else "--full"]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: child failed\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_seconds_incl_startup"] = time.time() - t0
    return res


def summarise(name: str, layers: int | None, res: dict) -> dict:
    rep = res["report"]
    L = CONFIGS[name]["num_hidden_layers"]
    k = rep["blocks"]
    bsecs = [rep["block_seconds"][str(i)] if str(i) in rep["block_seconds"] else rep["block_seconds"][i] for i in range(k)]
    mean_block = sum(bsecs) / k
    non_block = rep["seconds"] - sum(bsecs)
    bw = block_weights(name)
    return {
        "model": name, "blocks_total": L, "blocks_run": k, "whole_run": k == L,
        "block_weights": bw, "total_weights": total_weights(name),
        "block_seconds": bsecs, "mean_block_seconds": mean_block,
        "seconds_per_billion_block_weights": mean_block / (bw / 1e9),
        "non_block_seconds": non_block, "run_seconds": rep["seconds"],
        "whole_model_seconds": rep["seconds"] if k == L else mean_block * L + non_block,
        "whole_model_seconds_extrapolated": k != L,
        "peak_rss_bytes": rep["peak_rss_bytes"], "source_cache_seconds": res["source_seconds"],
    }


def fit_exponent(rows) -> float | None:
    pts = [(math.log(r["block_weights"]), math.log(r["mean_block_seconds"])) for r in rows]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def plot(rows, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["total_weights"] / 1e9 for r in rows]
    ax[0].loglog(x, [r["whole_model_seconds"] / 60 for r in rows], "o-")
    for r, xi in zip(rows, x):
        ax[0].annotate(r["model"] + (" (extrap.)" if r["whole_model_seconds_extrapolated"] else ""),
                       (xi, r["whole_model_seconds"] / 60), fontsize=7)
    ax[0].set_xlabel("weights (billions)")
    ax[0].set_ylabel("streaming PTQ time (min, fast preset)")
    ax[1].semilogx(x, [r["peak_rss_bytes"] / 2**30 for r in rows], "o-")
    ax[1].set_xlabel("weights (billions)")
    ax[1].set_ylabel("peak RSS (GiB)")
    fig.tight_layout()
    from optimum_lcqat._atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: SmolLM2 config, 2 blocks, tiny preset")
    ap.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="run only these models")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the other models from the existing results (each row records its command)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.quick), default=str))
        return
    env = environment()
    plan = {"smollm2-135m": 2} if args.quick else {k: v for k, v in PLAN.items() if not args.only or k in args.only}
    tag = "scale_quick" if args.quick else "scale"
    rows = []
    old_path = os.path.join(ROOT, "benchmarks", "results", tag + ".json")
    if args.merge and os.path.exists(old_path):
        with open(old_path) as f:
            rows = [r for r in json.load(f)["rows"] if r["model"] not in plan]
    for name, layers in plan.items():
        print(f"{name}: {'all' if layers is None else layers} block(s) ...", flush=True)
        res = run_one(name, layers, args.quick)
        row = summarise(name, layers, res)
        row["command"] = env["command"]
        row["git_commit"] = env["git_commit"]
        row["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "block_seconds"}), flush=True)
        _write_results(tag, env, args.quick, rows)
    _write_results(tag, env, args.quick, rows)


def _write_results(tag, env, quick, rows) -> None:
    order = list(CONFIGS)
    rows = sorted(rows, key=lambda r: order.index(r["model"]))
    exponent = fit_exponent(rows)
    args = argparse.Namespace(quick=quick)
    png = None if args.quick else plot(rows, os.path.join(ROOT, "benchmarks", "results", tag + ".png"))
    payload = {"environment": env, "preset": QUICK_PRESET if args.quick else PRESET, "compute_dtype": "bfloat16",
               "activation_dtype": "bfloat16", "rows": rows, "time_exponent_vs_block_weights": exponent, "plot": png}
    lines = [
        "# Streaming PTQ cost against model size (random weights, fast preset)\n\n", md_env(env),
        f"- preset: {payload['preset']}; compute bf16, activations bf16\n",
        "- big models: first blocks only (a model of the same width and vocabulary with that many blocks); "
        "whole-model time extrapolated = mean block time x blocks + non-block time\n",
        "- peak RSS: the PTQ process's high-water mark, reset after an uncached source is written\n",
        ("- rows from several invocations (each JSON row records its command, commit and time)\n"
         if len({r.get("command") for r in rows}) > 1 else ""),
        "\n",
        "| model | weights | blocks run | s / block | s / 1e9 block weights | non-block s | whole model (min) | peak RSS (GiB) |\n",
        "|---|---|---|---|---|---|---|---|\n",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['total_weights'] / 1e9:.2f} B | {r['blocks_run']}/{r['blocks_total']} | "
            f"{r['mean_block_seconds']:.1f} | {r['seconds_per_billion_block_weights']:.0f} | {r['non_block_seconds']:.1f} | "
            f"{r['whole_model_seconds'] / 60:.1f}{' (extrapolated)' if r['whole_model_seconds_extrapolated'] else ''} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} |\n"
        )
    if exponent is not None:
        lines.append(f"\nTime per block ~ (block weights)^{exponent:.2f} (least-squares fit over the rows).\n")
    jpath, mpath = write(tag, payload, "".join(lines))
    print("wrote", jpath, mpath, png or "")


if __name__ == "__main__":
    main()
