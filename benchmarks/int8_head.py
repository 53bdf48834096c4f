"""The int8 lm_head matmul: torch's ``aten._weight_int8pack_mm`` against this package's
hand-written ``torch.ops.lcqat.int8_linear`` (csrc/cpu/kernels.cpp, AVX-512/AVX2 GEMV).

Both compute y = x @ (w_int8 * scale[:, None]).T for an int8 weight [out, in] with one scale per
output row (the compact lm_head's format); the shape is SmolLM2-135M's lm_head, 49152 x 576, the
weight is SmolLM2's tied embedding quantized per row (absmax / 127) when the bundled checkpoint
is at hand, else random int8 (``--weights random``; speed does not depend on the values).
``--shape llama1b``: Llama-3.2-1B's head, 128256 x 2048 (random int8), where the head is half of
a 2-bit model's bytes per decoded token.

Variants, timed in one process with torch.utils.benchmark.Timer, round by round (median of the
rounds' medians), so that other load on the machine hits them alike:
* ``lcqat_fp32``: ``torch.ops.lcqat.int8_linear`` with fp32 activations (its compute is fp32);
* ``aten_fp32``: ``torch.ops.aten._weight_int8pack_mm`` with fp32 activations and scales;
* ``lcqat_bf16`` / ``aten_bf16``: the same two with bf16 activations (aten: bf16 scales too),
  the dtype aten's int8 kernel is mostly used with. lcqat: on AVX-512 VNNI CPUs 16-bit
  fixed-point activations and exact integer sums (csrc/cpu/kernels.h), else fp32 compute;
* ``dense_bf16``: the head it replaces, ``F.linear`` with the dense bf16 weight (w * scale):
  what a bf16 model reads per token (2 bytes a weight).
Before timing, every variant's output is compared with an fp64 oracle of the same int8 weight
(relative error = max |y - y_ref| / max |y_ref|), and the two fp32 variants with each other; an
fp32 variant off by more than --tol stops the script.

    PYTHONPATH=. python -P benchmarks/int8_head.py                 # batches 1 4 16, 2 threads
    PYTHONPATH=. python -P benchmarks/int8_head.py --threads 2 1   # and the same with 1 thread

Writes benchmarks/results/int8_head.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, md_env, write  # noqa: E402

SHAPES = {"smollm2": (49152, 576), "llama1b": (128256, 2048)}  # lm_head (vocab x hidden)
OUT, IN = SHAPES["smollm2"]


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight and fp32 per-row scale, absmax / 127 (the compact lm_head's rounding)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def load_weight(kind: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    if kind == "smollm2":
        from safetensors import safe_open

        from optimum_lcqat.assets import smollm2_path

        path = smollm2_path() / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            key = "lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight"
            w = f.get_tensor(key)
        if tuple(w.shape) != (OUT, IN):
            raise SystemExit(f"{path}: {key} has shape {tuple(w.shape)}, expected {(OUT, IN)}")
        q, s = quantize_rows(w)
        return q, s, f"SmolLM2-135M {key}, int8 per row"
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (OUT, IN), dtype=torch.int8, generator=g)
    s = torch.rand(OUT, generator=g) * 1e-3 + 1e-4
    return q, s, "random int8"


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[2],
                    help="torch threads; several values: the whole table once per value")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.3, help="seconds per Timer.blocked_autorange")
    ap.add_argument("--weights", choices=["smollm2", "random"], default="smollm2")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest relative error of an fp32 variant")
    ap.add_argument("--no-aten", action="store_true",
                    help="leave out aten._weight_int8pack_mm (its fp32 path takes seconds a call on the 1B head)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2",
                    help="llama1b: Llama-3.2-1B's head shape, random int8 weights")
    ap.add_argument("--tag", default="", help="suffix of the result files (int8_head<tag>.json)")
    args = ap.parse_args()
    global OUT, IN
    OUT, IN = SHAPES[args.shape]
    if args.shape != "smollm2":
        args.weights = "random"

    torch.set_num_threads(args.threads[0])
    from optimum_lcqat.kernels import native

    if not native.available():
        sys.exit("the native extension is not built: python setup.py build_ext --inplace")
    env = environment()
    try:
        w, scale, wdesc = load_weight(args.weights)
    except (ImportError, FileNotFoundError) as exc:
        sys.exit(f"cannot load the SmolLM2 lm_head ({exc}); run with --weights random")
    scale16 = scale.bfloat16()
    dense16 = (w.float() * scale[:, None]).bfloat16()
    wbytes = OUT * IN + 4 * OUT  # int8 weight + fp32 scales
    print(f"lm_head {OUT} x {IN} ({wdesc}), threads {args.threads}, CPU kernels {env['lcqat_cpu_isa']}")

    cases = []  # (batch, variants, relative errors), checked before any timing
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        ref_w = w.double() * scale.double()[:, None]
        for B in args.batches:
            x = torch.randn(B, IN, generator=g)
            x16 = x.bfloat16()
            variants = {
                "lcqat_fp32": lambda x=x: torch.ops.lcqat.int8_linear(x, w, scale, None),
                "aten_fp32": lambda x=x: torch.ops.aten._weight_int8pack_mm(x, w, scale),
                "lcqat_bf16": lambda x16=x16: torch.ops.lcqat.int8_linear(x16, w, scale, None),
                "aten_bf16": lambda x16=x16: torch.ops.aten._weight_int8pack_mm(x16, w, scale16),
                "dense_bf16": lambda x16=x16: torch.nn.functional.linear(x16, dense16),
            }
            ref = x.double() @ ref_w.T
            ref16x = x16.double() @ ref_w.T
            ref16 = x16.double() @ (w.double() * scale16.double()[:, None]).T
            if args.no_aten:
                variants = {k: v for k, v in variants.items() if not k.startswith("aten")}
            outs = {k: fn() for k, fn in variants.items()}
            nan = float("nan")
            outs.setdefault("aten_fp32", torch.full_like(outs["lcqat_fp32"], nan))
            outs.setdefault("aten_bf16", torch.full_like(outs["lcqat_bf16"], nan))
            errs = {
                "lcqat_fp32": rel_err(outs["lcqat_fp32"], ref),
                "aten_fp32": rel_err(outs["aten_fp32"], ref),
                # bf16 activations: against the product of the bf16-rounded inputs
                "lcqat_bf16": rel_err(outs["lcqat_bf16"], ref16x),
                "aten_bf16": rel_err(outs["aten_bf16"], ref16),
                "dense_bf16": rel_err(outs["dense_bf16"], ref16x),
                "lcqat_fp32_vs_aten_fp32": rel_err(outs["lcqat_fp32"], outs["aten_fp32"]),
            }
            for k in ("lcqat_fp32",) + (() if args.no_aten else ("aten_fp32", "lcqat_fp32_vs_aten_fp32")):
                if not errs[k] <= args.tol:
                    sys.exit(f"batch {B}: {k} relative error {errs[k]:.3g} exceeds --tol {args.tol}")
            cases.append((B, variants, errs))

        rows = []
        for nt in args.threads:
            torch.set_num_threads(nt)
            for B, variants, errs in cases:
                times = {k: [] for k in variants}
                blocks = {k: [] for k in variants}
                for _ in range(args.rounds):
                    for k, fn in variants.items():
                        t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=nt, label=k)
                        m = t.blocked_autorange(min_run_time=args.min_run_time)
                        times[k].append(m.median)
                        blocks[k].extend(m.times)
                r = {"threads": nt, "batch": B, "rel_err": errs}
                for k in variants:
                    t = statistics.median(times[k])
                    r[k] = {"us": t * 1e6, "gbps": wbytes / t / 1e9, "best_us": min(blocks[k]) * 1e6,
                            "rounds_us": [v * 1e6 for v in times[k]]}
                for k in ("aten_fp32", "aten_bf16"):  # --no-aten: not timed
                    r.setdefault(k, {"us": float("nan"), "gbps": float("nan"), "best_us": float("nan"), "rounds_us": []})
                r["aten_fp32_over_lcqat_fp32"] = r["aten_fp32"]["us"] / r["lcqat_fp32"]["us"]
                r["aten_bf16_over_lcqat_bf16"] = r["aten_bf16"]["us"] / r["lcqat_bf16"]["us"]
                r["dense_bf16"]["gbps"] = 2 * OUT * IN / statistics.median(times["dense_bf16"]) / 1e9
                r["dense_bf16_over_lcqat_bf16"] = r["dense_bf16"]["us"] / r["lcqat_bf16"]["us"]
                rows.append(r)
                print(
                    f"{nt} thr, batch {B:3d}: lcqat int8_linear {r['lcqat_fp32']['us']:9.1f} us "
                    f"({r['lcqat_fp32']['gbps']:5.2f} GB/s) | aten fp32 {r['aten_fp32']['us']:9.1f} us | "
                    f"aten/lcqat {r['aten_fp32_over_lcqat_fp32']:.2f} | lcqat bf16 {r['lcqat_bf16']['us']:9.1f} us | "
                    f"aten bf16 {r['aten_bf16']['us']:9.1f} us | aten/lcqat {r['aten_bf16_over_lcqat_bf16']:.2f} | "
                    f"dense bf16 {r['dense_bf16']['us']:9.1f} us | dense/lcqat {r['dense_bf16_over_lcqat_bf16']:.2f} | "
                    f"rel err lcqat {errs['lcqat_fp32']:.1e} aten {errs['aten_fp32']:.1e} "
                    f"between {errs['lcqat_fp32_vs_aten_fp32']:.1e}",
                    flush=True,
                )

    def which(ratio):
        if ratio != ratio:  # NaN: aten left out (--no-aten)
            return "aten not measured"
        return "lcqat.int8_linear" if ratio > 1 else "aten._weight_int8pack_mm"

    faster = {f"{r['threads']} threads, batch {r['batch']}": which(r["aten_fp32_over_lcqat_fp32"]) for r in rows}
    faster_bf16 = {f"{r['threads']} threads, batch {r['batch']}": which(r["aten_bf16_over_lcqat_bf16"]) for r in rows}
    md = [
        "# int8 lm_head: aten._weight_int8pack_mm vs lcqat.int8_linear (and the dense bf16 head)\n\n", md_env(env),
        f"- weight: {OUT} x {IN} ({wdesc}), {wbytes / 2**20:.1f} MiB read per call (int8 + fp32 scales)\n",
        f"- torch.utils.benchmark.Timer, median of {args.rounds} interleaved rounds of "
        f"blocked_autorange(min_run_time={args.min_run_time}); best = fastest block of all rounds\n\n",
        "us per call; GB/s = weight bytes / median time; x = aten time / lcqat time (medians), same activation "
        "dtype (> 1: lcqat faster). Relative error = max |y - y_ref| / max |y_ref| against an fp64 product of "
        "the same int8 weight (bf16 variants: of their bf16-rounded inputs). With other load on the machine "
        "(see the load average), a multi-threaded call waits in every OpenMP region until its other thread is "
        "scheduled, so multi-thread medians carry that wait; the 1-thread rows and the best column show the "
        "kernels with less of it.\n\n",
        "| threads | batch | lcqat fp32 us | best | GB/s | aten fp32 us | best | x fp32 | lcqat bf16 us | best | "
        "aten bf16 us | best | x bf16 |\n",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    ]
    for r in rows:
        md.append(
            f"| {r['threads']} | {r['batch']} | {r['lcqat_fp32']['us']:.0f} | {r['lcqat_fp32']['best_us']:.0f} | "
            f"{r['lcqat_fp32']['gbps']:.2f} | {r['aten_fp32']['us']:.0f} | {r['aten_fp32']['best_us']:.0f} | "
            f"{r['aten_fp32_over_lcqat_fp32']:.2f} | {r['lcqat_bf16']['us']:.0f} | {r['lcqat_bf16']['best_us']:.0f} | "
            f"{r['aten_bf16']['us']:.0f} | {r['aten_bf16']['best_us']:.0f} | {r['aten_bf16_over_lcqat_bf16']:.2f} |\n"
        )
    md.append("\nAgainst the dense bf16 head it replaces (F.linear, bf16 weight; GB/s of its 2 bytes a weight), "
              "bf16 activations; x = dense time / lcqat time:\n\n"
              "| threads | batch | lcqat bf16 us | lcqat GB/s | dense bf16 us | dense GB/s | x |\n"
              "|---:|---:|---:|---:|---:|---:|---:|\n")
    for r in rows:
        md.append(f"| {r['threads']} | {r['batch']} | {r['lcqat_bf16']['us']:.0f} | {r['lcqat_bf16']['gbps']:.2f} | "
                  f"{r['dense_bf16']['us']:.0f} | {r['dense_bf16']['gbps']:.2f} | {r['dense_bf16_over_lcqat_bf16']:.2f} |\n")
    md.append("\n| batch | rel err lcqat fp32 | aten fp32 | lcqat vs aten fp32 | lcqat bf16 | aten bf16 | dense bf16 |\n"
              "|---:|---:|---:|---:|---:|---:|---:|\n")
    for B, _, e in cases:
        md.append(f"| {B} | {e['lcqat_fp32']:.1e} | {e['aten_fp32']:.1e} | {e['lcqat_fp32_vs_aten_fp32']:.1e} | "
                  f"{e['lcqat_bf16']:.1e} | {e['aten_bf16']:.1e} | {e['dense_bf16']:.1e} |\n")
    md.append("\nFaster (medians): fp32 " + "; ".join(f"{b}: {v}" for b, v in faster.items())
              + ". bf16 " + "; ".join(f"{b}: {v}" for b, v in faster_bf16.items()) + ".\n")
    def no_nan(v):  # --no-aten leaves NaN figures: null in the JSON (NaN is not JSON)
        if isinstance(v, dict):
            return {k: no_nan(x) for k, x in v.items()}
        if isinstance(v, list):
            return [no_nan(x) for x in v]
        return None if isinstance(v, float) and v != v else v

    payload = {"env": env, "args": vars(args), "weight": wdesc, "shape": [OUT, IN], "weight_bytes": wbytes,
               "results": no_nan(rows), "faster_fp32": faster, "faster_bf16": faster_bf16}
    paths = write("int8_head" + args.tag, payload, "".join(md))
    print("faster (fp32):", faster)
    print("faster (bf16):", faster_bf16)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
