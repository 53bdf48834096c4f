"""Mixture-of-experts benchmark (issue #30): Qwen3-30B-A3B's shapes at reduced depth.

A random Qwen3-MoE with the shapes of Qwen3-30B-A3B (hidden 2048, 128 experts of width 768,
top-8, 32 query / 4 key-value heads of 128) but ``--blocks`` decoder blocks instead of 48; the
per-block figures are measured and the whole model's are extrapolated from them (said in the table).

1. **Decode, batch 1, in transformers**: the dense bf16 model (transformers' own experts
   implementation, the default ``grouped_mm``) against the same weights converted to LC-QAT 2-bit
   (data-free init: decode speed does not depend on how the codes were found), in one process,
   rounds interleaved. Timed: the decoder blocks (``model.model``: embedding lookup, blocks, final
   norm) for one new token after a ``--prompt``-token prompt, median over the steps of a round
   and over rounds; tokens/s per block and for 48 blocks. The output head is left out of both
   (it is the same dense matrix, 151936 x 2048, whichever the blocks are; its own time is
   printed once).
2. **Memory**: the bytes of one block as served (dense bf16; LC: the packed tensors of the
   checkpoint), bits per weight, and the whole 2-bit model (48 blocks, bf16 embedding, int8 head)
   against bf16.
3. **Streaming PTQ of one block** (``--ptq``): a 1-block checkpoint (bf16, SmolLM2's tokenizer and
   vocabulary) through ``quantize_streaming`` in a child process (its own peak RSS), the default
   calibration (``--samples`` x 512 tokens of the calibration split), no end-to-end stage (it is a
   whole-model stage). Reported: seconds and peak RSS for the block, routed tokens per expert,
   experts left to the data-free init.

4. **Decode, batch 1, in vLLM CPU** (``--vllm``): the same random weights with SmolLM2's vocabulary
   (49152: vLLM detokenizes what it generates), dense bf16 and LC-QAT 2-bit (data-free), each as a
   1-block and a 3-block checkpoint (the first blocks of one 3-block model), each served by a
   fresh vLLM engine in vLLM's venv (scripts/setup_vllm.sh; bf16, eager, the engine core in
   process), one after another. Per engine: a 32-token prompt, min over runs of t(33 new tokens)
   and t(1); a decode step is (t(33) - t(1)) / 32. vLLM's step includes its head, sampler and
   scheduler, so one block is (step(3 blocks) - step(1 block)) / 2, the same for both kinds.

    PYTHONPATH=. python -P benchmarks/moe.py                # decode + memory (~12 minutes)
    PYTHONPATH=. python -P benchmarks/moe.py --ptq          # + streaming PTQ of a block (~40 minutes)
    PYTHONPATH=. python -P benchmarks/moe.py --ptq-only     # the PTQ row again, merged into moe.json
    PYTHONPATH=. python -P benchmarks/moe.py --vllm-only    # the vLLM rows again (~10 minutes), merged

Writes benchmarks/results/moe.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment, md_env, write  # noqa: E402

from optimum_lcqat import LCQATConfig, quantize  # noqa: E402
from optimum_lcqat.init.ptq_blocks import peak_rss_bytes  # noqa: E402

FULL_DEPTH, FULL_VOCAB = 48, 151936
VLLM_BLOCKS = (1, 3)


def a3b_config(blocks: int, vocab: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=blocks, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False,
    )


def random_model(blocks: int, vocab: int, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(a3b_config(blocks, vocab), dtype=dtype).eval()
    with torch.no_grad():  # a router with the spread of a trained one: not every token to the same experts
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.05)
    return model


@torch.no_grad()
def decode_round(model, prompt: torch.Tensor, steps: int) -> list[float]:
    """Seconds of each of ``steps`` one-token forwards of the decoder blocks after ``prompt``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    base = model.model
    out = base(input_ids=prompt, past_key_values=cache, use_cache=True)
    nxt = model.lm_head(out.last_hidden_state[:, -1:]).argmax(-1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = base(input_ids=nxt, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t)
        nxt = model.lm_head(out.last_hidden_state[:, -1:]).argmax(-1)
    return times


def block_bytes(model, lc: bool) -> int:
    """Bytes of decoder block 0 as served: dense, its parameters; LC, its packed checkpoint tensors."""
    if not lc:
        return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    from optimum_lcqat import checkpoint as ckpt

    state = ckpt.packed_state_dict(model)
    return sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("model.layers.0."))


