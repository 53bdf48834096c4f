"""Errors shared by the model-level modules (a leaf: imports nothing of the package)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that is not a valid lcqat checkpoint (truncated, corrupted, inconsistent)."""
