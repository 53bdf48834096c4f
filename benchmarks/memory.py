"""Peak memory (RSS, what an OOM killer counts) and speed of QAT and PTQ, before and after the memory work.

Every case runs in a child process of its own (a fresh high-water mark) and reports its peak RSS
(getrusage), its seconds and tokens/s; the cases of one table run in the same invocation, one after
the other, so that their ratios compare like with like on this noisy machine.

Cases:
- qat/smollm2: SmolLM2-135M-Instruct (the bundled real model; its data-free LC checkpoint, made once
  and cached), plain Trainer + LCQATCallback, 4 x 512 tokens a step, the train split of the Python
  docs, --qat-steps steps (default 8; the issue's 64K-token run is --qat-steps 32), then held-out
  perplexity over --eval-tokens tokens; --qat-rounds N runs the variants N times, interleaved, with
  each variant's mean tokens/s and its ratio to the landed code round by round. Variants:
    landed 13c9e08  the package as it was before the memory work (--landed REF: git commit, built once
             into the cache with pip install --target, run with PYTHONPATH), quantized in flight
             (data-free, the same weights as the cached checkpoint) and trained with its
             LCQATCallback() defaults: the true baseline of issue #32's speed target;
    before (glibc heap, no savers)  LCQATCallback(chunked_loss=False, activation_checkpointing=False)
             with OPTIMUM_LCQAT_RETAIN_HEAP=glibc: the model's own loss over the batch's [tokens x
             vocab] fp32 logits, every block's activations kept, freed memory kept in glibc's heap
             (the library as it was before the memory work);
    defaults, glibc heap  chunked loss + per-block activation checkpointing, glibc's heap;
    defaults  the same with the extension's caching CPU allocator (the library's default now);
             the checkpointing is selective: each block keeps its attention output and down
             projection's product, the first blocks every LC product up to
             LCQATCallback(checkpoint_keep_mib=192) (nn/block_checkpointing.py);
    defaults, checkpoint_keep_mib=0  only the attention outputs and down products kept;
    defaults, full checkpointing  every op of a block recomputed (what selective checkpointing saves);
    defaults + 8-bit Adam  TrainingArguments(optim="adamw_torch_8bit"): torchao's 8-bit Adam states;
    chunked loss, no checkpointing  the caching allocator, every block's activations kept: the
             speed checkpointing costs.
- qat/llama-3.2-1b: random weights with Llama-3.2-1B's shapes (benchmarks/scale.py, all 16 blocks;
  data-free LC checkpoint cached), 1 x 512 tokens a step, defaults + 8-bit Adam, --qat-1b-steps steps.
- ptq/smollm2: the in-memory Hessian-aware PTQ of SmolLM2 with --ptq-samples calibration samples
  (default 32 x 512, the demo's; the library default is 128) from the calibration split: landed
  (the --landed commit's code and defaults, as for QAT), before
  (its end-to-end stage with the model's own loss and every block's activations kept:
  ``ptq_options={"e2e_memory_savers": False}``, glibc's heap) and after (the defaults: memory savers,
  caching allocator), with held-out perplexity; each once per --ptq-seeds seed (LCQATConfig(seed=):
  the calibration windows drawn and the random signs), the variants interleaved, and the mean
  perplexity per variant: one seed's difference may be the draw's, not the code's.
- streaming ptq: ``quantize_streaming`` (bf16, --ptq-samples x 512, no end-to-end stage) of random
  weights with SmolLM2-135M's shapes, its first 2 and 8 blocks (benchmarks/scale.py's sources): the
  peak (VmHWM) should not grow with depth.
Every row with a prediction shows optimum_lcqat.memory_plan's, made in the child before loading.
All QAT variants train through nn/lc_training.py's LCTrainingForward (the plain autograd path is
benchmarks/lc_training_fn.py's "old").

The figures and the command go to benchmarks/results/memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, md_env, write  # noqa: E402

QAT_CHILD = r"""
import json, os, resource, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, TrainerCallback
from optimum_lcqat import LCQATConfig, LCQATCallback
from optimum_lcqat.assets import smollm2_path, default_cache_dir
from optimum_lcqat.data import split_texts, token_windows, token_stream
from optimum_lcqat.evaluation import perplexity

