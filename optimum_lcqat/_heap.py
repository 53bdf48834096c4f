"""Keep freed CPU memory inside the process while training on the CPU, and give it back after.

Why: one training step of an LC model on the CPU allocates and frees gigabytes of activations
(SmolLM2-135M, 4 x 512 tokens: ~10 GB). By default glibc hands every block above 128 KiB-32 MiB
back to the operating system when it is freed (mmap threshold, heap trimming), so the next step
touches fresh pages and takes one page fault per 4 KiB: 2.6 million faults in the first step and
0.4 million in every later one, about a third of the step on these VMs (benchmarks/results/
ablation.md: the same 50K QAT tokens in 334 s, against 491 s before this).

How, in order of preference:

* ``cache`` (the native extension loads): torch's CPU allocator is replaced, while the work runs,
  by csrc/cpu/caching_allocator.cpp: every tensor block of at least 256 KiB gets pages of its own
  and, when freed, waits for the next request of about its size. Later steps reuse the pages
  without faults, and blocks never share pages, so the process holds about the step's live peak
  (SmolLM2-135M QAT, 4 x 512: 2.74 GiB peak RSS, against 5.67 GiB with the glibc mode below, at
  the same speed; benchmarks/results/memory.md as of git 8e7a5c2).
* ``glibc`` (no extension, or ``OPTIMUM_LCQAT_RETAIN_HEAP=glibc``): glibc malloc is told to serve
  large blocks from its heap and never trim it (mallopt). Also fault-free, but blocks of every
  lifetime share one heap, which grows to about twice the live peak. Taking it because the
  extension is missing is logged once.

:func:`retain_freed_memory` and :func:`release_freed_memory` pair up (a count, so nested holders
work: PTQ inside a training script); when the last holder lets go, the cached blocks are unmapped,
malloc's defaults come back and ``malloc_trim`` hands glibc's free heap to the operating system.
``with retained_heap():`` does both. Results do not change. ``OPTIMUM_LCQAT_RETAIN_HEAP=0`` leaves
the allocators as they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading

import torch

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
# blocks from this size up go to the caching allocator; below it, to torch's default allocator
_CACHE_MIN_BYTES = 256 * 1024
_lock = threading.Lock()
_holders = 0
_mode: str | None = None  # "cache" or "glibc" while held
_warned_no_cache = False
_libc = None  # glibc's mallopt and malloc_trim, once found; False where there is no glibc

__all__ = ["retain_freed_memory", "release_freed_memory", "retained_heap", "heap_holders", "heap_mode",
           "planned_mode", "cache_stats", "trim_heap", "fixed_mmap_threshold"]


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


def _native_cache() -> bool:
    """Whether the extension's caching CPU allocator can be used (its library loads)."""
    from .kernels import native

    return native.available() and hasattr(torch.ops.lcqat, "cpu_cache_enable")


def _start(choice: str) -> str | None:
    """Turn the chosen mode on; the mode in force, or None."""
    global _warned_no_cache
    if choice != "glibc":
        if _native_cache() and torch.ops.lcqat.cpu_cache_enable(True, _CACHE_MIN_BYTES):
            return "cache"
        if not _warned_no_cache:
            _warned_no_cache = True
            logger.warning(
                "optimum-lcqat: the native extension's caching CPU allocator is not available (%s), so freed training "
                "memory is kept in glibc's heap instead: the same speed, a higher peak RSS (about twice the live "
                "memory). Build the extension (see the README) to get the lower peak.",
                "the extension did not load" if not _native_cache() else "another CPU allocator is installed",
            )
    libc = _glibc()
    # mallopt returns 1 on success
    if libc and libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX):
        return "glibc"
    return None


def retain_freed_memory() -> bool:
    """Keep freed CPU memory for reuse (the caching allocator, or glibc's heap: see the module
    docstring) until the matching :func:`release_freed_memory`; returns whether that is in force.
    A no-op (False) with OPTIMUM_LCQAT_RETAIN_HEAP=0, or where neither way is available."""
    global _holders, _mode
    choice = os.environ.get("OPTIMUM_LCQAT_RETAIN_HEAP", "1")
    if choice == "0":
        return False
    with _lock:
        if _holders:
            _holders += 1
            return True
        _mode = _start(choice)
        if _mode is None:
            return False
        _holders = 1
    logger.info(
        "optimum-lcqat: freed CPU memory is kept for reuse (%s) while the work runs, so training steps do not "
        "page-fault; it is given back when the work ends. OPTIMUM_LCQAT_RETAIN_HEAP=0 turns this off.", _mode
    )
    return True


def release_freed_memory() -> None:
    """One holder lets go; the last one unmaps the cached blocks or restores malloc's defaults,
    and returns glibc's free heap to the operating system (malloc_trim). Unpaired calls do nothing."""
    global _holders, _mode
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders:
            return
        if _mode == "cache":
            torch.ops.lcqat.cpu_cache_enable(False, 0)
        else:
            libc = _glibc()
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        _mode = None
        libc = _glibc()
        if libc:
            libc.malloc_trim(0)


def planned_mode() -> str | None:
    """The way :func:`retain_freed_memory` would keep freed memory in this process now: ``"cache"``,
    ``"glibc"``, or None (``OPTIMUM_LCQAT_RETAIN_HEAP=0``): what memory_plan predicts peaks for."""
    if _mode is not None:
        return _mode
    choice = os.environ.get("OPTIMUM_LCQAT_RETAIN_HEAP", "1")
    if choice == "0":
        return None
    return "cache" if choice != "glibc" and _native_cache() else ("glibc" if _glibc() else None)


def heap_mode() -> str | None:
    """How freed memory is kept now: ``"cache"``, ``"glibc"``, or None (not retained)."""
    return _mode


def cache_stats() -> dict[str, int] | None:
    """The caching allocator's counters (bytes live, cached, their joint peak, the live peak,
    hits, misses), or None without the extension."""
    if not _native_cache():
        return None
    keys = ("live_bytes", "cached_bytes", "peak_bytes", "live_peak_bytes", "hits", "misses")
    return dict(zip(keys, torch.ops.lcqat.cpu_cache_stats()))


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
