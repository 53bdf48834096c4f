"""What machine and code a measurement ran on: CPU model and vector flags, git commit.

One helper for the demo (inside the package) and the benchmark scripts (benchmarks/), so every
recorded figure describes its machine the same way.
"""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_info() -> dict:
    """CPU model, logical CPUs, the CPUs this process may run on, and its SIMD flags."""
    info = {"model": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(), "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and info["model"] in ("", platform.machine(), platform.processor()):
                    info["model"] = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    info["flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx")))
                    break
    except OSError:
        pass
    if hasattr(os, "sched_getaffinity"):
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    return info


def git_commit(cwd) -> str | None:
    """HEAD of the git checkout at ``cwd`` with ``+dirty`` when tracked files changed; None outside one."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0 or not sha.stdout.strip():
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=cwd, timeout=10).returncode != 0
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