v = json.loads(sys.argv[1])  # model, steps, batch, seqlen, chunked, ckpt, optim, eval_tokens
steps, batch, seqlen = v["steps"], v["batch"], v["seqlen"]
if v["model"] == "smollm2":
    fp = smollm2_path()
    lc_dir = default_cache_dir() / "bench-memory-smollm2-datafree"
else:  # a random-weight config of benchmarks/scale.py, all its blocks
    sys.path.insert(0, os.environ["BENCH_DIR"])
    from scale import make_source
    fp = make_source(v["model"], None)
    lc_dir = default_cache_dir() / f"bench-memory-{v['model']}-datafree"
tok = AutoTokenizer.from_pretrained(fp)
if v.get("landed"):  # the code of an earlier commit (PYTHONPATH): quantized in flight, its callback's defaults
    lc_dir = None
elif not (lc_dir / "model.safetensors").is_file() and not (lc_dir / "model.safetensors.index.json").is_file():
    from optimum_lcqat._atomic import write_dir_atomic
    m = AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float32, quantization_config=LCQATConfig())
    write_dir_atomic(lc_dir, m.save_pretrained)
    print("RESULT_PREP", flush=True)
    sys.exit(0)  # the peak of making the LC checkpoint is not QAT's: the parent runs the case again
ds = token_windows(split_texts("train"), tok, seqlen, max_tokens=seqlen * batch * (steps + 1))
if v.get("landed"):
    predicted = None
    model = AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float32, quantization_config=LCQATConfig())
else:
    from optimum_lcqat import memory_plan as mp
    predicted = mp.qat(mp.ModelShape.from_pretrained_config(fp), batch * seqlen, optim=v["optim"],
                       checkpoint_keep_mib=v.get("keep")).total  # before loading
    model = AutoModelForCausalLM.from_pretrained(lc_dir, dtype=torch.float32)
times = []
class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
if v.get("landed"):
    cb = LCQATCallback()
else:
    if v.get("ckpt") == "full":  # every op of a block recomputed (no selective policy)
        model.activation_checkpointing_enable({"use_reentrant": False})
    keep = {} if v.get("keep") is None else {"checkpoint_keep_mib": v["keep"]}
    cb = LCQATCallback(chunked_loss=v["chunked"], activation_checkpointing=bool(v["ckpt"]), **keep)
args = TrainingArguments(output_dir=os.environ["BENCH_TMP"], per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=1e-4, save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True,
                         use_cpu=True, dataloader_num_workers=0, optim=v["optim"])
tr = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb, Timer()])
tr.train()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
later = times[2:] or times  # the first two steps grow the heap (and compile the 8-bit optimizer's step)
import optimum_lcqat
out = {"peak_rss_bytes": peak, "step_s": times, "package": optimum_lcqat.__file__,
       "tokens_per_s": batch * seqlen * len(later) / sum(later),
       "loss": [h["loss"] for h in tr.state.log_history if "loss" in h],
       "params": sum(p.numel() for p in model.parameters())}
if predicted is not None:
    out["predicted_bytes"] = predicted
if v["eval_tokens"]:
    model.eval()
    out["heldout_ppl"] = perplexity(model, token_stream(split_texts("heldout"), tok, max_tokens=v["eval_tokens"]), ctx=512)["ppl"]
print("RESULT " + json.dumps(out))
"""

PTQ_CHILD = r"""
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from optimum_lcqat import LCQATConfig
from optimum_lcqat.assets import smollm2_path
from optimum_lcqat.data import split_texts, token_stream
from optimum_lcqat.evaluation import perplexity

samples, variant, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
fp = smollm2_path()
tok = AutoTokenizer.from_pretrained(fp)
if variant == "landed":  # the code of an earlier commit (PYTHONPATH), its defaults
    cfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, num_samples=samples, seed=seed)
    predicted = None
