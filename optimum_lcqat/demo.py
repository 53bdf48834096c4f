"""The bundled demo: SmolLM2-135M to 2 bits, before/after on held-out text, saved, sampled.

Held-out text: the Python tutorial (optimum_lcqat.data split "heldout"); PTQ calibrates on the
pydoc topics ("calibration"), QAT trains on the rest of the Python docs ("train").
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ._atomic import atomic_path, write_text_atomic

PROMPT = "In Python, a list comprehension"


def _generate(model, tok, prompt: str = PROMPT, n: int = 40) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["stage"] for r in rows]
    vals = [r["ppl"] for r in rows]
    bars = ax.bar(names, vals, color=["#4c72b0", "#c44e52", "#dd8452", "#55a868"][: len(rows)])
    ax.set_yscale("log")
    ax.set_ylim(bottom=1)  # bars from ppl 1 (a perfect model), so heights compare on the log scale
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M: full precision vs LC-QAT 2-bit (Python tutorial, ctx 512)")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _machine() -> dict:
    import os

    import transformers

    from ._machine import cpu_info, git_commit

    from . import __version__

    # A commit only for a source checkout of this package: an installed copy may sit inside some
    # other git repository (pyenv's own checkout, for one) whose commit says nothing about us.
    src = Path(__file__).resolve().parent.parent
    commit = git_commit(src) if (src / "setup.py").is_file() and (src / "csrc").is_dir() else None
    return {"cpu": cpu_info()["model"], "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "optimum_lcqat": __version__, "git_commit": commit}


def run_demo(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .assets import smollm2_path
    from .config import LCQATConfig
    from .quant_api import quantize
    from .convert import lc_layers
    from .data import split_texts, token_stream
    from .evaluation import perplexity
    from .hub import checkpoint_info, save_atomically, write_model_card

    torch.manual_seed(args.seed)
    out = Path(args.output)
    fp_dir = smollm2_path()
    tok = AutoTokenizer.from_pretrained(fp_dir)
    heldout = token_stream(split_texts("heldout"), tok, max_tokens=args.eval_tokens)
    rows, timings = [], {}

    print(f"[1/5] full precision: {fp_dir}")
    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    r = perplexity(fp, heldout, ctx=512, progress=True)
    rows.append({"stage": "fp32", "ppl": r["ppl"]})
    sample_fp = _generate(fp, tok)

    t = time.time()
    if args.data_free:
        print("[2/5] quantizing to 2 bits (data-free initialisation)")
        cfg = LCQATConfig(seed=args.seed)
        label = "2-bit data-free"
    else:
        print(f"[2/5] quantizing to 2 bits (Hessian-aware PTQ, {args.num_samples} x 512 calibration tokens)")
        cfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, num_samples=args.num_samples, seed=args.seed)
        label = "2-bit PTQ"
    model = quantize(fp, cfg)  # in place: the float model becomes the 2-bit one
    del fp
    timings["quantize_s"] = time.time() - t
    r = perplexity(model, heldout, ctx=512, progress=True)
    rows.append({"stage": label, "ppl": r["ppl"]})

    if args.qat_tokens:
        print(f"[3/5] QAT for {args.qat_tokens} tokens on the train split")
        from .training.recipes import run_qat

        t = time.time()
        qat = run_qat(model, tok, split_texts("train"), tokens=args.qat_tokens, seqlen=512, seed=args.seed)
        timings["qat_s"] = time.time() - t
        r = perplexity(model, heldout, ctx=512, progress=True)
        rows.append({"stage": f"+ QAT {args.qat_tokens // 1000}K tok", "ppl": r["ppl"], "qat": qat})
    else:
        print("[3/5] QAT skipped (--qat-tokens 0)")

    print(f"[4/5] saving to {out}")

    def write(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_model_card(tmp, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                         metrics={"held-out perplexity (Python tutorial, ctx 512)": f"{rows[-1]['ppl']:.2f}"})

    save_atomically(out, write, overwrite=True)
    info = checkpoint_info(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    sample_q = _generate(again, tok)

    print("[5/5] report")
    report = {
        "command": " ".join(["optimum-lcqat"] + sys.argv[1:]),
        "machine": _machine(),
        "model": "SmolLM2-135M-Instruct",
        "heldout": f"Python tutorial, first {heldout.numel()} tokens, ctx 512",
        "rows": rows,
        "timings": timings,
        "converted_layers": len(lc_layers(again)),
        "bits_per_weight_converted": info["bits_per_weight_converted"],
        "checkpoint_mib": info["size_bytes"] / 2**20,
        "sample_fp32": sample_fp,
        "sample_2bit": sample_q,
    }
    print()
    print(f"{'stage':<22} {'held-out ppl':>12}")
    for row in rows:
        print(f"{row['stage']:<22} {row['ppl']:>12.2f}")
    print(f"\nconverted linears: {report['converted_layers']}, {report['bits_per_weight_converted']:.3f} bits/weight, "
          f"checkpoint {report['checkpoint_mib']:.1f} MiB ({out})")
    print(f"timings: {', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}")
    print(f"\nfp32 : {sample_fp!r}\n2-bit: {sample_q!r}")
    write_text_atomic(out / "demo_report.json", json.dumps(report, indent=2, default=str))
    _chart(rows, out / "demo_results.png")
    print(f"\nreport: {out / 'demo_report.json'}  chart: {out / 'demo_results.png'}")
    return report
