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

Two cache regimes, both in one run:
- hot: the same layer called again and again, its weights stay in the core's L2 (a 576x576 fp32
  weight is 1.3 MB): dense F.linear at its best, the harshest comparison for LC.
- cold: every call uses the next of a pool of copies of the layer whose dense fp32 weights add
  up to --cold-mib (default 512 MiB, more than this machine's 260 MB L3), the LC pool having
  the same number of copies. This is what serving does: each decode step streams every layer's
  weights once (SmolLM2 in fp32 is 540 MB, its 2-bit form ~35 MB).

    PYTHONPATH=. python -P benchmarks/kernels.py                 # full table (~15 minutes)
    PYTHONPATH=. python -P benchmarks/kernels.py --quick         # SmolLM2 shapes only

Writes benchmarks/results/kernels_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

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


def cold_time(fns, min_time: float, rounds: int = 1) -> float:
    """Seconds per call when each call uses the next element of `fns` (a pool of layer copies
    larger than the last-level cache): whole passes over the pool, repeated until min_time."""
    for f in fns[: min(len(fns), 4)]:
        f()
    best = []
    for _ in range(rounds):
        calls, t0 = 0, time.perf_counter()
        while True:
            for f in fns:
                f()
            calls += len(fns)
            el = time.perf_counter() - t0
            if el >= min_time:
                break
        best.append(el / calls)
    return min(best)


def bench_one(m, n, batch, rounds, min_time, device, block, check, cold_mib):
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
        ref = reference.lc_forward(w.to(device="cpu", dtype=torch.float64), x32.cpu().double())
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
    out = {"hot": {}}
    for k in variants:
        t = statistics.median(times[k])
        out["hot"][k] = {"us": t * 1e6, "gbps": wbytes[k] / t / 1e9, "weight_bytes": wbytes[k], "rounds_us": [x * 1e6 for x in times[k]]}
    out["hot"]["x_fp32"] = out["hot"]["dense_fp32"]["us"] / out["hot"]["lc_fp32"]["us"]
    out["hot"]["x_bf16"] = out["hot"]["dense_bf16"]["us"] / out["hot"]["lc_bf16"]["us"]
    if cold_mib and device == "cpu":
        copies = max(2, -(-cold_mib * 2**20 // (4 * m * n)))
        lcs = [LCWeight(w.codes.clone(), w.A, w.beta, w.s_u, w.s_v, pi, po) for _ in range(copies)]
        dense = [w32.clone() for _ in range(copies)]
        pool = {
            "lc_fp32": [lambda c=c: c.apply(x32) for c in lcs],
            "dense_fp32": [lambda d=d: F.linear(x32, d) for d in dense],
        }
        ct = {k: [] for k in pool}
        with torch.inference_mode():
            for _ in range(rounds):
                for k, fns in pool.items():
                    ct[k].append(cold_time(fns, min_time))
        out["cold"] = {"copies": copies}
        for k in pool:
            t = statistics.median(ct[k])
            out["cold"][k] = {"us": t * 1e6, "gbps": wbytes[k] / t / 1e9, "rounds_us": [x * 1e6 for x in ct[k]]}
        out["cold"]["x_fp32"] = out["cold"]["dense_fp32"]["us"] / out["cold"]["lc_fp32"]["us"]
        del lcs, dense, pool
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only")
    ap.add_argument("--shapes", nargs="+", default=None, help="only the layers whose name contains one of these")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.15, help="seconds per timing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--block", type=int, default=128, help="hadamard_block_size")
    ap.add_argument("--cold-mib", type=int, default=512,
                    help="dense fp32 MiB of layer copies cycled through in the cold regime (0: hot only)")
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
    shapes = {k: v for k, v in SHAPES.items() if not (args.quick and k.startswith("llama"))
              and (not args.shapes or any(f in k for f in args.shapes))}
    cold = args.cold_mib if args.device == "cpu" else 0
    rows = []
    hdr = (f"{'layer':30s} {'batch':>5s} | hot: {'LC fp32':>8s} {'dense fp32':>10s} {'x':>5s} | {'LC bf16':>8s} "
           f"{'dense bf16':>10s} {'x':>5s}" + (f" | cold: {'LC fp32':>8s} {'dense fp32':>10s} {'x':>5s}" if cold else "")
           + "   (us per call)")
    print(hdr)
    for name, (m, n) in shapes.items():
        for b in args.batches:
            r = bench_one(m, n, b, args.rounds, args.min_time, args.device, args.block, check=True, cold_mib=cold)
            rows.append({"layer": name, "out": m, "in": n, "batch": b, **r})
            h = r["hot"]
            line = (f"{name:30s} {b:5d} | hot: {h['lc_fp32']['us']:8.1f} {h['dense_fp32']['us']:10.1f} {h['x_fp32']:5.2f} | "
                    f"{h['lc_bf16']['us']:8.1f} {h['dense_bf16']['us']:10.1f} {h['x_bf16']:5.2f}")
            if "cold" in r:
                c = r["cold"]
                line += f" | cold: {c['lc_fp32']['us']:8.1f} {c['dense_fp32']['us']:10.1f} {c['x_fp32']:5.2f}"
            print(line, flush=True)
    md = ["# Per-layer kernel benchmark (" + args.device + ")\n", md_env(env),
          "\nTimes are medians of interleaved rounds (us per call, whole layer incl. both Hadamards for LC). "
          "x = dense time / LC time, same activation dtype (> 1: LC faster). "
          + ("LC bf16: bf16 products, fp32 accumulation (this CPU has AVX512_BF16; centred code values exact, "
             "folded activations rounded to bf16). " if args.device == "cpu" and native.cpu_has_bf16_dot() else
             "LC bf16: fp32 products (bf16 activations widened). ") +
          "hot: one layer called repeatedly (its dense weight stays in L2: dense at its best). "
          f"cold: each call takes the next of a pool of layer copies holding {cold} MiB of dense fp32 weights "
          "(more than the L3; the LC pool has as many copies), as when serving streams every layer once per step. "
          "GB/s = weight bytes read / time. The machine is shared with other jobs: absolute numbers are noisy, ratios less so.\n\n",
          "| layer (out x in) | batch | hot LC fp32 us | hot dense fp32 us | hot x fp32 | hot LC bf16 us | hot dense bf16 us | hot x bf16 |"
          + (" cold LC fp32 us | cold LC GB/s | cold dense fp32 us | cold dense GB/s | cold x fp32 |" if cold else "") + "\n",
          "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|---:|" if cold else "") + "\n"]
    for r in rows:
        h = r["hot"]
        line = (f"| {r['layer']} | {r['batch']} | {h['lc_fp32']['us']:.1f} | {h['dense_fp32']['us']:.1f} | {h['x_fp32']:.2f} | "
                f"{h['lc_bf16']['us']:.1f} | {h['dense_bf16']['us']:.1f} | {h['x_bf16']:.2f} |")
        if "cold" in r:
            c = r["cold"]
            line += (f" {c['lc_fp32']['us']:.1f} | {c['lc_fp32']['gbps']:.2f} | {c['dense_fp32']['us']:.1f} | "
                     f"{c['dense_fp32']['gbps']:.2f} | {c['x_fp32']:.2f} |")
        md.append(line + "\n")
    tag = args.tag or args.device
    paths = write(f"kernels_{tag}", {"env": env, "args": vars(args), "results": rows}, "".join(md))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