_PTQ_CHILD = r"""
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from transformers import AutoTokenizer
from optimum_lcqat import LCQATConfig
from optimum_lcqat.data import split_texts
from optimum_lcqat.init.ptq_blocks import peak_rss_bytes
from optimum_lcqat.streaming import quantize_streaming
src, out, samples = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(src)
cfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, num_samples=samples, model_seqlen=512, ptq_e2e_steps=0)
rep = quantize_streaming(src, out, cfg)
print("RESULT " + json.dumps({"peak_rss_bytes": peak_rss_bytes(), "seconds": rep["seconds"],
                              "block_seconds": rep["block_seconds"], "tokens": rep["tokens"], "errors": rep["errors"]}))
"""


def streaming_ptq_block(samples: int, log) -> dict:
    hidden = a3b_config(1, 1).hidden_size  # an expert's gate_up input: fewer routed tokens than this -> data-free
    from optimum_lcqat.assets import smollm2_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    with tempfile.TemporaryDirectory(prefix="moe_bench_") as tmp:
        src = os.path.join(tmp, "src")
        model = random_model(1, len(tok))
        model.save_pretrained(src)
        tok.save_pretrained(src)
        del model
        log(f"streaming PTQ of one block ({samples} x 512 calibration tokens) in a child process ...")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__import__("optimum_lcqat").__file__))]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-P", "-c", _PTQ_CHILD, src, os.path.join(tmp, "out"), str(samples)],
                              capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"streaming PTQ child failed ({proc.returncode}): {proc.stderr[-3000:]}")
        res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    experts = {k: v for k, v in res["tokens"].items() if ".experts." in k and ".gate_up." in k}
    counts = sorted(experts.values())
    summary = [ln for ln in proc.stderr.splitlines() if ln.startswith("lcqat PTQ: block 0:")]
    passes = [ln for ln in proc.stderr.splitlines() if "Hessian pass" in ln]
    res.update(block_log=summary[-1][:400] if summary else "", hessian_passes=len(passes) or None)
    res.update(wall_seconds=wall, samples=samples, expert_tokens_min=counts[0], expert_tokens_median=statistics.median(counts),
               expert_tokens_max=counts[-1], experts_data_free=sum(c < hidden for c in counts), experts=len(counts))
    del res["tokens"], res["errors"]
    return res


# Runs in the vLLM venv: one engine, batch-1 decode timings, the process's peak RSS.
_VLLM_CHILD = r"""
import json, resource, sys, time
def main():
    a = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t = time.perf_counter()
    llm = LLM(model=a["model"], dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0)
    startup = time.perf_counter() - t
    prompt = TokensPrompt(prompt_token_ids=a["prompt"])
    sp = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm.generate([prompt], sp(4), use_tqdm=False)  # warm-up
    def timed(n):
        t = time.perf_counter(); llm.generate([prompt], sp(n), use_tqdm=False); return time.perf_counter() - t
    t1 = min(timed(1) for _ in range(3))
    tn = min(timed(a["new_tokens"] + 1) for _ in range(a["runs"]))
    print("RESULT " + json.dumps({"startup_s": startup, "ttft_s": t1, "step_s": (tn - t1) / a["new_tokens"],
                                  "quantization": llm.llm_engine.vllm_config.model_config.quantization,
                                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
if __name__ == "__main__":
    main()
"""


