"""Keep freed CPU memory inside the process while training on the CPU (glibc malloc settings).

Why: one training step of an LC model on the CPU allocates and frees gigabytes of activations
(SmolLM2-135M, 4 x 512 tokens: ~10 GB). By default glibc hands every block above 128 KiB-32 MiB
back to the operating system when it is freed (mmap threshold, heap trimming), so the next step
touches fresh pages and takes one page fault per 4 KiB: 2.6 million faults in the first step and
0.4 million in every later one, about a third of the step on these VMs (2-core VM, SmolLM2-135M,
4 x 512 tokens; benchmarks/results/ablation.md: the same 50K QAT tokens at the same settings in
334 s, against 491 s before this). With mmap off and trimming off the heap keeps what it grew to and every
step after the first two runs without a fault.

The cost: while retained, the process keeps its peak heap (reused, not returned). So it is held only
while the work runs: :func:`retain_freed_memory` and :func:`release_freed_memory` pair up (a count,
so nested holders work: PTQ inside a training script), and when the last holder lets go malloc's
defaults come back and ``malloc_trim`` hands the freed heap to the operating system (a 14 GB PTQ
heap no longer stays with the user's process after the work is done). ``with retained_heap():``
does both. Results do not change. ``OPTIMUM_LCQAT_RETAIN_HEAP=0`` leaves malloc as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
# glibc's own defaults (malloc/malloc.c: DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX, DEFAULT_MMAP_THRESHOLD_MIN),
# restored when the work ends (the mmap threshold's own growth, up to 32 MiB, stays off once it was set)
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_lock = threading.Lock()
_holders = 0
_libc = None  # glibc's mallopt and malloc_trim, once found; False where there is no glibc

__all__ = ["retain_freed_memory", "release_freed_memory", "retained_heap", "heap_holders", "trim_heap",
           "fixed_mmap_threshold"]


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # only glibc has mallopt with these meanings
                libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
                libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc


def retain_freed_memory() -> bool:
    """Tell glibc malloc to serve large blocks from its heap and never trim it, until the matching
    :func:`release_freed_memory`; returns whether that is in force. A no-op (False) off Linux/glibc
    or with OPTIMUM_LCQAT_RETAIN_HEAP=0."""
    global _holders
    libc = _glibc()
    if os.environ.get("OPTIMUM_LCQAT_RETAIN_HEAP", "1") == "0" or not libc:
        return False
    with _lock:
        _holders += 1
        if _holders > 1:
            return True
        # mallopt returns 1 on success
        ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
        if not ok:
            _holders = 0
            return False
    logger.info(
        "optimum-lcqat: glibc malloc keeps freed memory for reuse (no mmap, no trim) while the work runs, so CPU "
        "training steps do not page-fault; it is given back when the work ends. OPTIMUM_LCQAT_RETAIN_HEAP=0 turns "
        "this off."
    )
    return True


def release_freed_memory() -> None:
    """One holder lets go; the last one restores malloc's defaults and returns the freed heap to the
    operating system (malloc_trim). Unpaired calls do nothing."""
    global _holders
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders:
            return
        libc = _glibc()
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def heap_holders() -> int:
    """How many holders keep the heap retained now (0: malloc as the process had it)."""
    return _holders


@contextlib.contextmanager
def retained_heap():
    """``with retained_heap():`` the work runs with the heap retained, and gives it back after
    (also when the work raises)."""
    on = retain_freed_memory()
    try:
        yield on
    finally:
        if on:
            release_freed_memory()


def trim_heap() -> None:
    """Hand the heap's free memory back to the operating system now (glibc ``malloc_trim``); a
    no-op without glibc, and while a holder retains the heap."""
    libc = _glibc()
    if libc and not _holders:
        libc.malloc_trim(0)


@contextlib.contextmanager
def fixed_mmap_threshold(nbytes: int):
    """Blocks from ``nbytes`` up come from mmap (and go back to the system when freed) while the
    work runs; smaller ones from the heap.

    Why (streaming PTQ): by default glibc raises its mmap threshold to the size of every mmap'd
    block freed, so after the first blocks of a model a decoder block's large temporaries (a few
    MB to tens of MB) come from the heap instead, fragment it, and the peak RSS creeps up block
    after block (random Llama, width 768, 32 x 512 tokens: 1016 -> 1064 MiB from block 2 to 5 of
    6). With an 8 MiB threshold: 943 / 996 / 1001 MiB at 2 / 6 / 12 blocks, the same time (a
    1 MiB threshold peaks lower but costs +50% time in page faults). Setting a threshold turns
    the dynamic one off; leaving restores glibc's default (dynamic again only in a new process).
    Nested inside :func:`retained_heap`, or without glibc: does nothing."""
    libc = _glibc()
    on = bool(libc) and not _holders and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    try:
        yield on
    finally:
        if on:
            libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
