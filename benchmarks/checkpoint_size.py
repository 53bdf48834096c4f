"""Checkpoint size a user sees, and what each storage choice costs in held-out perplexity.

SmolLM2-135M (the bundled copy), saved five ways with ``save_pretrained`` and loaded back with
``from_pretrained`` (every figure is measured on the model as loaded from disk):

* ``fp32``: the original, float32;
* ``bf16``: the original, bfloat16;
* ``lc_fp32``: LC-QAT 2-bit, the tensors that are not LC layers (tied embedding, norms) in fp32;
* ``lc_bf16``: the same 2-bit model, ``LCQATConfig(dense_dtype="bfloat16")``;
* ``lc_bf16_int8head``: the same, plus ``lm_head_int8=True`` (lm_head int8 + fp32 row scales;
  SmolLM2 ties lm_head to the embedding, so the embedding is kept, in bf16, for the lookup).

The 2-bit model is quantized once, with a fast PTQ setting (``--num-samples`` x 512 calibration
tokens of the pydoc topics, ``--ptq-finetune-steps``), and the three 2-bit files are saved from
that one model. Perplexity: ``optimum_lcqat.evaluation.perplexity`` at context 512 on the first
``--eval-tokens`` tokens of the held-out split (the Python tutorial; never calibrated on). Every
model is loaded with ``dtype=torch.float32``, so the perplexity differences are those of storage
alone (a bf16 file's tensors are cast up on load).

Run (from the repository root):
    PYTHONPATH=$PWD nice -n 10 python -P benchmarks/checkpoint_size.py           # writes results/checkpoint_size.*
    PYTHONPATH=$PWD python -P benchmarks/checkpoint_size.py --quick              # smoke run (checkpoint_size_quick.*)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, md_env, write  # noqa: E402

VARIANTS = {
    "fp32": "original, fp32",
    "bf16": "original, bf16",
    "lc_fp32": "2-bit LC, dense tensors fp32",
    "lc_bf16": "2-bit LC + `dense_dtype=\"bfloat16\"`",
    "lc_bf16_int8head": "2-bit LC + bf16 dense + `lm_head_int8=True`",
}
MIB = 2**20


def file_breakdown(folder: Path) -> dict:
    """Bytes of the safetensors files, and of their tensors by kind (from the headers)."""
    from optimum_lcqat.checkpoint import lc_module_names, read_header

    kinds = {"lc_layers": 0, "embedding": 0, "lm_head": 0, "dense_linears": 0, "other": 0}
    total = 0
    files = sorted(folder.glob("*.safetensors"))
    lc_modules = set()
    headers = []
    for f in files:
        total += f.stat().st_size
        headers.append(read_header(str(f))[0])
    for h in headers:
        lc_modules |= set(lc_module_names(h))
    for h in headers:
        for key, info in h.items():
            if key == "__metadata__":
                continue
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            module = key.rpartition(".")[0]
            if module in lc_modules:
                kinds["lc_layers"] += nbytes
            elif "embed_tokens" in key:
                kinds["embedding"] += nbytes
            elif module == "lm_head":
                kinds["lm_head"] += nbytes
            elif key.endswith("proj.weight"):
                kinds["dense_linears"] += nbytes
            else:
                kinds["other"] += nbytes
    return {"file_bytes": total, "files": [f.name for f in files], "tensor_bytes": kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 calibration samples, no fine-tuning, 2048 eval tokens")
    ap.add_argument("--num-samples", type=int, default=None, help="PTQ calibration samples of 512 tokens (default 16)")
    ap.add_argument("--ptq-finetune-steps", type=int, default=None, help="PTQ block fine-tuning steps (default 0)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens evaluated (default 8192)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-dir", default=None, help="save the five checkpoints here (default: a temporary folder, removed)")
    args = ap.parse_args()
    if args.num_samples is None:
        args.num_samples = 8 if args.quick else 16
    if args.ptq_finetune_steps is None:
        args.ptq_finetune_steps = 0
    if args.eval_tokens is None:
        args.eval_tokens = 2048 if args.quick else 8192

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_lcqat import Int8Linear, LCQATConfig
    from optimum_lcqat.assets import smollm2_path
    from optimum_lcqat.convert import lc_layers
    from optimum_lcqat.data import split_texts, token_stream
    from optimum_lcqat.evaluation import perplexity

    env = environment()
    torch.manual_seed(args.seed)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    heldout = token_stream(split_texts("heldout"), tok, max_tokens=args.eval_tokens)
    root = Path(args.keep_dir) if args.keep_dir else Path(tempfile.mkdtemp(prefix="lcqat_ckpt_size_"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}

    def measure(name: str, folder: Path) -> None:
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        head = model.get_output_embeddings()
        with torch.no_grad():
            ppl = perplexity(model, heldout, ctx=512, batch_size=4)
        results[name] = {
            "label": VARIANTS[name], **file_breakdown(folder), "perplexity": ppl["ppl"], "nll": ppl["nll"],
            "tokens_scored": ppl["tokens_scored"], "lc_layers_loaded": len(lc_layers(model)),
            "lm_head_loaded_as": type(head).__name__, "eval_seconds": time.perf_counter() - t,
        }
        r = results[name]
        print(f"{name:18s} {r['file_bytes'] / MIB:8.1f} MiB  ppl {r['perplexity']:.3f}  head {r['lm_head_loaded_as']}", flush=True)
        del model

    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            model.save_pretrained(root / name)
            del model
            measure(name, root / name)

        t = time.perf_counter()
        cfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, num_samples=args.num_samples,
                          model_seqlen=512, ptq_finetune_steps=args.ptq_finetune_steps, seed=args.seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
        quantize_s = time.perf_counter() - t
        ptq = {k: getattr(cfg, k) for k in ("num_samples", "model_seqlen", "init_iters", "ptq_refine_passes",
                                            "ptq_finetune_steps", "ptq_finetune_lr", "ptq_damp", "seed")}
        print(f"quantized in {quantize_s:.0f} s ({ptq})", flush=True)
        qcfg = model.hf_quantizer.quantization_config
        for name, dense_dtype, int8 in (("lc_fp32", None, False), ("lc_bf16", "bfloat16", False),
                                        ("lc_bf16_int8head", "bfloat16", True)):
            qcfg.dense_dtype, qcfg.lm_head_int8 = dense_dtype, int8
            if model.config.quantization_config is not qcfg:  # the config.json written comes from here
                model.config.quantization_config = qcfg
            model.save_pretrained(root / name)
            measure(name, root / name)
        del model
    finally:
        if not args.keep_dir:
            shutil.rmtree(root, ignore_errors=True)

    assert results["lc_bf16_int8head"]["lm_head_loaded_as"] == Int8Linear.__name__
    bf16 = results["bf16"]
    for r in results.values():
        r["size_vs_bf16_original"] = r["file_bytes"] / bf16["file_bytes"]
    payload = {
        "benchmark": "checkpoint_size", "model": "SmolLM2-135M (bundled, optimum_lcqat.assets.smollm2_path)",
        "environment": env, "ptq_config": ptq, "quantization_seconds": quantize_s,
        "eval": {"split": "heldout (Python tutorial)", "max_tokens": args.eval_tokens, "ctx": 512,
                 "load_dtype": "float32"},
        "results": results,
    }
    lines = [
        "# Checkpoint size and held-out perplexity of each storage choice (SmolLM2-135M)",
        "",
        md_env(env),
        f"2-bit model: PTQ once ({ptq['num_samples']} x {ptq['model_seqlen']} calibration tokens of the pydoc "
        f"topics, {ptq['ptq_finetune_steps']} block fine-tuning steps, {quantize_s:.0f} s); the three 2-bit "
        f"files are saved from that one model. Perplexity at context 512 on {results['fp32']['tokens_scored']} "
        "scored tokens of the held-out Python tutorial, every file loaded with dtype=float32.",
        "",
        "| checkpoint | model.safetensors | vs bf16 original | embedding | lm_head | decoder linears | held-out ppl |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        tb = r["tensor_bytes"]
        head = f"{tb['lm_head'] / MIB:.1f} MiB" if tb["lm_head"] else "(tied)"
        lc = f"{(tb['lc_layers'] + tb['dense_linears']) / MIB:.1f} MiB"
        lines.append(
            f"| {r['label']} | {r['file_bytes'] / MIB:.1f} MiB | {r['size_vs_bf16_original']:.2f}x | "
            f"{tb['embedding'] / MIB:.1f} MiB | {head} | {lc} | {r['perplexity']:.3f} |"
        )
    md = "\n".join(lines) + "\n"
    jpath, mpath = write("checkpoint_size_quick" if args.quick else "checkpoint_size", payload, md)
    print(md)
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