def first_blocks(src: str, dst: str, n: int) -> str:
    """A copy of checkpoint ``src`` holding only its first ``n`` decoder blocks (config and tensors)."""
    import glob
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(dst)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and not f.endswith(".index.json"):
            shutil.copy(os.path.join(src, f), dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = n
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    kept, metadata = {}, {}
    for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            metadata.update(f.metadata() or {})  # the header records (format version) stay
            for k in f.keys():
                parts = k.split(".")
                if "layers" in parts and int(parts[parts.index("layers") + 1]) >= n:
                    continue
                kept[k] = f.get_tensor(k)
    save_file(kept, os.path.join(dst, "model.safetensors"), metadata=metadata)
    return dst


def vllm_decode(log, new_tokens: int = 32, runs: int = 2) -> dict:
    """Batch-1 decode of dense bf16 and LC-QAT 2-bit A3B blocks in vLLM CPU (see the module docstring, 4)."""
    from optimum_lcqat.assets import smollm2_path
    from transformers import AutoTokenizer

    from serve import VENV_PY, vllm_env  # the serving benchmark's venv and environment for vLLM's children

    if not VENV_PY.exists():
        raise SystemExit(f"no vLLM venv at {VENV_PY}: run bash scripts/setup_vllm.sh (or set OPTIMUM_LCQAT_VLLM_PYTHON)")
    env = {**vllm_env(), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    prompt = torch.randint(0, len(tok), (32,), generator=torch.Generator().manual_seed(1)).tolist()
    deepest = max(VLLM_BLOCKS)
    with tempfile.TemporaryDirectory(prefix="moe_vllm_") as tmp:
        dirs = {}
        model = random_model(deepest, len(tok))
        for kind in ("dense bf16", "LC-QAT 2-bit"):
            if kind != "dense bf16":
                log(f"converting {deepest} block(s) to LC-QAT 2-bit (data-free init) ...")
                quantize(model, LCQATConfig())
            stem = os.path.join(tmp, kind.split()[0])
            full = f"{stem}-{deepest}"
            model.save_pretrained(full)
            tok.save_pretrained(full)
            for n in VLLM_BLOCKS:
                dirs[(kind, n)] = full if n == deepest else first_blocks(full, f"{stem}-{n}", n)
        del model
        out = {}
        for n in VLLM_BLOCKS:  # the kinds alternate: machine drift hits both
            for kind in ("dense bf16", "LC-QAT 2-bit"):
                args = {"model": dirs[(kind, n)], "prompt": prompt, "new_tokens": new_tokens, "runs": runs}
                r = subprocess.run([str(VENV_PY), "-c", _VLLM_CHILD, json.dumps(args)], capture_output=True, text=True,
                                   env=env, cwd="/", timeout=3600)
                lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
                if r.returncode != 0 or not lines:
                    raise RuntimeError(f"vLLM child failed for {kind}, {n} block(s):\n{(r.stdout + r.stderr)[-4000:]}")
                res = json.loads(lines[-1][len("RESULT "):])
                out.setdefault(kind, {})[str(n)] = res
                log(f"vLLM {kind}, {n} block(s): {1e3 * res['step_s']:.2f} ms / step, quantization {res['quantization']}, "
                    f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB")
    lo, hi = VLLM_BLOCKS
    for kind, d in out.items():
        per_block = (d[str(hi)]["step_s"] - d[str(lo)]["step_s"]) / (hi - lo)
        d["seconds_per_block"] = per_block
        d["block_tokens_per_s"] = 1 / per_block
        d["blocks_48_tokens_per_s"] = 1 / (FULL_DEPTH * per_block)
    return {"engines": out, "new_tokens": new_tokens, "prompt_tokens": len(prompt),
            "lc_speedup_per_block": out["dense bf16"]["seconds_per_block"] / out["LC-QAT 2-bit"]["seconds_per_block"]}


def render(payload: dict) -> str:
    env, decode, memory, ptq = payload["environment"], payload["decode"], payload["memory"], payload["streaming_ptq_block"]
    gib = 2**30
    md = [f"# MoE: Qwen3-30B-A3B shapes, {payload['blocks_measured']} blocks measured, 48 extrapolated\n", md_env(env),
          f"- decode: batch 1, {payload['prompt']}-token prompt, median of {payload['steps']} steps x "
          f"{len(next(iter(payload['rounds'].values())))} interleaved rounds; the decoder blocks only (the 151936 x 2048 "
          f"head is the same for both: {1e3 * payload['head_bf16_seconds']:.1f} ms in bf16)",
          f"- LC weights: data-free init ({payload['convert_data_free_seconds']:.0f} s for {payload['blocks_measured']} blocks); "
          f"process peak RSS {payload['decode_process_peak_rss_bytes'] / gib:.2f} GiB\n",
          "| transformers, batch 1 | ms / block | tokens/s, 1 block | tokens/s, 48 blocks | with bf16 head |",
          "|---|---|---|---|---|"]
    for name, d in decode.items():
        md.append(f"| {name} | {1e3 * d['seconds_per_block']:.2f} | {d['block_tokens_per_s']:.1f} | "
                  f"{d['blocks_48_tokens_per_s']:.2f} | {d['with_bf16_head_48_tokens_per_s']:.2f} |")
    md += [f"\nLC-QAT / dense bf16 decode speed per block: **{payload['lc_speedup_per_block']:.2f}x** (target >= 2x)\n",
           "| memory | one block | bits / weight | whole model (48 blocks, embedding bf16; head bf16 / int8) |", "|---|---|---|---|",
           f"| dense bf16 | {memory['block_bytes_dense_bf16'] / 2**20:.0f} MiB | 16 | {memory['model_bytes_bf16'] / 1e9:.2f} GB |",
           f"| LC-QAT 2-bit | {memory['block_bytes_lc'] / 2**20:.0f} MiB | {memory['block_bits_per_weight_lc']:.3f} | "
           f"{memory['model_bytes_lc'] / 1e9:.2f} GB (target < 9 GB) |"]
    if ptq:
        penv = ptq.get("environment")
        md += ["\n| streaming PTQ, one block | seconds | peak RSS | 48 blocks (extrapolated) | routed tokens per expert (min / median / max) | experts data-free |",
               "|---|---|---|---|---|---|",
               f"| {ptq['samples']} x 512 calibration tokens | {ptq['block_seconds']['0']:.0f} | {ptq['peak_rss_bytes'] / gib:.2f} GiB "
               f"(target < 6) | {FULL_DEPTH * ptq['block_seconds']['0'] / 3600:.1f} h | {ptq['expert_tokens_min']} / "
               f"{ptq['expert_tokens_median']:.0f} / {ptq['expert_tokens_max']} | {ptq['experts_data_free']} of {ptq['experts']} |"]
        if penv:
            md.append(f"\n(streaming PTQ row: `{penv['command']}`, {penv['time_utc']}, git {penv['git_commit']}; the block's "
                      f"log: `{ptq.get('block_log', '')}`)")
    v = payload.get("vllm")
    if isinstance(v, dict):
        e, venv = v["engines"], v.get("environment") or env
        lo, hi = VLLM_BLOCKS
        md += [f"\n| vLLM CPU, batch 1 (bf16, eager) | step, {lo} block | step, {hi} blocks | ms / block | tokens/s, 48 blocks | "
               f"peak RSS, {hi} blocks |", "|---|---|---|---|---|---|"]
        for name, d in e.items():
            md.append(f"| {name} | {1e3 * d[str(lo)]['step_s']:.2f} ms | {1e3 * d[str(hi)]['step_s']:.2f} ms | "
                      f"{1e3 * d['seconds_per_block']:.2f} | {d['blocks_48_tokens_per_s']:.2f} | "
                      f"{d[str(hi)]['peak_rss_bytes'] / 2**30:.2f} GiB |")
        md += [f"\nLC-QAT / dense bf16 decode speed per block in vLLM: **{v['lc_speedup_per_block']:.2f}x**. A step is "
               f"(t({v['new_tokens'] + 1} new tokens) - t(1)) / {v['new_tokens']} after a {v['prompt_tokens']}-token prompt, "
               f"with vLLM's head (49152 x 2048), sampler and scheduler; one block is the difference of the {hi}- and "
               f"{lo}-block engines over {hi - lo}. (`{venv['command']}`, {venv['time_utc']}, git {venv['git_commit']})\n"]
    else:
        md.append("\nvLLM CPU: not measured in this run (--vllm).\n")
    return "\n".join(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ptq", action="store_true", help="also the streaming PTQ of one block (~30 minutes)")
    ap.add_argument("--ptq-only", action="store_true",
                    help="only the streaming PTQ of one block, merged into the existing results file (its own command and commit)")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples (x 512 tokens) of the PTQ")
    ap.add_argument("--vllm", action="store_true", help="also batch-1 decode in vLLM CPU (~10 minutes)")
    ap.add_argument("--vllm-only", action="store_true",
                    help="only the vLLM decode rows, merged into the existing results file (their own command and commit)")
    ap.add_argument("--name", default="moe")
    args = ap.parse_args()
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    if args.ptq_only or args.vllm_only:
        path = os.path.join(RESULTS, args.name + ".json")
        with open(path) as f:
            payload = json.load(f)
        env = environment()  # before the run: the commit it ran
        part, key = ((streaming_ptq_block(args.samples, log), "streaming_ptq_block") if args.ptq_only
                     else (vllm_decode(log), "vllm"))
        part["environment"] = env
        payload[key] = part
        _finish(args, payload, log)
        return
    payload = measure_decode(args, log)
    payload["streaming_ptq_block"] = streaming_ptq_block(args.samples, log) if args.ptq else None
    payload["vllm"] = vllm_decode(log) if args.vllm else None
    _finish(args, payload, log)


def _finish(args, payload: dict, log) -> None:
    text = render(payload)
    print(text)
    write(args.name, payload, text)
    decode, memory = payload["decode"], payload["memory"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from optimum_lcqat._atomic import atomic_path

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        names = list(decode)
        axes[0].bar(names, [decode[n]["block_tokens_per_s"] for n in names], color=["#888", "#2a7"])
        axes[0].set_title("batch-1 decode, one A3B block (tokens/s)")
        axes[1].bar(names, [memory["model_bytes_bf16"] / 1e9, memory["model_bytes_lc"] / 1e9], color=["#888", "#2a7"])
        axes[1].set_title("whole model, GB")
        fig.tight_layout()
        with atomic_path(os.path.join(RESULTS, f"{args.name}.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    except ImportError:
        log("matplotlib missing: no PNG")
    log(f"wrote {RESULTS}/{args.name}.{{json,md,png}}")


def measure_decode(args, log) -> dict:
    env = environment()
    vocab = 8192  # the embedding lookup only; the head is timed apart (FULL_VOCAB)
    dense = random_model(args.blocks, vocab)
    lc = copy.deepcopy(dense)
    log(f"converting {args.blocks} block(s) to LC-QAT 2-bit (data-free init) ...")
    tq = time.perf_counter()
    quantize(lc, LCQATConfig())
    convert_s = time.perf_counter() - tq
    log(f"converted in {convert_s:.0f}s")
    weights = sum(p.numel() for p in dense.model.layers[0].parameters() if p.dim() >= 2)
    lc_bytes, dense_bytes = block_bytes(lc, True), block_bytes(dense, False)

    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    rounds = {"dense bf16": [], "LC-QAT 2-bit": []}
    for r in range(args.rounds):
        for name, model in (("dense bf16", dense), ("LC-QAT 2-bit", lc)):
            times = decode_round(model, prompt, args.steps)
            rounds[name].append(statistics.median(times))
            log(f"round {r}: {name} {1e3 * rounds[name][-1]:.2f} ms / token ({args.blocks} blocks)")
    head = torch.randn(FULL_VOCAB, 2048, dtype=torch.bfloat16)
    x = torch.randn(1, 2048, dtype=torch.bfloat16)
    F.linear(x, head)
    th = []
    for _ in range(5):
        t = time.perf_counter()
        F.linear(x, head)
        th.append(time.perf_counter() - t)
    head_s = statistics.median(th)
    del head
    decode = {}
    for name, vals in rounds.items():
        per_token = statistics.median(vals)
        per_block = per_token / args.blocks
        decode[name] = {"seconds_per_token_measured": per_token, "seconds_per_block": per_block,
                        "block_tokens_per_s": 1 / per_block, "blocks_48_tokens_per_s": 1 / (FULL_DEPTH * per_block),
                        "with_bf16_head_48_tokens_per_s": 1 / (FULL_DEPTH * per_block + head_s)}
    speedup = decode["dense bf16"]["seconds_per_block"] / decode["LC-QAT 2-bit"]["seconds_per_block"]
    embed = FULL_VOCAB * 2048 * 2
    head_int8 = FULL_VOCAB * 2048 + FULL_VOCAB * 4
    memory = {
        "block_weights": weights, "block_bytes_dense_bf16": dense_bytes, "block_bytes_lc": lc_bytes,
        "block_bits_per_weight_lc": 8 * lc_bytes / weights,
        "model_bytes_bf16": FULL_DEPTH * dense_bytes + 2 * embed,
        "model_bytes_lc": FULL_DEPTH * lc_bytes + embed + head_int8,
    }
    return {"environment": env, "shapes": "Qwen3-30B-A3B (hidden 2048, 128 experts x 768, top-8, 32/4 heads x 128)",
            "blocks_measured": args.blocks, "full_depth": FULL_DEPTH, "prompt": args.prompt, "steps": args.steps,
            "rounds": rounds, "decode": decode, "lc_speedup_per_block": speedup,
            "head_bf16_seconds": head_s, "convert_data_free_seconds": convert_s,
            "decode_process_peak_rss_bytes": peak_rss_bytes(), "memory": memory}


if __name__ == "__main__":
    main()
