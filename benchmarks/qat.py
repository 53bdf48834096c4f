"""Data-efficient QAT benchmark: held-out perplexity against QAT tokens, SmolLM2-135M.

Methods, all from the same data, optimizer (AdamW), learning-rate schedule (linear warmup then
constant, so every budget point of one run is "trained for N tokens"), batch, and trainable
parameter categories (quantized weights + their scales + norms; embeddings frozen):

* ``lcqat``: LC-QAT (latent codes with DGE, s_u, s_v, A, beta, norms) via LCQATTrainer, CE loss.
* ``lcqat_kd``: the same with knowledge distillation from the full-precision model (logit KL).
* ``scalar``: the scalar 2-bit QAT baseline, EfficientQAT-style: every linear the LC-QAT config
  converts gets min-max group-64 asymmetric 2-bit fake quantization (levels 0..3, per-group scale
  and zero point initialised from min/max and trained), weights trained through round() with the
  straight-through estimator.

Training text: optimum_lcqat.data.split_texts("train"); evaluation: perplexity (ctx 512,
non-overlapping windows, optimum_lcqat.evaluation.perplexity) on the first --eval-tokens tokens
of split_texts("heldout"). Never trains on held-out text.

Also: training throughput (tokens/s, fwd+bwd+AdamW step) of LC-QAT, LC-QAT+KD and
full-precision fine-tuning of the same model on the same batches.

    python benchmarks/qat.py --budgets 0,50000,200000       # full
    python benchmarks/qat.py --quick                        # minutes: tiny budgets, short eval

Writes benchmarks/results/qat{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from optimum_lcqat._atomic import atomic_path, write_dir_atomic, write_text_atomic
from optimum_lcqat._machine import git_commit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------- scalar baseline
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class FakeQuantLinear(nn.Module):
    """2-bit asymmetric min-max fake quantization, groups of ``group`` along the input dimension."""

    def __init__(self, linear: nn.Linear, group: int = 64, bits: int = 2):
        super().__init__()
        w = linear.weight.detach()
        m, n = w.shape
        if n % group:
            raise ValueError(f"in_features {n} not divisible by group {group}")
        self.group, self.qmax = group, 2**bits - 1
        self.weight = nn.Parameter(w.clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        wg = w.view(m, n // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / self.qmax).clamp_min(1e-8)
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(-lo / scale)  # real zero point, rounded in the forward (STE)

    def quantized_weight(self) -> torch.Tensor:
        m, n = self.weight.shape
        wg = self.weight.view(m, n // self.group, self.group)
        s = self.scale.unsqueeze(-1)
        z = _RoundSTE.apply(self.zero).unsqueeze(-1)
        q = torch.clamp(_RoundSTE.apply(wg / s) + z, 0, self.qmax)
        return ((q - z) * s).view(m, n)

    def forward(self, x):
        return nn.functional.linear(x, self.quantized_weight(), self.bias)


def scalar_quantize(model, names):
    for name in names:
        model.set_submodule(name, FakeQuantLinear(model.get_submodule(name)))
    return model


def scalar_param_groups(model, lr):
    """Same categories as LC-QAT: quantized weights (~latent), their scales/zeros (~scales), norms."""
    from optimum_lcqat.training.params import _is_norm

    weights, scales, norms = [], [], []
    for mod in model.modules():
        if isinstance(mod, FakeQuantLinear):
            weights.append(mod.weight)
            scales += [mod.scale, mod.zero]
            if mod.bias is not None:
                scales.append(mod.bias)
        elif _is_norm(mod):
            norms += list(mod.parameters(recurse=False))
    model.requires_grad_(False)
    for p in weights + scales + norms:
        p.requires_grad_(True)
    return [
        {"params": weights, "lr": lr, "weight_decay": 0.0, "name": "weights"},
        {"params": scales, "lr": lr, "weight_decay": 0.0, "name": "scales"},
        {"params": norms, "lr": lr, "weight_decay": 0.0, "name": "norm"},
    ]


# ---------------------------------------------------------------------- data / models
def fp_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def lcqat_init(fp_path, tok, init: str, log) -> tuple[Path, str]:
    """The LC-QAT starting point, cached: PTQ (calibration split) when requested and available,
    else data-free. Returns (checkpoint dir, description)."""
    from transformers import AutoModelForCausalLM

    from optimum_lcqat import LCQATConfig
    from optimum_lcqat.assets import default_cache_dir

    if init == "auto":
        try:
            import optimum_lcqat.init.ptq  # noqa: F401

            init = "ptq"
        except ImportError:
            init = "data_free"
    out = default_cache_dir() / f"bench-qat-init-{init}"
    if not (out / "model.safetensors").is_file():
        t = time.time()
        if init == "ptq":
            from optimum_lcqat.data import split_texts

            cfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok)
        else:
            cfg = LCQATConfig()
        model = AutoModelForCausalLM.from_pretrained(fp_path, dtype=torch.float32, quantization_config=cfg)
        write_dir_atomic(out, model.save_pretrained)
        log(f"quantized ({init}) in {time.time() - t:.0f}s -> {out}")
    return out, init


# ---------------------------------------------------------------------- training runs
def make_args(out, steps, lr, bs, seed, warmup):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=bs, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=warmup, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to=[], seed=seed, data_seed=seed, disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, include_num_input_tokens_seen="all",
    )


def budget_eval_callback(budgets, evaluate, record):
    """Evaluates held-out perplexity when the token count reaches each budget; times training only."""
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def __init__(self):
            self.pending = sorted(b for b in budgets if b > 0)
            self.train_time = 0.0
            self.t0 = None
            self.step_times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            dt = time.perf_counter() - self.t0
            self.train_time += dt
            self.step_times.append(dt)
            tokens = state.num_input_tokens_seen
            while self.pending and tokens >= self.pending[0]:
                b = self.pending.pop(0)
                loss = [h["loss"] for h in state.log_history if "loss" in h]
                record(b, tokens, evaluate(model), self.train_time, loss[-1] if loss else None)
            if not self.pending:
                control.should_training_stop = True

    return _CB()


def run_method(method, a, init_dir, fp_path, train_ds, heldout, log, teacher=None, result=None, on_point=None):
    from transformers import AutoModelForCausalLM, Trainer

    from optimum_lcqat import LCQATConfig
    from optimum_lcqat.convert import convertible_linears
    from optimum_lcqat.evaluation import perplexity
    from optimum_lcqat.training import LCQATCallback, LCQATTrainer

    points = []
    eval_cost = []

    def evaluate(model):
        t = time.perf_counter()
        r = perplexity(model, heldout, ctx=a.ctx, batch_size=a.eval_batch)
        eval_cost.append(time.perf_counter() - t)
        return r["ppl"]

    def record(budget, tokens, ppl, train_s, loss):
        points.append({"budget": budget, "tokens": int(tokens), "ppl": ppl, "train_seconds": train_s, "train_loss": loss})
        log(f"{method}: {tokens} tokens -> held-out ppl {ppl:.3f} (train {train_s:.0f}s, loss {loss})")
        if on_point is not None:  # partial results survive an interrupted run
            on_point()

    if method == "scalar":
        model = fp_model(fp_path)
        names = convertible_linears(model, LCQATConfig(), ["lm_head"])
        scalar_quantize(model, names)
    else:
        model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    if 0 in a.budgets:
        record(0, 0, evaluate(model), 0.0, None)
    max_b = max(a.budgets)
    if result is None:
        result = {}
    from optimum_lcqat.training.callback import DEFAULT_LR_SCALE

    # the multipliers in force: the callback lays --lr-scale over its defaults
    result.update(method=method + a.label_suffix, points=points, lr=a.lr,
                  lr_scale={**DEFAULT_LR_SCALE, **a.lr_scale} if method != "scalar" else None,
                  kd_alpha=a.kd_alpha if method == "lcqat_kd" else None,
                  max_flip_share=a.max_flip_share if method != "scalar" else None)
    if max_b > 0:
        steps = math.ceil(max_b / (a.batch * a.seq_len))
        args = make_args(Path(a.workdir) / method, steps, a.lr, a.batch, a.seed, a.warmup)
        cb = budget_eval_callback(a.budgets, evaluate, record)
        if method == "scalar":
            groups = scalar_param_groups(model, a.lr)
            opt = torch.optim.AdamW(groups, lr=a.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
            trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=[cb], optimizers=(opt, None))
        else:
            lc = LCQATCallback(lr_scale=a.lr_scale, max_flip_share=a.max_flip_share)
            trainer = LCQATTrainer(
                model=model, args=args, train_dataset=train_ds, callbacks=[lc, cb],
                teacher_model=teacher if method == "lcqat_kd" else None, kd_alpha=a.kd_alpha,
            )
        trainer.train()
        tokens = trainer.state.num_input_tokens_seen
        result.update(
            steps=trainer.state.global_step, tokens_trained=int(tokens), train_seconds=cb.train_time,
            tokens_per_second=tokens / cb.train_time if cb.train_time else None,
            step_seconds=cb.step_times, eval_seconds=eval_cost,
            losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        )
        if method != "scalar":
            hist = lc.history
            result["flip_share_per_step"] = [h["flip_share"] for h in hist]
            if a.max_flip_share is not None:
                result["held_back_per_step"] = [h["held_back"] for h in hist]
            result["earliest_code_change_step"] = lc.earliest_code_change_step(a.lr * a.lr_scale.get("latent", 1.0))
            result["codes_changed_share"] = lc.code_change_share(model) if any(
                getattr(m, "latent", None) is not None for m in model.modules()) else None
    del model
    return result


def throughput(a, init_dir, fp_path, train_ds, teacher, log) -> dict:
    """tokens/s of fwd+bwd+AdamW for LC-QAT, LC-QAT+KD and full-precision fine-tuning."""
    from transformers import AutoModelForCausalLM

    from optimum_lcqat.training import LCQATCallback, distillation_loss, lcqat_param_groups

    batch = torch.stack([train_ds[i]["input_ids"] for i in range(a.batch)])
    out = {}

    def timed(model, params_or_groups, kd=False):
        opt = torch.optim.AdamW(params_or_groups, lr=1e-5)
        model.train()
        times = []
        for i in range(a.tp_steps + 1):
            t = time.perf_counter()
            outp = model(input_ids=batch, labels=batch)
            loss = outp.loss
            if kd:
                with torch.no_grad():
                    tl = teacher(input_ids=batch).logits
                loss = distillation_loss(outp.logits, tl)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        steady = times[1:]  # first step: allocator / lazy init warm-up
        return {"step_seconds": steady, "tokens_per_second": batch.numel() / (sum(steady) / len(steady))}

    fp = fp_model(fp_path)
    out["fp_finetune"] = timed(fp, [p for p in fp.parameters()])
    del fp
    for kd in (False, True):
        m = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
        cb = LCQATCallback()
        cb.prepare(m)
        out["lcqat_kd" if kd else "lcqat"] = timed(m, lcqat_param_groups(m, 1e-5), kd=kd)
        del m
    for k, v in out.items():
        log(f"throughput {k}: {v['tokens_per_second']:.1f} tokens/s")
    out["lcqat_vs_fp"] = out["lcqat"]["tokens_per_second"] / out["fp_finetune"]["tokens_per_second"]
    return out


# ---------------------------------------------------------------------- report
def write_report(res, stem):
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"{stem}.json", json.dumps(res, indent=1))
    fp_ppl = res["fp_ppl"]
    methods = [r["method"] for r in res["runs"]]
    budgets = sorted({p["budget"] for r in res["runs"] for p in r["points"]})
    lines = [
        f"# QAT benchmark ({'quick' if res['quick'] else 'full'}): SmolLM2-135M, held-out perplexity vs QAT tokens",
        "",
        f"- command: `{res['command']}`",
        f"- machine: {res['machine']}; git {res['git_commit']}",
        f"- init: {res['init']}; full precision held-out ppl {fp_ppl:.3f} ({res['eval_tokens']} held-out tokens, ctx {res['ctx']})",
        f"- training: batch {res['batch']} x {res['seq_len']} tokens/step, AdamW lr {res['lr']} "
        f"(lr_scale {res['lr_scale']}), warmup {res['warmup']} steps then constant, KD alpha {res['kd_alpha']}",
        "",
        "| QAT tokens (budget) | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for b in budgets:
        cells = []
        for r in res["runs"]:
            # a budget measured by more than one merged run (e.g. a repeat) shows every measurement
            ps = [p for p in r["points"] if p["budget"] == b]
            cells.append(" / ".join(f"{p['ppl']:.2f} ({p['ppl'] / fp_ppl:.2f}x fp)" for p in ps) or "not run")
        lines.append(f"| {b:,} | " + " | ".join(cells) + " |")
    per_run = []
    for r in res["runs"]:
        cfg = r if "lr" in r else next((p for p in r.get("parts", []) if "lr" in p), None)
        if cfg:
            per_run.append(f"{r['method']}: lr {cfg['lr']}, lr_scale {cfg['lr_scale'] or 'none'}"
                           + (f", KD alpha {cfg['kd_alpha']}" if cfg.get("kd_alpha") is not None else "")
                           + (f", max_flip_share {cfg['max_flip_share']:g}" if cfg.get("max_flip_share") is not None else ""))
    if per_run:
        lines += ["", "Per run: " + "; ".join(per_run) + "."]
    flips = []
    for r in res["runs"]:
        for part in [r, *r.get("parts", [])]:
            shares = part.get("flip_share_per_step")
            if shares:
                first = next((i + 1 for i, f in enumerate(shares) if f > 0), None)
                flips.append(f"{r['method']}: " + (f"first code change at step {first} of {len(shares)}, "
                             f"per-step flip shares summing to {sum(shares):.2%}" if first else
                             f"no code changed in {len(shares)} steps")
                             + (f" (earliest possible: step {part['earliest_code_change_step']})"
                                if part.get("earliest_code_change_step") else ""))
                break
    if flips:
        lines += ["", "Code flips (LCQATCallback's per-step flip share): " + "; ".join(flips) + "."]
    if "lcqat" in methods and "lcqat_kd" in methods:
        lines += ["", "At 0 tokens lcqat_kd is the same model as lcqat (the same initial checkpoint)."]
    not_run = res.get("not_run") or []
    if not_run:
        lines += ["", "Not run: " + "; ".join(not_run)]
    tp = res.get("throughput")
    if tp:
        lines += [
            "",
            f"Training throughput (fwd+bwd+AdamW, batch {res['batch']} x {res['seq_len']}, fp32 CPU):",
            "",
            "| run | tokens/s |",
            "|---|---|",
        ]
        for k in ("fp_finetune", "lcqat", "lcqat_kd"):
            lines.append(f"| {k} | {tp[k]['tokens_per_second']:.1f} |")
        lines.append(f"\nLC-QAT / full-precision fine-tuning throughput: {tp['lcqat_vs_fp']:.2f}")
    write_text_atomic(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in res["runs"]:
            xs = [p["tokens"] for p in r["points"]]
            ax.plot(xs, [p["ppl"] for p in r["points"]], "o-", label=r["method"])
        ax.axhline(fp_ppl, color="k", ls="--", lw=1, label="full precision")
        if max((p["tokens"] for r in res["runs"] for p in r["points"]), default=0) > 1e4:
            ax.set_xscale("symlog", linthresh=1e4)
        ax.set_yscale("log")
        ax.set_xlabel("QAT tokens")
        ax.set_ylabel("held-out perplexity (ctx 512)")
        ax.set_title("SmolLM2-135M, 2-bit QAT")
        ax.legend()
        fig.tight_layout()
        with atomic_path(RESULTS / f"{stem}.png") as tmp:
            fig.savefig(tmp, dpi=120)
    except ImportError:
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budgets", default=None, help="comma-separated token budgets (default 0,50000,200000)")
    p.add_argument("--methods", default="lcqat,lcqat_kd,scalar")
    p.add_argument("--init", default="data_free", choices=["auto", "ptq", "data_free"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-scale", default="", help="e.g. latent=5,scales=1")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kd-alpha", type=float, default=1.0)
    p.add_argument("--max-flip-share", type=float, default=None,
                   help="LCQATCallback(max_flip_share=...): cap on each layer's code changes per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp-steps", type=int, default=None)
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--workdir", default="/tmp/lcqat-bench-qat")
    p.add_argument("--stem", default=None, help="output file stem (default qat / qat_quick)")
    p.add_argument("--label-suffix", default="",
                   help="appended to each method's name in the results (e.g. ' latent x20' for a run with "
                        "another --lr-scale), so --merge keeps it apart from the default run")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine the runs of several result JSONs (same settings) into one report under --stem")
    p.add_argument("--not-run", action="append", default=[], help="with --merge: record a point that was not run, and why")
    a = p.parse_args(argv)
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        res = dict(parts[0])
        # runs of the same method (e.g. the 0-token evaluation and the training run, done by
        # separate processes) are combined point by point
        by_method: dict[str, dict] = {}
        for part in parts:
            for r in part["runs"]:
                tgt = by_method.setdefault(r["method"], {"method": r["method"], "points": [], "parts": []})
                tgt["points"] = sorted(tgt["points"] + r["points"], key=lambda q: q["budget"])
                tgt["parts"].append({k: v for k, v in r.items() if k != "points"})
        res["runs"] = list(by_method.values())
        res["merged_from"] = [{"file": os.path.relpath(f, ROOT), "command": part["command"]} for f, part in zip(a.merge, parts)]
        res["command"] = " ; ".join(part["command"] for part in parts)
        res["throughput"] = next((part["throughput"] for part in parts if part.get("throughput")), None)
        res["not_run"] = a.not_run
        write_report(res, a.stem or "qat")
        return
    a.budgets = [int(float(x)) for x in (a.budgets or ("0,4096,16384" if a.quick else "0,50000,200000")).split(",")]
    a.eval_tokens = a.eval_tokens or (4096 if a.quick else 32768)
    a.tp_steps = a.tp_steps or (1 if a.quick else 3)
    a.lr_scale = {k: float(v) for k, v in (kv.split("=") for kv in a.lr_scale.split(",") if kv)}
    methods = a.methods.split(",")
    torch.manual_seed(a.seed)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    from transformers import AutoTokenizer

    from optimum_lcqat.assets import smollm2_path
    from optimum_lcqat.data import split_texts, token_stream, token_windows
    from optimum_lcqat.evaluation import perplexity

    fp_path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(fp_path)
    heldout = token_stream(split_texts("heldout"), tok, max_tokens=a.eval_tokens)
    need = max(a.budgets) + a.batch * a.seq_len * 2
    train_ds = token_windows(split_texts("train"), tok, a.seq_len, max_tokens=need)
    log(f"held-out {heldout.numel()} tokens, train pool {train_ds.ids.numel()} tokens ({len(train_ds)} windows)")
    init_dir, init_kind = lcqat_init(fp_path, tok, a.init, log)
    teacher = fp_model(fp_path)
    teacher.eval().requires_grad_(False)
    fp_ppl = perplexity(teacher, heldout, ctx=a.ctx, batch_size=a.eval_batch)["ppl"]
    log(f"full precision ppl {fp_ppl:.3f}")
    res = {
        "quick": a.quick, "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "git_commit": git_commit(ROOT) or "unknown",
        "init": init_kind, "fp_ppl": fp_ppl, "eval_tokens": int(heldout.numel()), "ctx": a.ctx, "batch": a.batch,
        "seq_len": a.seq_len, "lr": a.lr, "lr_scale": a.lr_scale, "warmup": a.warmup, "kd_alpha": a.kd_alpha,
        "budgets": a.budgets, "runs": [], "not_run": [],
    }
    stem = a.stem or ("qat_quick" if a.quick else "qat")
    if not a.no_throughput:
        res["throughput"] = throughput(a, init_dir, fp_path, train_ds, teacher, log)
        write_report(res, stem)
    for m in methods:
        live = {"method": m, "points": [], "complete": False}
        res["runs"].append(live)
        run_method(m, a, init_dir, fp_path, train_ds, heldout, log, teacher=teacher, result=live,
                   on_point=lambda: write_report(res, stem))
        live["complete"] = True
        write_report(res, stem)
    res["total_seconds"] = time.time() - t_start
    write_report(res, stem)
    log(f"wrote {RESULTS / stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
