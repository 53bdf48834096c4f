"""Per-layer benchmark: the LC 2-bit kernel against dense F.linear (fp32 and bf16).

For every (shape, batch): the native LC layer op (``torch.ops.lcqat.lc_linear``: Hadamard +
scales + 2-bit matmul + Hadamard, i.e. the whole layer) with fp32 and bf16 activations, and
dense ``F.linear`` with an fp32 and a bf16 weight of the same shape. The timings of one
configuration are interleaved round by round (median of rounds), so that load from other
processes on the machine hits all variants alike; ratios are more reliable than absolutes.
Each timing is ``torch.utils.benchmark.Timer.blocked_autorange`` (its median). The LC variants
call ``LCWeight.apply``, the path every LC layer takes (the native op, bound once).
Effective GB/s = bytes of weight the variant has to read (LC: packed codes + A, beta, s_u, s_v
in fp32; dense: the weight) / time.

    PYTHONPATH=. python -P benchmarks/kernels.py                 # full table (a few minutes)
    PYTHONPATH=. python -P benchmarks/kernels.py --quick         # SmolLM2 shapes only

Writes benchmarks/results/kernels_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import LAYER_SHAPES, environment, md_env, write  # noqa: E402

from optimum_lcqat.kernels import native, reference  # noqa: E402
from optimum_lcqat.tensor.hadamard import plan_rotation  # noqa: E402
from optimum_lcqat.tensor.lc_weight import LCWeight  # noqa: E402

SHAPES = LAYER_SHAPES


def timeit(fn, min_time: float) -> float:
    """Seconds per call: the median of torch.utils.benchmark's blocked autorange (after one warm-up)."""
    fn()
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time
    ).median


def bench_one(m, n, batch, rounds, min_time, device, block, check):
    g = torch.Generator().manual_seed(m * 31 + n)
    pi, po = plan_rotation(n, block), plan_rotation(m, block)
    w = LCWeight(
        torch.randint(0, 256, (m, n // 4), dtype=torch.uint8, generator=g),
        torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g), 0.1 * torch.randn(4, generator=g),
        torch.randn(n, generator=g), torch.randn(m, generator=g) * 0.01, pi, po,
    ).to(device=device)
    x32 = torch.randn(batch, n, generator=g).to(device)
    x16 = x32.bfloat16()
    w32 = torch.randn(m, n, generator=g).to(device) * 0.02
    w16 = w32.bfloat16()
    if check:  # the kernel must agree with the reference before it is timed
        ref = reference.lc_linear(w.to(device="cpu", dtype=torch.float64), x32.cpu().double())
        with torch.inference_mode():
            out = w.apply(x32).cpu()
        err = float((out.double() - ref).abs().max() / ref.abs().max())
        assert err < 1e-4, f"native LC kernel disagrees with the reference: rel err {err}"
    variants = {
        "lc_fp32": lambda: w.apply(x32),
        "lc_bf16": lambda: w.apply(x16),
        "dense_fp32": lambda: F.linear(x32, w32),
        "dense_bf16": lambda: F.linear(x16, w16),
    }
    wbytes = {
        "lc_fp32": m * n // 4 + 4 * (16 + 4 + m + n),
        "lc_bf16": m * n // 4 + 4 * (16 + 4 + m + n),
        "dense_fp32": 4 * m * n,
        "dense_bf16": 2 * m * n,
    }
    times = {k: [] for k in variants}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(rounds):
            for k, fn in variants.items():
                def call(fn=fn):
                    fn()
                    sync()
                times[k].append(timeit(call, min_time))
    out = {}
    for k in variants:
        t = statistics.median(times[k])
        out[k] = {"us": t * 1e6, "gbps": wbytes[k] / t / 1e9, "weight_bytes": wbytes[k], "rounds_us": [x * 1e6 for x in times[k]]}
    out["speedup_lc_fp32_vs_dense_fp32"] = out["dense_fp32"]["us"] / out["lc_fp32"]["us"]
    out["speedup_lc_bf16_vs_dense_bf16"] = out["dense_bf16"]["us"] / out["lc_bf16"]["us"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.15, help="seconds per timing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--block", type=int, default=128, help="hadamard_block_size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default=None, help="suffix of the result files (default: the device)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        sys.exit("the native extension is not built: python setup.py build_ext --inplace")
    if args.device == "cuda" and not native.cuda_built():
        sys.exit("the extension was built without CUDA kernels")
    env = environment()
    shapes = {k: v for k, v in SHAPES.items() if not (args.quick and k.startswith("llama"))}
    rows = []
    hdr = f"{'layer':30s} {'batch':>5s} | {'LC fp32 us':>10s} {'GB/s':>6s} | {'dense fp32 us':>13s} {'GB/s':>6s} | {'x':>5s} | {'LC bf16 us':>10s} {'dense bf16 us':>13s} {'GB/s':>6s} | {'x':>5s}"
    print(hdr)
    for name, (m, n) in shapes.items():
        for b in args.batches:
            r = bench_one(m, n, b, args.rounds, args.min_time, args.device, args.block, check=True)
            rows.append({"layer": name, "out": m, "in": n, "batch": b, **r})
            print(
                f"{name:30s} {b:5d} | {r['lc_fp32']['us']:10.1f} {r['lc_fp32']['gbps']:6.2f} | "
                f"{r['dense_fp32']['us']:13.1f} {r['dense_fp32']['gbps']:6.2f} | {r['speedup_lc_fp32_vs_dense_fp32']:5.2f} | "
                f"{r['lc_bf16']['us']:10.1f} {r['dense_bf16']['us']:13.1f} {r['dense_bf16']['gbps']:6.2f} | "
                f"{r['speedup_lc_bf16_vs_dense_bf16']:5.2f}",
                flush=True,
            )
    md = ["# Per-layer kernel benchmark (" + args.device + ")\n", md_env(env),
          "\nTimes are medians of interleaved rounds (us per call, whole layer incl. both Hadamards for LC). "
          "GB/s = weight bytes read / time (LC: 2-bit codes + fp32 scales). x = dense time / LC time, same activation dtype. "
          "The machine is shared with other jobs: absolute numbers are noisy, ratios less so.\n\n",
          "| layer (out x in) | batch | LC fp32 us | LC GB/s | dense fp32 us | dense GB/s | x fp32 | LC bf16 us | dense bf16 us | dense bf16 GB/s | x bf16 |\n",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"]
    for r in rows:
        md.append(
            f"| {r['layer']} | {r['batch']} | {r['lc_fp32']['us']:.1f} | {r['lc_fp32']['gbps']:.2f} | {r['dense_fp32']['us']:.1f} | "
            f"{r['dense_fp32']['gbps']:.2f} | {r['speedup_lc_fp32_vs_dense_fp32']:.2f} | {r['lc_bf16']['us']:.1f} | "
            f"{r['dense_bf16']['us']:.1f} | {r['dense_bf16']['gbps']:.2f} | {r['speedup_lc_bf16_vs_dense_bf16']:.2f} |\n"
        )
    tag = args.tag or args.device
    paths = write(f"kernels_{tag}", {"env": env, "args": vars(args), "results": rows}, "".join(md))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