else:
    cfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, num_samples=samples, seed=seed,
                      ptq_options={"e2e_memory_savers": variant == "after"})
    from optimum_lcqat import memory_plan as mp
    predicted = mp.in_memory_ptq(mp.ModelShape.from_pretrained_config(fp), cfg).total  # before the model loads
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float32, quantization_config=cfg)
secs = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = token_stream(split_texts("heldout"), tok, max_tokens=16384)
ppl = perplexity(model, held, ctx=512)["ppl"]
out = {"peak_rss_bytes": peak, "seconds": secs, "heldout_ppl": ppl, "params": sum(p.numel() for p in model.parameters())}
if predicted is not None:
    out["predicted_bytes"] = predicted
print("RESULT " + json.dumps(out))
"""


STREAM_CHILD = r"""
import json, os, sys, time
import torch
sys.path.insert(0, os.environ["BENCH_DIR"])
from scale import make_source  # random bf16 weights with SmolLM2-135M's shapes, the first L blocks (cached)
from transformers import AutoTokenizer
from optimum_lcqat import LCQATConfig
from optimum_lcqat.data import split_texts
from optimum_lcqat.init.ptq_blocks import peak_rss_bytes
from optimum_lcqat.streaming import quantize_streaming

layers, samples = int(sys.argv[1]), int(sys.argv[2])
src = make_source("smollm2-135m", layers)
open("/proc/self/clear_refs", "w").write("5")  # the peak of the PTQ, not of writing an uncached source
tok = AutoTokenizer.from_pretrained(src)
cfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, num_samples=samples, ptq_e2e_steps=0)
from optimum_lcqat import memory_plan as mp
predicted = mp.streaming_ptq(mp.ModelShape.from_pretrained_config(src), cfg, dtype_bytes=2).total
t = time.perf_counter()
rep = quantize_streaming(src, os.path.join(os.environ["BENCH_TMP"], "out"), cfg, dtype=torch.bfloat16)
print("RESULT " + json.dumps({"peak_rss_bytes": peak_rss_bytes(), "predicted_bytes": predicted,
                             "seconds": time.perf_counter() - t, "blocks": rep["blocks"]}))
