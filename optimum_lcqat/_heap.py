"""Keep freed CPU memory inside the process while training on the CPU (glibc malloc settings).

Why: one training step of an LC model on the CPU allocates and frees gigabytes of activations
(SmolLM2-135M, 4 x 512 tokens: ~10 GB). By default glibc hands every block above 128 KiB-32 MiB
back to the operating system when it is freed (mmap threshold, heap trimming), so the next step
touches fresh pages and takes one page fault per 4 KiB: 2.6 million faults in the first step and
0.4 million in every later one, about a third of the step on these VMs (2-core VM, SmolLM2-135M,
4 x 512 tokens; benchmarks/results/ablation.md: the same 50K QAT tokens at the same settings in
334 s, against 491 s before this). With mmap off and trimming off the heap keeps what it grew to and every
step after the first two runs without a fault.

The cost: the process keeps its peak heap until it exits (it is reused, not returned). Results
do not change. ``OPTIMUM_LCQAT_RETAIN_HEAP=0`` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_state: bool | None = None  # None: not tried yet

__all__ = ["retain_freed_memory"]


def retain_freed_memory() -> bool:
    """Tell glibc malloc to serve large blocks from its heap and never trim it (once a process);
    returns whether that is in force. A no-op off Linux/glibc or with OPTIMUM_LCQAT_RETAIN_HEAP=0."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if os.environ.get("OPTIMUM_LCQAT_RETAIN_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has mallopt with these meanings
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success
    _state = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    if _state:
        logger.info(
            "optimum-lcqat: glibc malloc now keeps freed memory for reuse (no mmap, no trim) so CPU "
            "training steps do not page-fault; the process keeps its peak heap. "
            "OPTIMUM_LCQAT_RETAIN_HEAP=0 turns this off."
        )
    return _state
