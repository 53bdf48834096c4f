"""The LC training forward+backward of one layer, before (plain autograd through
``reference.lc_forward``) and after (``LCTrainingForward``, issue #32): seconds a step and the bytes
saved for backward (unique storages, parameters left out), at 1 and 2 threads, with malloc's
defaults and with the heap the QAT callback retains (optimum_lcqat._heap).

    python benchmarks/lc_training_fn.py [--tokens 2048] [--reps 5]

Prints a table and writes benchmarks/results/lc_training_fn.{json,md}. The 2-thread rows are the
noisiest (a 2-core VM): the whole-model figures are in results/memory.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

from optimum_lcqat._heap import retained_heap
from optimum_lcqat.nn import LCLinear

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import saved_bytes  # noqa: E402  (the tests' measure of saved bytes)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, md_env, write  # noqa: E402

SHAPES = {"smollm2.down (576x1536)": (576, 1536), "smollm2.gate/up (1536x576)": (1536, 576)}  # (out, in)


def old_forward(layer, x):
    return layer.plain_training_forward(x)


def new_forward(layer, x):
    return layer(x)


def step(fwd, layer, x, g):
    y = fwd(layer, x)
    y.backward(g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    env = environment()
    lines = [f"# LC training forward+backward of one layer: plain autograd (old) vs LCTrainingForward (new)", "",
             md_env(env), "", f"{args.tokens} tokens, fp32, median of {args.reps} interleaved runs (after 1 warm-up)", "",
             "| layer | threads | heap | path | fwd+bwd ms | saved for backward MiB |", "|---|---|---|---|---|---|"]
    rows = []
    for name, (m, n) in SHAPES.items():
        torch.manual_seed(0)
        layer = LCLinear(n, m, hadamard_block_size=64)
        with torch.no_grad():
            layer.codes.random_(0, 256)
        layer.enable_training()
        x = torch.randn(args.tokens, n, requires_grad=True)
        g = torch.randn(args.tokens, m)
        params = list(layer.parameters())
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for heap, ctx in (("malloc default", contextlib.nullcontext), ("retained heap", retained_heap)):
                with ctx():
                    paths = {"old": old_forward, "new": new_forward}
                    ts = {k: [] for k in paths}
                    for label, fwd in paths.items():
                        step(fwd, layer, x, g)  # warm-up
                    for _ in range(args.reps):  # interleaved: the machine's load drifts
                        for label, fwd in paths.items():
                            layer.zero_grad(set_to_none=True)
                            x.grad = None
                            t0 = time.perf_counter()
                            step(fwd, layer, x, g)
                            ts[label].append(time.perf_counter() - t0)
                for label, fwd in paths.items():
                    sb, _ = saved_bytes(lambda: fwd(layer, x), params)
                    ms = 1e3 * statistics.median(ts[label])
                    rows.append({"layer": name, "threads": threads, "heap": heap, "path": label, "ms": ms,
                                 "ms_all": [1e3 * t for t in ts[label]], "saved_bytes": sb})
                    lines.append(f"| {name} | {threads} | {heap} | {label} | {ms:.1f} | {sb / 2**20:.1f} |")
                    print(lines[-1], flush=True)
    md = "\n".join(lines) + "\n"
    print(md)
    write("lc_training_fn", {"env": env, "rows": rows, "args": vars(args)}, md)


if __name__ == "__main__":
    main()