"""


def run_child(code: str, argv: list[str], env_extra: dict, timeout: float) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lcqat-bench-mem-") as tmp:
        env = {**os.environ, "BENCH_TMP": tmp, "BENCH_DIR": os.path.dirname(os.path.abspath(__file__)), **env_extra}
        t = time.time()
        proc = subprocess.run([sys.executable, "-P", "-c", code, *argv], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=tmp)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode == 0 and "RESULT_PREP" in proc.stdout:
        raise NoResult("prepared a cached checkpoint")
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {argv} {env_extra} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.time() - t
    return out


def run_qat(settings: dict, env_extra: dict) -> dict:
    """One QAT case; the first run of a model makes its data-free LC checkpoint (cached) and stops,
    so the case is run again for the peak of QAT alone."""
    code_arg = [json.dumps(settings)]
    try:
        return run_child(QAT_CHILD, code_arg, env_extra, 3600)
    except NoResult:
        return run_child(QAT_CHILD, code_arg, env_extra, 3600)


class NoResult(RuntimeError):
    pass


def landed_build(ref: str) -> tuple[str, str]:
    """``(site dir, full hash)``: the package as it was at git ``ref``, built once into the cache
    (a detached worktree, then ``pip install --target``), for a same-run baseline of the old code."""
    from optimum_lcqat.assets import default_cache_dir

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = subprocess.run(["git", "-C", root, "rev-parse", ref], capture_output=True, text=True, check=True).stdout.strip()
    site = default_cache_dir() / f"landed-{full[:12]}"
    if not (site / "optimum_lcqat").is_dir():
        import tempfile

        with tempfile.TemporaryDirectory(prefix="lcqat-landed-") as tmp:
            tree = os.path.join(tmp, "tree")
            subprocess.run(["git", "-C", root, "worktree", "add", "--detach", tree, full], check=True, capture_output=True)
            try:
                staging = os.path.join(tmp, "site")
                subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                                "--no-build-isolation", "--target", staging, tree], check=True)
                os.replace(staging, site)  # the cache holds a complete build or none
            finally:
                subprocess.run(["git", "-C", root, "worktree", "remove", "--force", tree], capture_output=True)
    return str(site), full


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qat-steps", type=int, default=8)
    ap.add_argument("--ptq-samples", type=int, default=32)
    ap.add_argument("--skip-ptq", action="store_true")
    ap.add_argument("--skip-qat", action="store_true", help="no QAT case (the PTQ rows only)")
    ap.add_argument("--ptq-variants", nargs="+", metavar="NAME", choices=("landed", "before", "after"),
                    help="only these in-memory PTQ variants (default: all)")
    ap.add_argument("--skip-streaming", action="store_true", help="no streaming PTQ rows")
    ap.add_argument("--ptq-seeds", type=int, nargs="+", default=[0], metavar="SEED",
                    help="LCQATConfig(seed=...) of the in-memory PTQ rows (calibration sampling, random signs): "
                         "each variant once per seed, interleaved, and the mean held-out ppl per variant")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored after each SmolLM2 QAT case")
    ap.add_argument("--variants", nargs="+", metavar="NAME",
                    help="only these SmolLM2 QAT variants, by name (e.g. 'defaults' 'defaults + 8-bit Adam')")
    ap.add_argument("--qat-rounds", type=int, default=1, metavar="N",
                    help="run the SmolLM2 QAT variants N times, interleaved (landed, defaults, ..., landed, ...), "
                         "and report each variant's mean tokens/s and its ratio to the landed code per round: "
                         "this VM drifts ~5%% within minutes")
    ap.add_argument("--qat-1b-steps", type=int, default=4, help="steps of the Llama-3.2-1B-shaped QAT case (0: skip)")
    ap.add_argument("--landed", default="13c9e08", metavar="REF",
                    help="git commit of the 'landed before' QAT row (the code before the memory work; '' to skip)")
    ap.add_argument("--name", default="memory")
    ap.add_argument("--render", metavar="JSON", help="only re-render the table of a saved run's JSON")
    a = ap.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            saved = json.load(f)
        render(saved["rows"], saved["env"], argparse.Namespace(**saved["args"]))
        return 0
    env = environment()
    rows = []
    glibc = {"OPTIMUM_LCQAT_RETAIN_HEAP": "glibc"}
    small = dict(model="smollm2", steps=a.qat_steps, batch=4, seqlen=512, eval_tokens=a.eval_tokens)
    fused, adam8 = "adamw_torch_fused", "adamw_torch_8bit"
    qat_cases = [  # (variant, settings, environment): the same run, one after the other
        ("before (glibc heap, no savers)", dict(chunked=False, ckpt=False, optim=fused), glibc),
        ("defaults, glibc heap", dict(chunked=True, ckpt=True, optim=fused), glibc),
        ("defaults", dict(chunked=True, ckpt=True, optim=fused), {}),
        ("defaults, checkpoint_keep_mib=0", dict(chunked=True, ckpt=True, optim=fused, keep=0), {}),
        ("defaults, full checkpointing", dict(chunked=True, ckpt="full", optim=fused), {}),
        ("defaults + 8-bit Adam", dict(chunked=True, ckpt=True, optim=adam8), {}),
        ("chunked loss, no checkpointing", dict(chunked=True, ckpt=False, optim=fused), {}),
    ]
    if a.variants:
        qat_cases = [c for c in qat_cases if c[0] in a.variants]
    if a.skip_qat:
        qat_cases, a.qat_1b_steps = [], 0
    site = full = None
    if a.landed:
        site, full = landed_build(a.landed)
        env["landed_before"] = full
        if not a.skip_qat:
            qat_cases.insert(0, (f"landed {full[:7]} (LCQATCallback())", dict(landed=True, optim=fused),
                                 {"PYTHONPATH": site}))
    for qat_round, (variant, settings, extra) in ((k, c) for k in range(a.qat_rounds) for c in qat_cases):
        print(f"qat/smollm2 {variant} (round {qat_round + 1}/{a.qat_rounds}) ...", flush=True)
        r = run_qat({**small, **settings}, extra)
        rows.append({"case": "qat/smollm2 4x512", "variant": variant, "round": qat_round, **r})
        print(f"  peak {r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['tokens_per_s']:.1f} tok/s", flush=True)
    if a.qat_1b_steps:
        big = dict(model="llama-3.2-1b", steps=a.qat_1b_steps, batch=1, seqlen=512, eval_tokens=0, chunked=True,
                   ckpt=True, optim=adam8)
        print("qat/llama-3.2-1b config ...", flush=True)
        r = run_qat(big, {})
        rows.append({"case": "qat/llama-3.2-1b shapes (random) 1x512", "variant": "defaults + 8-bit Adam", **r})
        print(f"  peak {r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['tokens_per_s']:.1f} tok/s", flush=True)
    if not a.skip_ptq:
        ptq_cases = [("before", glibc), ("after", {})]
        if a.landed:
            ptq_cases.insert(0, ("landed", {"PYTHONPATH": site}))
        if a.ptq_variants:
            ptq_cases = [c for c in ptq_cases if c[0] in a.ptq_variants]
        for seed, (variant, extra) in ((seed, case) for seed in a.ptq_seeds for case in ptq_cases):
            print(f"ptq/smollm2 {variant} seed {seed} ...", flush=True)
            r = run_child(PTQ_CHILD, [str(a.ptq_samples), variant, str(seed)], extra, 7200)
            name = f"landed {full[:7]}" if variant == "landed" else variant
            rows.append({"case": f"ptq/smollm2 {a.ptq_samples}x512 in memory", "variant": name, "seed": seed, **r})
            print(f"  peak {r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['seconds']:.0f} s, ppl {r['heldout_ppl']:.2f}",
                  flush=True)
        for layers in () if a.skip_streaming else (2, 8):
            print(f"streaming ptq/smollm2 shapes, {layers} blocks ...", flush=True)
            r = run_child(STREAM_CHILD, [str(layers), str(a.ptq_samples)], {}, 7200)
            rows.append({"case": f"streaming ptq/smollm2 shapes (random bf16) {a.ptq_samples}x512",
                         "variant": f"{layers} blocks", **r})
            print(f"  peak {r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['seconds']:.0f} s", flush=True)
    render(rows, env, a)
    return 0


def fp_parameters() -> int:
    """Parameters of the full-precision SmolLM2 (the denominator of bytes/param: the LC model's own
    parameter count leaves out its codes, and training adds the latents)."""
    from safetensors import safe_open

    from optimum_lcqat.assets import smollm2_path

    n = 0
    for f in sorted(smollm2_path().glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def config_parameters(name: str) -> int:
    """Parameters of a benchmarks/scale.py config (from its config.json, on the meta device)."""
    from scale import make_source

    from optimum_lcqat.memory_plan import ModelShape

    return ModelShape.from_pretrained_config(make_source(name, None)).params


def render(rows, env, a) -> None:
    fp = fp_parameters()
    for r in rows:
        r["peak_rss_gib"] = r["peak_rss_bytes"] / 2**30
        if "llama-3.2-1b" in r["case"]:
            r["fp_params"] = config_parameters("llama-3.2-1b")
        else:
            r["fp_params"] = fp
        r["bytes_per_param"] = r["peak_rss_bytes"] / r["fp_params"]
    lines = [f"# Peak memory of QAT and PTQ ({a.name})", "", md_env(env), "",
             "| case | variant | peak RSS GiB | predicted GiB | bytes/param | speed | held-out ppl |",
             "|---|---|---|---|---|---|---|"]
    seeds = len(getattr(a, "ptq_seeds", [0]) or [0]) > 1
    for r in rows:
        speed = f"{r['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in r else f"{r['seconds']:.0f} s"
        ppl = f"{r['heldout_ppl']:.2f}" if "heldout_ppl" in r else ""
        pred = f"{r['predicted_bytes'] / 2**30:.2f}" if "predicted_bytes" in r else ""
        variant = f"{r['variant']}, seed {r['seed']}" if seeds and "seed" in r else r["variant"]
        if getattr(a, "qat_rounds", 1) > 1 and "round" in r:
            variant += f", round {r['round'] + 1}"
        lines.append(f"| {r['case']} | {variant} | {r['peak_rss_gib']:.2f} | {pred} | {r['bytes_per_param']:.0f} | "
                     f"{speed} | {ppl} |")
    ptq = {}
    for r in rows:
        if "seed" in r:
            ptq.setdefault(r["variant"], []).append(r)
    if seeds and ptq:
        lines += ["", "In-memory PTQ over the seeds (mean, and min-max):", "",
                  "| variant | seeds | mean seconds | mean held-out ppl | ppl range |", "|---|---|---|---|---|"]
        for variant, rs in ptq.items():
            ppls = [r["heldout_ppl"] for r in rs]
            lines.append(f"| {variant} | {len(rs)} | {sum(r['seconds'] for r in rs) / len(rs):.0f} | "
                         f"{sum(ppls) / len(ppls):.2f} | {min(ppls):.2f}-{max(ppls):.2f} |")
    rounds = {}
    for r in rows:
        if r["case"].startswith("qat/smollm2") and "round" in r:
            rounds.setdefault(r["variant"], {})[r["round"]] = r
    landed = next((v for v in rounds if v.startswith("landed")), None)
    if getattr(a, "qat_rounds", 1) > 1 and rounds:
        lines += ["", "SmolLM2 QAT over the interleaved rounds (tokens/s: mean and min-max; ratio: to the landed "
                  "code of the same round, then the mean):", "",
                  "| variant | rounds | mean peak RSS GiB | mean tok/s | tok/s range | ratio to landed, per round | mean ratio |",
                  "|---|---|---|---|---|---|---|"]
        for variant, by_round in rounds.items():
            speeds = [r["tokens_per_s"] for r in by_round.values()]
            peaks = [r["peak_rss_gib"] for r in by_round.values()]
            ratios = ([by_round[k]["tokens_per_s"] / rounds[landed][k]["tokens_per_s"]
                       for k in sorted(by_round) if k in rounds[landed]] if landed else [])
            per = ", ".join(f"{x:.3f}" for x in ratios)
            mean_ratio = f"{sum(ratios) / len(ratios):.3f}" if ratios else ""
            lines.append(f"| {variant} | {len(speeds)} | {sum(peaks) / len(peaks):.2f} | "
                         f"{sum(speeds) / len(speeds):.1f} | {min(speeds):.1f}-{max(speeds):.1f} | {per} | {mean_ratio} |")
    lines += ["", f"bytes/param: peak RSS over the full-precision model's parameters (SmolLM2: {fp / 1e6:.1f}M). "
              "QAT tokens/s: steps 3 on (the first two grow the heap and compile the 8-bit optimizer's step). "
              f"Held-out ppl (never calibrated or trained on): QAT rows, the first {a.eval_tokens} tokens of the "
              "held-out split after the run (from the data-free 2-bit start: what the optimizers change, not a "
              "quality figure of the method); PTQ rows, its first 16K tokens. Peak RSS: getrusage's high-water "
              "mark of the child. Predicted: optimum_lcqat.memory_plan's prediction for the callback's defaults "
              "with the row's optimizer (QAT; so not for the 'before' and 'no checkpointing' rows) and for the "
              "default memory savers (PTQ: the 'after' row), made in the child before the model loads."]
    md = "\n".join(lines) + "\n"
    print(md)
    write(a.name, {"env": env, "rows": rows, "args": vars(a)}, md)


if __name__ == "__main__":
    raise SystemExit(main())
