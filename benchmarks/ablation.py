"""Quality v2 ablation (#13): the official LC-QAT recipe's pieces, tried one at a time on SmolLM2-135M.

Each row is a set of ``LCQATConfig`` overrides on top of today's defaults (the PTQ side of the
recipe). Every row runs in its own child process, one at a time: PTQ of the bundled SmolLM2
(calibration: pydoc topics, the package's ``calibration`` split), then two held-out perplexities,
context 512:

* ``heldout``: the Python tutorial (the package's ``heldout`` split, first 32768 tokens), the
  figure of every other quality benchmark here;
* ``licences``: the licence texts under /usr/share/common-licenses (plain English legal text: a
  second domain that is not Python documentation, never calibrated or trained on), first 32768
  tokens;

and the PTQ wall time. Row ``fp32`` is the unquantized model, measured by the same code.

QAT (``--qat-budgets 50000,200000``): from a row's PTQ model, LC-QAT with LCQATTrainer on the
package's ``train`` split (batch 4 x 512, AdamW lr 1e-4, 2 warmup steps then constant, grad clip 1,
seed 0: the settings of benchmarks/qat.py, so every row sees the same batches), both held-out
perplexities at each budget. PTQ rows train with today's QAT settings; the QAT rows
(``qat_*``) each change one QAT setting and start from the ``default`` row's PTQ model. PTQ
models are cached under ~/.cache/optimum_lcqat/ablation/<row> (reused while the PTQ code and the
row's effective config are unchanged).

Rows accumulate: results are merged row by row into benchmarks/results/ablation.json (a row
already there is kept unless ``--force``), and ablation.md is rendered from the JSON with the
command of every row, so the table can grow over several runs.

    PYTHONPATH=$PWD python -P benchmarks/ablation.py --rows fp32 default hadamard_full
    PYTHONPATH=$PWD python -P benchmarks/ablation.py --rows default qat_balance --qat-budgets 50000
    PYTHONPATH=$PWD python -P benchmarks/ablation.py --list
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimum_lcqat._atomic import write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
EVAL_TOKENS = 32768
LICENCES = Path("/usr/share/common-licenses")

# name -> (LCQATConfig overrides, what the row tries: the aspect of the table)
ROWS: dict[str, tuple[dict | None, str]] = {
    "fp32": (None, "full precision, no quantization"),
    "default": ({}, "the defaults since #13: ptq_v1 + 16 end-to-end steps at lr 5e-3 (ptq_e2e_steps)"),
    "fast": ({"ptq_finetune_steps": 0}, "LCQATConfig.fast(): the default without the block fine-tune (the end-to-end stage tunes the same parameters)"),
    "ptq_v1": ({"ptq_e2e_steps": 0}, "the defaults before #13: 128 x 512 calibration tokens, 4 rounds x 1 refinement pass, 24 fine-tune steps a block, Hadamard blocks of 128, no end-to-end stage"),
    "refine10": ({"ptq_refine_passes": 10, "ptq_e2e_steps": 0}, "LDLQ refinement: 10 coordinate-descent passes after each (A, beta) fit (official: 10)"),
    "iters10": ({"init_iters": 10, "ptq_e2e_steps": 0}, "10 rounds of assignment + (A, beta) fit (ptq_v1: 4)"),
    "finetune96": ({"ptq_finetune_steps": 96, "ptq_e2e_steps": 0}, "block fine-tune: 96 Adam steps a block (ptq_v1: 24)"),
    "hadamard_full": ({"hadamard_block_size": "full", "ptq_e2e_steps": 0}, "full-dimension Hadamard (paper) instead of blocks of 128"),
    # pydoc topics (the calibration split, 113K tokens) hold 220 windows of 512 tokens, 110 of 1024:
    # 256 x 512 or 128 x 1024 would need text from another split (the issue keeps calibration on it)
    "calib220": ({"num_samples": 220, "ptq_e2e_steps": 0}, "calibration: 220 x 512 tokens, all of pydoc topics (ptq_v1: 128 x 512)"),
    "calib110x1024": ({"num_samples": 110, "model_seqlen": 1024, "ptq_e2e_steps": 0},
                      "calibration: 110 x 1024 tokens, all of pydoc topics in longer sequences (against calib220)"),
    "e2e64": ({"ptq_e2e_steps": 64}, "the default with 64 end-to-end steps instead of 16 (a thorough preset's candidate)"),
}

# QAT knobs, each from the `default` row's PTQ model: name -> (settings, what the row tries).
# settings: "callback" = LCQATCallback kwargs, "args" = TrainingArguments overrides.
_NON_LATENT = ("scales", "codebook", "bias", "norm")
_LR1 = {"lr_scale": {c: 1.0 for c in (*_NON_LATENT, "latent")}}  # one learning rate for every category
# LCQATCallback's DEFAULT_LR_SCALE from the first #13 ablation until qat_lat3_1m (latents at 1x): the
# recipe of the PTQ rows' QAT and of the rows built on it, spelt out so that they rerun as measured
_LR3 = {"lr_scale": {**{c: 3.0 for c in _NON_LATENT}, "latent": 1.0}}
PTQ_ROW_QAT = {"callback": _LR3}
_LR3_ALL = {"lr_scale": {c: 3.0 for c in (*_NON_LATENT, "latent")}}  # every LC category at 3x: DEFAULT_LR_SCALE now
QAT_ROWS: dict[str, tuple[dict, str]] = {
    "qat_lr1": ({"callback": {**_LR1}},
                "one lr 1e-4 for every trained category (the default before #13), beta2 0.999, no decay on LC parameters, clip 1"),
    "qat_balance": ({"callback": {"balance_scales": True, **_LR1}},
                    "s_u / s_v rescaled to equal RMS before QAT (release), one lr 1e-4"),
    "qat_lr3": ({"callback": {**_LR3}},
                "lr 3e-4 on s_u, s_v, A, beta, bias, norms, latents stay at 1e-4 (the default from #13's first ablation to qat_lat3_1m)"),
    "qat_balance_lr3": ({"callback": {"balance_scales": True, **_LR3}},
                        "balance + lr 3e-4 on the non-latent parameters"),
    "qat_optim": ({"callback": {"decay_categories": ["latent", *_NON_LATENT, "embedding", "other"], **_LR3},
                   "args": {"adam_beta2": 0.95, "weight_decay": 0.1}},
                  "release optimizer on the lr3 default: beta2 0.95, weight decay 0.1 on every trained category (clip 1 as before)"),
    "qat_embed": ({"callback": {"train_embeddings": True, "lr_scale": {**_LR3["lr_scale"], "embedding": 0.1}}},
                  "the lr3 default + the (tied) embedding / lm_head trained at lr 1e-5 (release: trained)"),
    # the latents' learning rate: codes flip only once a latent crosses a decision boundary, which at
    # lr 1e-4 hardly happens within 400K tokens (lr 1e-3, `qat_part_lat10`, diverged)
    "qat_lat3": ({"base": "default", "callback": _LR3_ALL},
                 "the default + the latents at lr 3e-4 too (every LC category at 3e-4), from the `default` PTQ"),
    # the same settings planned to 1M tokens: the `default` row's 1M run has that plan, so both see the
    # same batches in the same order at every budget (a 400K plan draws another order: a second sample)
    "qat_lat3_1m": ({"base": "default", "callback": _LR3_ALL},
                    "qat_lat3 planned to 1M tokens: the same batches as the `default` row's 1M run (now `LCQATCallback()`)"),
    # the schedule the package's own recipe used until this row was measured (training/recipes.py
    # run_qat: the CLI's `qat` and the demo; now 2 warmup steps and a constant lr, as every other row)
    "qat_cosine": ({"base": "default", "callback": _LR3, "args": {"lr_scheduler_type": "cosine", "warmup_steps": 0.1}},
                   "cosine decay over the planned run after 10% warmup (run_qat's schedule before this row), "
                   "from the `default` PTQ (the long `default` run: constant lr)"),
}
QAT_BATCH, QAT_SEQ, QAT_LR = 4, 512, 1e-4
QAT_BASE = "ptq_v1"  # the PTQ row a QAT row starts from unless its settings name a "base" row
ALL_ROWS = {**ROWS, **QAT_ROWS}


def licence_texts() -> list[str]:
    """The licence texts, each file once (several names are links to the same text)."""
    if not LICENCES.is_dir():
        raise SystemExit(f"{LICENCES} is missing: the second-domain evaluation needs the Debian licence texts")
    seen, texts = set(), []
    for p in sorted(LICENCES.iterdir()):
        real = p.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        texts.append(real.read_text(encoding="utf-8", errors="replace"))
    return texts


def _ptq_fingerprint(overrides: dict) -> str:
    """What a cached PTQ model depends on: the PTQ code (init/, tensor/ file contents) and the
    row's effective config."""
    from optimum_lcqat import LCQATConfig

    h = hashlib.sha256()
    for sub in ("init", "tensor"):
        for f in sorted((ROOT / "optimum_lcqat" / sub).glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    cfg = {k: v for k, v in LCQATConfig(**overrides).to_dict().items() if k not in ("dataset", "tokenizer")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def ptq_model(name: str, tok):
    """The PTQ model of PTQ row ``name`` (float32) and its PTQ seconds (None when loaded from the cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_lcqat import LCQATConfig
    from optimum_lcqat._atomic import write_dir_atomic
    from optimum_lcqat.assets import default_cache_dir, smollm2_path
    from optimum_lcqat.data import split_texts

    overrides = ROWS[name][0]
    cache = default_cache_dir() / "ablation" / name
    fp = _ptq_fingerprint(overrides)
    meta = cache / "ablation_row.json"
    if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp:
        print(f"{name}: PTQ model from the cache {cache}", flush=True)
        return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32), None
    qcfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, **overrides)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), quantization_config=qcfg, dtype=torch.float32)
    secs = time.perf_counter() - t0

    def save(d):
        model.save_pretrained(d)
        (Path(d) / "ablation_row.json").write_text(json.dumps({"row": name, "overrides": overrides, "fingerprint": fp}))

    write_dir_atomic(cache, save)
    return model, secs


def evaluate(model, tok) -> dict:
    from optimum_lcqat.data import split_texts, token_stream
    from optimum_lcqat.evaluation import perplexity

    out = {}
    for split, texts in (("heldout", split_texts("heldout")), ("licences", licence_texts())):
        tokens = token_stream(texts, tok, max_tokens=EVAL_TOKENS)
        r = perplexity(model, tokens, ctx=512, batch_size=4)
        out[f"ppl_{split}"] = r["ppl"]
        out[f"tokens_{split}"] = r["tokens_scored"]
    return out


def _qat_run_dir(row: str, settings: dict, budgets: list[int]) -> Path:
    """Where a QAT run split into parts keeps its resumable Trainer checkpoint: one folder per
    (row, settings, planned budgets), so a part resumes only the run it belongs to."""
    from optimum_lcqat.assets import default_cache_dir

    key = hashlib.sha256(json.dumps([row, settings, budgets], sort_keys=True).encode()).hexdigest()[:12]
    return default_cache_dir() / "ablation" / f"{row}-qat-{key}"


def run_qat(model, tok, settings: dict, budgets: list[int], row: str = "", stop_at: int | None = None) -> dict:
    """LC-QAT of ``model`` with the row's settings; both perplexities at each budget.

    The run is planned for max(budgets) tokens (steps, data, schedule). With ``stop_at`` it trains
    only up to that many tokens, evaluating the budgets it passes, and saves a resumable Trainer
    checkpoint (model, optimizer, RNG, LCQATCallback state); the next call with the same row,
    settings and budgets resumes it, so the parts together are the one planned run (same batches
    in the same order). Train seconds add up over the parts."""
    import tempfile

    from qat import budget_eval_callback
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

    from optimum_lcqat.data import split_texts, token_windows
    from optimum_lcqat.training import LCQATCallback, LCQATTrainer

    steps = math.ceil(max(budgets) / (QAT_BATCH * QAT_SEQ))
    train_ds = token_windows(split_texts("train"), tok, QAT_SEQ, max_tokens=max(budgets) + QAT_BATCH * QAT_SEQ * 2)
    points: dict[str, dict] = {}
    parted = stop_at is not None
    run_dir = _qat_run_dir(row, settings, budgets) if parted else None
    resume, seconds_before, tokens_before = None, 0.0, 0
    if parted and run_dir.is_dir():
        resume = get_last_checkpoint(str(run_dir))
        if resume:
            # the part's record sits in its checkpoint folder (older runs: beside it, one per run)
            record_file = next((f for f in (Path(resume) / "part.json", run_dir / "part.json") if f.is_file()), None)
            if record_file is None:
                raise SystemExit(
                    f"QAT part: checkpoint {resume} has no part.json (its train time and tokens): the part was "
                    f"stopped between saving the checkpoint and recording it. Delete {run_dir} to start the "
                    "planned run over, or remove that checkpoint folder to resume from an earlier one.")
            part = json.loads(record_file.read_text())
            seconds_before, tokens_before = part["train_seconds"], part["tokens"]

    def record(budget, tokens, ppl, train_s, loss):
        points[str(budget)] = {**ppl, "tokens": int(tokens), "train_seconds": seconds_before + train_s,
                               "train_loss": loss, **({"resumed_from": Path(resume).name} if resume else {})}
        print(f"QAT {tokens} tokens: {ppl} (train {seconds_before + train_s:.0f}s)", flush=True)

    budget_cb = budget_eval_callback(budgets, lambda m: evaluate(m, tok), record)
    budget_cb.pending = [b for b in budget_cb.pending if b > tokens_before]  # earlier parts evaluated these

    class _StopAndSave(TrainerCallback):
        """Ends this part once it has trained ``stop_at`` tokens, with a checkpoint to resume."""

        def on_step_end(self, args, state, control, **kw):
            if state.num_input_tokens_seen >= stop_at and state.global_step < state.max_steps:
                control.should_training_stop = True
                control.should_save = True

        def on_save(self, args, state, control, **kw):
            part = {"train_seconds": seconds_before + budget_cb.train_time, "tokens": state.num_input_tokens_seen,
                    "step": state.global_step}
            # into the checkpoint just written (transformers' checkpoint-<step>), through a temporary
            # name: a checkpoint either has its record or visibly lacks it
            dest = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / "part.json"
            write_text_atomic(dest, json.dumps(part))

    with tempfile.TemporaryDirectory(prefix="lcqat-ablation-") as tmp:
        out = str(run_dir) if parted else tmp
        # the row's "args" override these shared defaults (e.g. qat_optim's weight_decay)
        arg_values = dict(
            output_dir=out, per_device_train_batch_size=QAT_BATCH, max_steps=steps, learning_rate=QAT_LR,
            lr_scheduler_type="constant_with_warmup", warmup_steps=2, weight_decay=0.0, max_grad_norm=1.0,
            logging_steps=1, save_strategy="no", save_total_limit=1, report_to=[], seed=0, data_seed=0,
            disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, include_num_input_tokens_seen="all",
        )
        args = TrainingArguments(**{**arg_values, **settings.get("args", {})})
        cb = LCQATCallback(**settings.get("callback", {}))
        # the budget callback ends the run at its last budget (the plan's end); a part ends earlier
        callbacks = [cb, budget_cb] + ([_StopAndSave()] if parted else [])
        trainer = LCQATTrainer(model=model, args=args, train_dataset=train_ds, callbacks=callbacks)
        if resume:
            print(f"QAT: resuming {resume} ({seconds_before:.0f} train seconds before)", flush=True)
        trainer.train(resume_from_checkpoint=resume)
    return {"budgets": points, "settings": settings, "batch": QAT_BATCH, "seq_len": QAT_SEQ, "lr": QAT_LR,
            "planned_budgets": budgets, **({"run_dir": str(run_dir), "stopped_at_tokens": stop_at} if parted else {})}


def run_row(name: str, qat_budgets: list[int], stop_at: int | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_lcqat.assets import smollm2_path

    torch.manual_seed(0)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    if name == "fp32":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return {"row": name, "config": None, "ptq_seconds": None, **evaluate(model, tok)}
    if name in QAT_ROWS:
        base = QAT_ROWS[name][0].get("base", QAT_BASE)
        model, _ = ptq_model(base, tok)
        return {"row": name, "base": base, "qat": run_qat(model, tok, QAT_ROWS[name][0], qat_budgets, name, stop_at)}
    model, ptq_s = ptq_model(name, tok)
    out = {"row": name, "config": {"overrides": ROWS[name][0]}, "ptq_seconds": ptq_s, **evaluate(model, tok)}
    if qat_budgets:
        out["qat"] = run_qat(model, tok, PTQ_ROW_QAT, qat_budgets, name, stop_at)
    return out


def _merge_parts(old: dict | None, new: dict) -> dict:
    """A part of a QAT run split over several invocations (``--qat-stop-at``) adds its budget
    points to the row's earlier parts of the same planned run, each point keeping when and from
    which commit it was measured. A PTQ model read from the cache has no PTQ time: the time
    measured when it was built stays."""
    if not old or "error" in old or "error" in new:
        return new
    oq, nq = old.get("qat") or {}, new.get("qat") or {}
    if new.get("ptq_seconds") is None and old.get("ptq_seconds") is not None and "ppl_heldout" in new:
        new["ptq_seconds"] = old["ptq_seconds"]
        new["ptq_seconds_measured"] = old.get("ptq_seconds_measured") or f"{old.get('time')}, git {old.get('commit', '')[:7]}"
    same_run = nq.get("settings") == oq.get("settings") and nq.get("planned_budgets") == oq.get("planned_budgets")
    if nq.get("run_dir") and same_run:
        stamp = {"time": new.get("time"), "commit": new.get("commit"), "command": new.get("command")}
        for pt in nq["budgets"].values():
            pt.setdefault("measured", stamp)
        nq["budgets"] = {**oq.get("budgets", {}), **nq["budgets"]}
    return new


def _x(r: dict, fp: dict, key: str) -> str:
    return f"{r[key] / fp[key]:.2f}" if fp.get(key) and r.get(key) else ""


def _qat_cells(r: dict, fp: dict) -> str:
    """heldout / licences perplexity (x fp32) at 50K and 200K QAT tokens, blank where not run."""
    pts = (r.get("qat") or {}).get("budgets", {})
    cells = []
    for b in ("50000", "200000"):
        p = pts.get(b)
        cells.append(f"{p['ppl_heldout']:.2f} ({_x(p, fp, 'ppl_heldout')}) / {p['ppl_licences']:.2f} "
                     f"({_x(p, fp, 'ppl_licences')})" if p else "")
    return " | ".join(cells)


def _measured(r: dict) -> str:
    return f"{r['time']}, {r['cpu']}, git {r['commit'][:7]}"


def _last_line(error: str) -> str:
    """A worker's error as one table cell: the last line of its stderr (the exception)."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else error)[:160].replace("|", "/")


def render(rows: dict, env_md: str) -> str:
    fp = rows.get("fp32", {})
    lines = ["# Quality v2 ablation: SmolLM2-135M, the recipe's knobs one at a time (#13)", "", env_md,
             "Perplexity at context 512 on the first 32768 tokens of two held-out texts, neither calibrated nor "
             "trained on: `heldout` = the Python tutorial (the figure of results/quality.md), `licences` = "
             "/usr/share/common-licenses (a second domain, plain English legal text). Calibration: pydoc topics. "
             "x = ratio to fp32 measured by the same script. PTQ s = wall time of the quantizing from_pretrained "
             "(2 threads, one row at a time). QAT cells: heldout (x fp32) / licences (x fp32) after that many "
             f"training tokens (batch {QAT_BATCH} x {QAT_SEQ}, AdamW lr {QAT_LR:g}, the `train` split, seed 0); "
             "blank = not run.", "",
             "## PTQ knobs", "",
             "| row | what it tries | PTQ s | heldout ppl | x fp32 | licences ppl | x fp32 | QAT 50K | QAT 200K | measured | command |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | {ROWS[name][1]} | error: {_last_line(r['error'])} | | | | | | | {r.get('time', '')} | |")
            continue
        ptq = f"{r['ptq_seconds']:.0f}" if r.get("ptq_seconds") is not None else "-"
        lines.append(f"| {name} | {ROWS[name][1]} | {ptq} | {r['ppl_heldout']:.2f} | {_x(r, fp, 'ppl_heldout')} | "
                     f"{r['ppl_licences']:.2f} | {_x(r, fp, 'ppl_licences')} | {_qat_cells(r, fp)} | {_measured(r)} | "
                     f"`{r['command']}` |")
    qat = [n for n in QAT_ROWS if n in rows]
    if qat:
        lines += ["", f"## QAT knobs (each from the `{QAT_BASE}` row's PTQ model unless it says otherwise, same batches)", "",
                  "| row | what it tries | QAT 50K | QAT 200K | train s (last budget) | measured | command |",
                  "|---|---|---|---|---:|---|---|"]
        for name in qat:
            r = rows[name]
            if "error" in r:
                lines.append(f"| {name} | {QAT_ROWS[name][1]} | error: {_last_line(r['error'])} | | | {r.get('time', '')} | |")
                continue
            pts = r["qat"]["budgets"]
            last = pts[max(pts, key=int)]["train_seconds"] if pts else None
            ts = f"{last:.0f}" if last is not None else ""
            lines.append(f"| {name} | {QAT_ROWS[name][1]} | {_qat_cells(r, fp)} | {ts} | {_measured(r)} | `{r['command']}` |")
    long_runs = [n for n in ALL_ROWS if n in rows and "error" not in rows[n]
                 and any(int(b) > 200000 for b in (rows[n].get("qat") or {}).get("budgets", {}))]
    for name in long_runs:
        q = rows[name]["qat"]
        lines += ["", f"## Long QAT: `{name}` row, every budget point (batch {q['batch']} x {q['seq_len']}, "
                  f"planned to {max(q.get('planned_budgets') or [0]):,} tokens)", "",
                  "| QAT tokens | heldout ppl | x fp32 | licences ppl | x fp32 | train s (cumulative) | part | measured | command |",
                  "|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for b in sorted(q["budgets"], key=int):
            p = q["budgets"][b]
            m = p.get("measured") or {"time": rows[name].get("time"), "commit": rows[name].get("commit", ""),
                                      "command": rows[name].get("command")}
            part = f"resumed from {p['resumed_from']}" if p.get("resumed_from") else "first"
            lines.append(f"| {int(b):,} | {p['ppl_heldout']:.2f} | {_x(p, fp, 'ppl_heldout')} | {p['ppl_licences']:.2f} | "
                         f"{_x(p, fp, 'ppl_licences')} | {p['train_seconds']:.0f} | {part} | {m['time']}, git "
                         f"{(m['commit'] or '')[:7]} | `{m['command']}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=None, help="rows to run (default: all not yet measured)")
    ap.add_argument("--force", action="store_true", help="run rows already in the JSON again")
    ap.add_argument("--qat-budgets", default="", help="comma list of QAT token budgets, e.g. 50000,200000 "
                    "(PTQ rows: QAT after PTQ; qat_* rows need it)")
    ap.add_argument("--qat-stop-at", type=int, default=None, metavar="TOKENS",
                    help="train this invocation only up to TOKENS of the run planned by --qat-budgets, then save a "
                    "resumable checkpoint; the next call with the same rows and budgets resumes it (give it on every "
                    "part, the last one with the largest budget). Points merge into the row's earlier ones")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        budgets = sorted({int(b) for b in args.qat_budgets.split(",") if b.strip()})
    except ValueError:
        ap.error(f"--qat-budgets {args.qat_budgets!r}: give whole token counts separated by commas, e.g. 50000,200000")
    if args.list:
        for name, (_, what) in ALL_ROWS.items():
            print(f"{name:16s} {what}")
        return
    if args.worker:
        import torch

        torch.set_num_threads(2)
        Path(args.worker_out).write_text(json.dumps(run_row(args.worker, budgets, args.qat_stop_at)))
        return

    from _common import environment, md_env

    from optimum_lcqat._machine import cpu_info

    unknown = [r for r in (args.rows or []) if r not in ALL_ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; --list shows them")
    if args.qat_stop_at is not None and (not budgets or args.qat_stop_at <= 0):
        ap.error(f"--qat-stop-at {args.qat_stop_at}: give a positive token count inside the run that --qat-budgets "
                 "plans, e.g. --qat-budgets 50000,400000,1000000 --qat-stop-at 400000")
    if not budgets and any(r in QAT_ROWS for r in args.rows or []):
        ap.error("qat_* rows train: give --qat-budgets, e.g. --qat-budgets 50000,200000")
    path = RESULTS / "ablation.json"
    data = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    def measured(r: str) -> bool:
        have = data["rows"].get(r)
        if have is None or "error" in have:
            return False
        done = (have.get("qat") or {}).get("budgets", {})
        return all(str(b) in done for b in budgets) if (budgets and r != "fp32") else r not in QAT_ROWS

    todo = [r for r in (args.rows or ROWS) if args.force or not measured(r)]
    env = environment()
    for name in todo:
        tmp = RESULTS / f".ablation_{name}.json"
        qflag = f" --qat-budgets {','.join(map(str, budgets))}" if budgets and name != "fp32" else ""
        qflag += f" --qat-stop-at {args.qat_stop_at}" if qflag and args.qat_stop_at is not None else ""
        cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(tmp)]
        cmd += qflag.split()
        print(f"== {name}: {ALL_ROWS[name][1]}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        if tmp.is_file():
            res = json.loads(tmp.read_text())
            tmp.unlink()
        else:
            res = {"row": name, "error": f"worker exited with {proc.returncode}: {proc.stderr[-2000:]}"}
        res.update(process_seconds=time.perf_counter() - t, time=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
                   cpu=cpu_info()["model"], commit=env.get("git_commit") or "unknown",
                   command=f"python -P benchmarks/ablation.py --rows {name}{qflag}")
        print(json.dumps({k: v for k, v in res.items() if k != "config"}), flush=True)
        data["rows"][name] = _merge_parts(data["rows"].get(name), res)
        data["environment_last_run"] = env
        write_text_atomic(path, json.dumps(data, indent=1))  # a killed run keeps the rows it finished
        write_text_atomic(RESULTS / "ablation.md", render(data["rows"], md_env(env)))
    print((RESULTS / "ablation.md").read_text() if (RESULTS / "ablation.md").is_file() else "nothing run")


if __name__ == "__main__":
    main()
