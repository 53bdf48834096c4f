"""End-to-end greedy decode benchmark on the bundled SmolLM2-135M (batch 1).

Variants (all built in one process, measured round-robin so that load from other processes on
the machine hits them alike): fp32, bf16, LC-QAT 2-bit (quantized in flight, data-free init),
LC-QAT 2-bit with the lm_head stored as int8 (``lcqat_int8head``, see
optimum_lcqat/nn/int8_linear.py), the same with int8 activations (``lcqat_int8head_a8``,
``optimum_lcqat.set_int8_activations``), HQQ 2-bit (hqq's HQQLinear, group 64, RTN init; see
build()) and quanto int2 (optimum-quanto). Decoder linears are quantized; embeddings and lm_head
stay fp32 unless said. Speed does not depend on the code values, so the data-free model serves;
``--quality-dir`` measures what the inference options cost in held-out perplexity on a real
(PTQ) model.

Modes, compared like with like:
* ``eager``: ``model.generate`` with the default dynamic cache;
* ``compiled``: static cache + ``torch.compile`` of the decode step (transformers' auto-compile,
  forced on CPU with ``CompileConfig(_compile_all_devices=True)``), after a warm-up generate.

Decode tokens/s = (N - 1) / (time from the first new token to the N-th), timed inside one
``generate`` call by a stopping criterion that stamps every step: prefill is excluded, and the
compiled mode sees one static-cache shape (two calls of different lengths would compile two).

    PYTHONPATH=. python -P benchmarks/decode.py --threads 2              # everything (~10+ min)
    PYTHONPATH=. python -P benchmarks/decode.py --variants fp32 lcqat --modes eager

Writes benchmarks/results/decode_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, md_env, write  # noqa: E402

ALL_VARIANTS = ["fp32", "bf16", "lcqat", "lcqat_int8head", "lcqat_int8head_a8", "hqq", "quanto"]
PROMPT = "The history of the printing press begins"


def decoder_linears(model):
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            yield name, mod


def set_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def load_lcqat(path, opts):
    """The 2-bit LC-QAT SmolLM2: quantized in flight (data-free init) or, with ``--lc-dir``,
    loaded from that directory (quantized and saved there on first use)."""
    from transformers import AutoModelForCausalLM

    from optimum_lcqat import LCQATConfig

    lc_dir = opts.lc_dir
    if lc_dir and os.path.isfile(os.path.join(lc_dir, "config.json")):
        return AutoModelForCausalLM.from_pretrained(lc_dir, dtype=torch.float32)
    cfg = LCQATConfig(init_iters=opts.init_iters)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
    if lc_dir:
        model.save_pretrained(lc_dir)
    return model


def build(variant, path, lc_model_cache):
    from transformers import AutoModelForCausalLM

    if variant in ("fp32", "hqq", "quanto"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif variant == "bf16":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif variant in ("lcqat", "lcqat_int8head", "lcqat_int8head_a8"):
        model = load_lcqat(path, lc_model_cache)
        if variant != "lcqat":
            from optimum_lcqat import compact_lm_head

            compact_lm_head(model)
        if variant == "lcqat_int8head_a8":
            from optimum_lcqat import set_int8_activations

            set_int8_activations(model, True)
    else:
        raise ValueError(variant)
    if variant == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        cfg = BaseQuantizeConfig(nbits=2, group_size=64)
        # HQQ's half-quadratic optimisation of the zero-points takes seconds per layer on these 2
        # CPUs; it changes the values, not the format or the inference cost, so it is skipped
        # here (round-to-nearest init in HQQ's 2-bit format) to keep the run short.
        cfg["weight_quant_params"]["optimize"] = False
        for name, lin in list(decoder_linears(model)):
            set_module(model, name, HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu"))
    if variant == "quanto":
        from optimum.quanto import freeze, qint2, quantize

        quantize(model, weights=qint2, exclude=["lm_head"])
        freeze(model)
    model.eval()
    return model


class StepClock:
    """A stopping criterion that never stops; it records when each new token was produced."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(model, ids, n, compiled):
    """Greedy-generate n tokens; returns (decode tok/s over tokens 2..n, total seconds, output)."""
    from transformers import GenerationConfig, StoppingCriteriaList
    from transformers.generation import CompileConfig

    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=model.config.eos_token_id)
    if compiled:
        kw["cache_implementation"] = "static"
        cc = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        cc._compile_all_devices = True  # a class attribute in transformers 5, not an init argument
        kw["compile_config"] = cc
    else:
        kw["disable_compile"] = True
    gc_ = GenerationConfig(**kw)
    clock = StepClock()
    with torch.no_grad():  # not inference_mode: quanto's frozen modules reject inference tensors
        t0 = time.perf_counter()
        out = model.generate(ids, generation_config=gc_, stopping_criteria=StoppingCriteriaList([clock]))
        dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + n
    assert len(clock.stamps) == n, (len(clock.stamps), n)
    rate = (n - 1) / max(clock.stamps[-1] - clock.stamps[0], 1e-9) if n > 1 else float("nan")
    return rate, dt, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=ALL_VARIANTS, choices=ALL_VARIANTS)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--compiled-variants", nargs="+", default=["fp32", "bf16", "lcqat", "lcqat_int8head"],
                    choices=ALL_VARIANTS, help="variants also measured in compiled mode (compilation takes minutes each)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--lc-dir", default=None,
                    help="load the 2-bit model from here (quantize and save it here on first use) instead of "
                         "quantizing in flight on every run")
    ap.add_argument("--init-iters", type=int, default=4,
                    help="LCQATConfig.init_iters for the in-flight quantization (decode speed does not depend on it)")
    ap.add_argument("--only-quantize", action="store_true", help="with --lc-dir: quantize, save and exit")
    ap.add_argument("--quality-dir", default=None,
                    help="a saved lcqat checkpoint (e.g. the PTQ model of benchmarks/qat.py) on which to measure "
                         "what the inference-only options (int8 lm_head, int8 activations) cost in held-out perplexity")
    ap.add_argument("--quality-tokens", type=int, default=32768)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from optimum_lcqat.assets import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    env = environment()
    if args.only_quantize:
        load_lcqat(path, args)
        return

    models, build_s, errors = {}, {}, {}
    for v in args.variants:
        t0 = time.perf_counter()
        try:
            models[v] = build(v, path, args)
            build_s[v] = time.perf_counter() - t0
            print(f"built {v} in {build_s[v]:.1f}s", flush=True)
        except Exception as exc:  # a baseline that does not run here is reported, not fatal
            errors[v] = f"build: {type(exc).__name__}: {exc}"
            print(f"{v}: build failed: {exc}", flush=True)
            traceback.print_exc()

    results = {}
    texts = {}
    quality = {}

    def report(partial):
        """Write the table and JSON (also after every round, so an interrupted run keeps its data)."""
        hdr = f"{'variant':16s} " + " ".join(f"{m + ' tok/s':>16s} {'x fp32':>7s}" for m in args.modes)
        lines = [hdr]
        md = ["# End-to-end greedy decode, SmolLM2-135M, batch 1\n", md_env(env),
              f"\n{args.new_tokens} new tokens, prompt of {ids.shape[1]} tokens; decode tok/s = (N-1) / (time from new token 1 to N, one generate call), "
              f"median of {args.rounds} interleaved rounds; x fp32 = ratio to fp32 in the same mode. "
              "Variants are measured round-robin so that other load hits them alike; every round is in the JSON.\n\n",
              "| variant | " + " | ".join(f"{m} tok/s | x fp32 ({m})" for m in args.modes) + " |\n",
              "|---|" + "---:|---:|" * len(args.modes) + "\n"]
        for v in args.variants:
            cells, mcells = [], []
            for m in args.modes:
                r = results.get(f"{v}/{m}")
                base = results.get(f"fp32/{m}")
                if r is None:
                    cells.append(f"{'n/a':>16s} {'':>7s}")
                    mcells.append("n/a | ")
                    continue
                ratio = r["tok_s"] / base["tok_s"] if base else float("nan")
                r["x_fp32_same_mode"] = ratio
                cells.append(f"{r['tok_s']:16.1f} {ratio:7.2f}")
                mcells.append(f"{r['tok_s']:.1f} | {ratio:.2f}")
            lines.append(f"{v:16s} " + " ".join(cells))
            md.append(f"| {v} | " + " | ".join(mcells) + " |\n")
        if quality:
            md.append(f"\nWhat the inference options cost in quality: held-out perplexity of {quality['model']} "
                      f"on the first {quality['tokens']} tokens of split_texts('heldout') (never calibrated or "
                      "trained on), ctx 512, same model, one option set per row:\n\n| variant | ppl |\n|---|---:|\n")
            md.extend(f"| {k} | {v:.3f} |\n" for k, v in quality["ppl"].items())
        if errors:
            md.append("\nFailures:\n\n" + "".join(f"- {k}: {e}\n" for k, e in errors.items()))
        if not partial:
            print("\n".join(lines))
        paths = write(f"decode_{args.tag}", {"env": env, "args": vars(args), "build_s": build_s, "results": results,
                                             "errors": errors, "texts": texts, "quality": quality,
                                             "partial": partial}, "".join(md))
        if not partial:
            print("wrote", *paths)

    for mode in args.modes:
        compiled = mode == "compiled"
        live = []
        for v, model in models.items():  # warm-up (and compilation) first, then timed rounds
            if compiled and v not in args.compiled_variants:
                continue
            try:
                t0 = time.perf_counter()
                # compiled: a full run compiles the prefill and decode graphs; eager: a short run
                # warms the allocator and caches (the slow baselines make a full one costly here)
                _, _, out = generate(model, ids, args.new_tokens if compiled else 2, compiled)
                texts[f"{v}/{mode}"] = tok.decode(out[0, ids.shape[1]:])
                print(f"{mode:8s} {v:15s} warm-up {time.perf_counter() - t0:.1f}s", flush=True)
                live.append(v)
            except Exception as exc:
                errors[f"{v}/{mode}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"{mode} {v}: failed: {exc}", flush=True)
        rates = {v: [] for v in live}
        for r in range(args.rounds):
            for v in live:
                rate, _, _ = generate(models[v], ids, args.new_tokens, compiled)
                rates[v].append(rate)
            print(f"{mode} round {r}: " + ", ".join(f"{v} {rates[v][-1]:.1f}" for v in live), flush=True)
            for v in live:
                results[f"{v}/{mode}"] = {"variant": v, "mode": mode, "tok_s": statistics.median(rates[v]),
                                          "rounds_tok_s": list(rates[v])}
            report(partial=True)

    if args.quality_dir:
        quality.update(measure_quality(args.quality_dir, tok, args.quality_tokens))
    report(partial=False)


def measure_quality(lc_dir, tok, n_tokens):
    """Held-out perplexity of one saved lcqat model: as saved, with the int8 lm_head, and with
    the int8 lm_head and int8 activations (the speed variants' options)."""
    from transformers import AutoModelForCausalLM

    from optimum_lcqat import LCLinear, set_int8_activations
    from optimum_lcqat.data import split_texts, token_stream
    from optimum_lcqat.evaluation import perplexity
    from optimum_lcqat import compact_lm_head

    heldout = token_stream(split_texts("heldout"), tok, max_tokens=n_tokens)
    model = AutoModelForCausalLM.from_pretrained(lc_dir, dtype=torch.float32).eval()
    if not any(isinstance(m, LCLinear) for m in model.modules()):
        raise SystemExit(f"--quality-dir {lc_dir}: not an lcqat checkpoint (no LC layer after loading); "
                         "give a directory saved from a model quantized with LCQATConfig")
    ppl = {}
    for name in ("lcqat", "lcqat_int8head", "lcqat_int8head_a8"):
        if name == "lcqat_int8head":
            compact_lm_head(model)
        if name == "lcqat_int8head_a8":
            set_int8_activations(model, True)
        t0 = time.perf_counter()
        ppl[name] = perplexity(model, heldout, ctx=512, batch_size=4)["ppl"]
        print(f"quality {name}: held-out ppl {ppl[name]:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return {"model": lc_dir, "tokens": int(heldout.numel()), "ppl": ppl}


if __name__ == "__main__":
    main()
