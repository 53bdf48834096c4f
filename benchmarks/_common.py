"""Shared helpers of the benchmark scripts: machine description, git commit, result writing."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch

from optimum_lcqat._machine import cpu_info  # noqa: F401  (re-exported for the scripts)
from optimum_lcqat._atomic import write_text_atomic
from optimum_lcqat._machine import git_commit as _git_commit

# Per-layer shapes (out, in) the kernel benchmarks (kernels.py, kernels_cuda.py) time.
LAYER_SHAPES = {
    "smollm2.q/o (576x576)": (576, 576),
    "smollm2.k/v (192x576)": (192, 576),
    "smollm2.gate/up (1536x576)": (1536, 576),
    "smollm2.down (576x1536)": (576, 1536),
    "llama7b.attn (4096x4096)": (4096, 4096),
    "llama7b.gate/up (11008x4096)": (11008, 4096),
    "llama7b.down (4096x11008)": (4096, 11008),
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def git_commit() -> str:
    return _git_commit(ROOT) or "unknown"


def environment() -> dict:
    from optimum_lcqat.kernels import backend_name, native

    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "lcqat_backend": backend_name(),
        "lcqat_cpu_isa": native.cpu_isa(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # other work on the machine skews every wall-clock figure: record how busy it was
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write(name: str, payload: dict, markdown: str) -> tuple[str, str]:
    os.makedirs(RESULTS, exist_ok=True)
    jpath = os.path.join(RESULTS, name + ".json")
    mpath = os.path.join(RESULTS, name + ".md")
    # temp-then-rename: an interrupted run never leaves a half-written result beside good ones
    write_text_atomic(jpath, json.dumps(payload, indent=1))
    write_text_atomic(mpath, markdown)
    return jpath, mpath


def md_env(env: dict) -> str:
    cpu = env["cpu"]
    return (
        f"- command: `{env['command']}`\n- time: {env['time_utc']}, git {env['git_commit']}\n"
        f"- CPU: {cpu['model']}, {cpu.get('affinity_cpus', cpu['logical_cpus'])} CPUs, flags: {' '.join(cpu['flags'])}\n"
        f"- torch {env['torch']}, {env['torch_threads']} threads; lcqat backend {env['lcqat_backend']} "
        f"(CPU kernels: {env['lcqat_cpu_isa']})\n"
        + (f"- load average at start (1/5/15 min): {', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}\n"
           if env.get("load_average_at_start") else "")
    )
