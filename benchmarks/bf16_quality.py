"""What serving in bf16 costs in quality: held-out perplexity of SmolLM2-135M dense and 2-bit LC,
each with fp32 and with bf16 activations, in one run.

The LC model is a PTQ checkpoint (default: the `default` row of benchmarks/ablation.py, cached
under ~/.cache/optimum_lcqat/ablation/default; build it with `python -P benchmarks/ablation.py
--rows default`). "bf16": the dense tensors (embedding, norms, a dense model's linears) in bf16, the
LC layers' tensors in float32 as vLLM's plugin keeps them, so the LC layers' activations are bf16
and the native kernels take their bf16 paths (bf16 products on AVX512_BF16
CPUs; the 16-bit GEMV at 1-4 rows on VNNI CPUs; AMX from 5 rows). Perplexity is scored in batches
of 4 x 512 tokens, so the LC layers see 2048-row calls (the GEMM / AMX paths, not the decode GEMV).
Held-out text: the first --tokens tokens of the Python tutorial (the package's `heldout` split,
never calibrated on).

    PYTHONPATH=. python -P benchmarks/bf16_quality.py [--lc-dir DIR] [--tokens 16384]

Writes benchmarks/results/bf16_quality.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, md_env, write  # noqa: E402


def to_bf16_but_lc(model) -> None:
    """Everything in bf16 except the LC layers' own tensors, which stay float32 as vLLM's plugin
    keeps them (from_pretrained(dtype=bfloat16) would round s_u, s_v, A and beta to bf16 as well):
    what changes is the activations' dtype, which picks the kernels' bf16 paths."""
    from optimum_lcqat.nn import LCLinear

    lc = {id(t) for m in model.modules() if isinstance(m, LCLinear) for t in [*m.parameters(), *m.buffers()]}
    for m in model.modules():
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if id(t) not in lc and t.is_floating_point() and t.dtype == torch.float32 and "inv_freq" not in name:
                t.data = t.data.to(torch.bfloat16)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_lcqat.assets import default_cache_dir, smollm2_path
    from optimum_lcqat.data import split_texts, token_stream
    from optimum_lcqat.evaluation import perplexity

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lc-dir", default=str(default_cache_dir() / "ablation" / "default"),
                    help="a saved LC-QAT checkpoint of SmolLM2-135M")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--tag", default="bf16_quality")
    args = ap.parse_args()
    lc_dir = Path(args.lc_dir)
    if not (lc_dir / "config.json").is_file():
        raise SystemExit(f"{lc_dir} holds no checkpoint: build it with `python -P benchmarks/ablation.py --rows "
                         "default` (about 11 minutes) or give --lc-dir")
    torch.set_num_threads(2)
    env = environment()
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tokens = token_stream(split_texts("heldout"), tok, max_tokens=args.tokens)
    rows = []
    for name, path in (("dense", smollm2_path()), ("lcqat", lc_dir)):
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            if dtype == torch.bfloat16:
                to_bf16_but_lc(model)
            t = time.perf_counter()
            r = perplexity(model, tokens, ctx=512, batch_size=4)
            rows.append({"model": name, "activations": str(dtype).removeprefix("torch."), "ppl": r["ppl"],
                         "tokens_scored": r["tokens_scored"], "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
            del model
    by = {(r["model"], r["activations"]): r["ppl"] for r in rows}
    lines = ["# bf16 serving quality: SmolLM2-135M dense and 2-bit LC, fp32 and bf16 activations", "", md_env(env),
             f"Held-out perplexity, ctx 512, the first {args.tokens:,} tokens of the Python tutorial (scored: "
             f"{rows[0]['tokens_scored']:,}); LC checkpoint `{lc_dir}`.", "",
             "| model | fp32 activations | bf16 activations | bf16 / fp32 |", "|---|---:|---:|---:|"]
    for name in ("dense", "lcqat"):
        f, b = by[(name, "float32")], by[(name, "bfloat16")]
        lines.append(f"| {name} | {f:.3f} | {b:.3f} | {b / f:.4f} |")
    write(args.tag, {"environment": env, "lc_dir": str(lc_dir), "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
