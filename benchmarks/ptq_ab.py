"""PTQ A/B between two source trees of this package (a refactor must not move the figures).

Each tree (a checkout with its extension built in place) quantizes the bundled SmolLM2-135M with
the same Hessian-aware PTQ settings in a fresh interpreter, one after the other in this one
script: per-block output error, PTQ wall time and held-out perplexity (first 8192 tokens of
``split_texts('heldout')``, never calibrated on; calibration from ``split_texts('calibration')``).

    git worktree add /tmp/before <commit> && (cd /tmp/before && python setup.py build_ext --inplace)
    python -P benchmarks/ptq_ab.py --tree before=/tmp/before --tree after=. --num-samples 16

Writes benchmarks/results/ptq_ab.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, md_env, write  # noqa: E402

# Runs inside each tree: only APIs both the old and the new package have.
_CHILD = r"""
import json, logging, sys, time, torch
import optimum_lcqat
from transformers import AutoModelForCausalLM, AutoTokenizer
from optimum_lcqat import LCQATConfig
from optimum_lcqat.assets import smollm2_path
from optimum_lcqat.data import split_texts
from optimum_lcqat.evaluation import perplexity
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
torch.set_num_threads(int(sys.argv[3]))
path = smollm2_path()
tok = AutoTokenizer.from_pretrained(path)
cfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, num_samples=int(sys.argv[1]),
                  model_seqlen=int(sys.argv[2]), seed=int(sys.argv[4]))
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
seconds = time.perf_counter() - t
ids = tok("\n\n".join(split_texts("heldout")), return_tensors="pt").input_ids[0][:8192]
ppl = perplexity(model, ids, ctx=512)["ppl"]
print(json.dumps({"package": optimum_lcqat.__file__, "ptq_seconds": seconds, "heldout_ppl": ppl}))
"""

_BLOCK = re.compile(r"block (\d+): .*block output rel\. MSE ([0-9.e+-]+) -> ([0-9.e+-]+) after fine-tune")


def run_tree(root: str, args, seed: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    r = subprocess.run([sys.executable, "-P", "-c", _CHILD, str(args.num_samples), str(args.seqlen), str(args.threads),
                        str(seed)],
                       env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"PTQ in {root} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["block_mse_after_finetune"] = {int(m[1]): float(m[3]) for m in _BLOCK.finditer(r.stderr)}
    res["commit"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH", help="a source tree (give two or more)")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="PTQ seeds (signs of the rotations, calibration samples): the spread over seeds is the "
                        "noise a code change is compared with")
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    results = {}
    for name, root in trees.items():
        for seed in args.seeds:
            key = name if len(args.seeds) == 1 else f"{name} seed {seed}"
            print(f"PTQ in {key} ({root}) ...", flush=True)
            results[key] = dict(run_tree(root, args, seed), seed=seed)
            r = results[key]
            print(f"  {r['ptq_seconds']:.0f} s, held-out ppl {r['heldout_ppl']:.3f}", flush=True)
    env = environment()
    names = list(results)
    blocks = sorted(set.intersection(*(set(r["block_mse_after_finetune"]) for r in results.values())))
    lines = [
        "# PTQ A/B between source trees, SmolLM2-135M",
        md_env(env),
        f"{args.num_samples} calibration samples x {args.seqlen} tokens from split_texts('calibration'); "
        "held-out perplexity on the first 8192 tokens of split_texts('heldout') (never calibrated on), ctx 512. "
        "Trees run one after the other, each in a fresh interpreter.\n",
        "| tree | commit | seed | PTQ s | held-out ppl |", "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {r['commit'][:10]} | {r['seed']} | {r['ptq_seconds']:.0f} | {r['heldout_ppl']:.3f} |"
              for n, r in results.items()]
    if blocks:
        lines += ["", "Block output rel. MSE after the block fine-tune (every 5th block):", "",
                  "| block | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        lines += [f"| {b} | " + " | ".join(f"{results[n]['block_mse_after_finetune'][b]:.4g}" for n in names) + " |"
                  for b in blocks if b % 5 == 0 or b == blocks[-1]]
    md = "\n".join(lines) + "\n"
    print(md)
    print("wrote", *write("ptq_ab" + (f"_{args.tag}" if args.tag else ""), {"environment": env, "args": vars(args), "results": results}, md))


if __name__ == "__main__":
    main()
