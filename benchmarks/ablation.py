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

Rows accumulate: results are merged row by row into benchmarks/results/ablation.json (a row
already there is kept unless ``--force``), and ablation.md is rendered from the JSON with the
command of every row, so the table can grow over several runs. The QAT columns of the issue
(perplexity after 50K and 200K QAT tokens per row) are not measured by this script yet.

    PYTHONPATH=$PWD python -P benchmarks/ablation.py --rows fp32 default hadamard_full
    PYTHONPATH=$PWD python -P benchmarks/ablation.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = ROOT / "benchmarks" / "results"
EVAL_TOKENS = 32768
LICENCES = Path("/usr/share/common-licenses")

# name -> (LCQATConfig overrides, what the row tries: the aspect of the table)
ROWS: dict[str, tuple[dict | None, str]] = {
    "fp32": (None, "full precision, no quantization"),
    "default": ({}, "today's defaults: 128 x 512 calibration tokens, 4 rounds x 1 refinement pass, 24 fine-tune steps a block, Hadamard blocks of 128"),
    "refine10": ({"ptq_refine_passes": 10}, "LDLQ refinement: 10 coordinate-descent passes after each (A, beta) fit (official: 10)"),
    "iters10": ({"init_iters": 10}, "10 rounds of assignment + (A, beta) fit (today 4)"),
    "finetune96": ({"ptq_finetune_steps": 96}, "block fine-tune: 96 Adam steps a block (today 24)"),
    "hadamard_full": ({"hadamard_block_size": "full"}, "full-dimension Hadamard (paper) instead of blocks of 128"),
    "calib256": ({"num_samples": 256}, "calibration: 256 x 512 tokens (today 128 x 512)"),
    "calib128x1024": ({"model_seqlen": 1024}, "calibration: 128 x 1024 tokens (longer sequences)"),
}


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


def run_row(name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_lcqat import LCQATConfig
    from optimum_lcqat.assets import smollm2_path
    from optimum_lcqat.data import split_texts, token_stream
    from optimum_lcqat.evaluation import perplexity

    torch.manual_seed(0)
    overrides, _ = ROWS[name]
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    t0 = time.perf_counter()
    if overrides is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        config = None
    else:
        qcfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, **overrides)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, dtype=torch.float32)
        config = {k: getattr(qcfg, k) for k in ("num_samples", "model_seqlen", "init_iters", "ptq_refine_passes",
                                                 "ptq_finetune_steps", "ptq_finetune_lr", "ptq_damp",
                                                 "hadamard_block_size", "codebook", "seed")}
    ptq_s = time.perf_counter() - t0
    out = {"row": name, "config": config, "ptq_seconds": ptq_s if overrides is not None else None}
    for split, texts in (("heldout", split_texts("heldout")), ("licences", licence_texts())):
        tokens = token_stream(texts, tok, max_tokens=EVAL_TOKENS)
        r = perplexity(model, tokens, ctx=512, batch_size=4)
        out[f"ppl_{split}"] = r["ppl"]
        out[f"tokens_{split}"] = r["tokens_scored"]
    return out


def render(rows: dict, env_md: str) -> str:
    fp = rows.get("fp32", {})
    lines = ["# Quality v2 ablation: SmolLM2-135M, PTQ knobs one at a time (#13)", "", env_md,
             "Perplexity at context 512 on the first 32768 tokens of two held-out texts, neither calibrated nor "
             "trained on: `heldout` = the Python tutorial (the figure of results/quality.md), `licences` = "
             "/usr/share/common-licenses (a second domain, plain English legal text). Calibration: pydoc topics. "
             "x = ratio to fp32 measured by the same script. PTQ s = wall time of the quantizing from_pretrained "
             "(2 threads, one row at a time). QAT columns (50K / 200K tokens): not measured yet.", "",
             "| row | what it tries | PTQ s | heldout ppl | x fp32 | licences ppl | x fp32 | measured | command |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | {ROWS[name][1]} | error: {r['error'][:80]} | | | | | {r.get('time', '')} | |")
            continue
        xh = f"{r['ppl_heldout'] / fp['ppl_heldout']:.2f}" if fp.get("ppl_heldout") else ""
        xl = f"{r['ppl_licences'] / fp['ppl_licences']:.2f}" if fp.get("ppl_licences") else ""
        ptq = f"{r['ptq_seconds']:.0f}" if r.get("ptq_seconds") is not None else "-"
        lines.append(f"| {name} | {ROWS[name][1]} | {ptq} | {r['ppl_heldout']:.2f} | {xh} | {r['ppl_licences']:.2f} | "
                     f"{xl} | {r['time']}, {r['cpu']}, git {r['commit'][:7]} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=None, help="rows to run (default: all not yet measured)")
    ap.add_argument("--force", action="store_true", help="run rows already in the JSON again")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.list:
        for name, (_, what) in ROWS.items():
            print(f"{name:15s} {what}")
        return
    if args.worker:
        import torch

        torch.set_num_threads(2)
        Path(args.worker_out).write_text(json.dumps(run_row(args.worker)))
        return

    from _common import environment, md_env

    from optimum_lcqat._machine import cpu_info

    unknown = [r for r in (args.rows or []) if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; --list shows them")
    path = RESULTS / "ablation.json"
    data = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    todo = [r for r in (args.rows or ROWS) if args.force or r not in data["rows"]]
    env = environment()
    for name in todo:
        tmp = RESULTS / f".ablation_{name}.json"
        cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(tmp)]
        print(f"== {name}: {ROWS[name][1]}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        if tmp.is_file():
            res = json.loads(tmp.read_text())
            tmp.unlink()
        else:
            res = {"row": name, "error": f"worker exited with {proc.returncode}: {proc.stderr[-2000:]}"}
        res.update(process_seconds=time.perf_counter() - t, time=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
                   cpu=cpu_info()["model"], commit=env.get("git_commit") or "unknown",
                   command=f"python -P benchmarks/ablation.py --rows {name}")
        print(json.dumps({k: v for k, v in res.items() if k != "config"}), flush=True)
        data["rows"][name] = res
        data["environment_last_run"] = env
        tmp_json = path.with_suffix(".json.tmp")
        tmp_json.write_text(json.dumps(data, indent=1))
        os.replace(tmp_json, path)  # a killed run keeps the rows it finished
        md = RESULTS / "ablation.md"
        md.with_suffix(".md.tmp").write_text(render(data["rows"], md_env(env)))
        os.replace(md.with_suffix(".md.tmp"), md)
    print((RESULTS / "ablation.md").read_text() if (RESULTS / "ablation.md").is_file() else "nothing run")


if __name__ == "__main__":
    main()
