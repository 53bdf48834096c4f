"""Shared fixtures: tiny randomly initialised models of several families, and the real SmolLM2.

Tests import the *installed* optimum_lcqat (scripts/test.sh installs it; this folder has no
__init__.py and the repository root is not put on sys.path), so they exercise what a user gets,
autoload .pth included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import TINY_FAMILIES, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_fp_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved full-precision tiny checkpoints, one per family."""
    root = tmp_path_factory.mktemp("tiny_fp")
    out = {}
    for family in TINY_FAMILIES:
        model = make_tiny_model(family)
        model.save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from optimum_lcqat.assets import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_lcqat(tmp_path_factory, smollm2_dir):
    """SmolLM2-135M quantized in flight (data-free), saved once for the session."""
    from transformers import AutoModelForCausalLM

    from optimum_lcqat import LCQATConfig

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=LCQATConfig(), dtype=torch.float32)
    out = tmp_path_factory.mktemp("smollm2_lcqat")
    model.save_pretrained(out)
    return model, out


def run_python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (with this environment), failing loudly on error."""
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=timeout, cwd="/",
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
