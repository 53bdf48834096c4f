"""optimum_lcqat._heap: freed CPU memory kept for reuse while the work runs, measurably (a
training-like pattern of allocations stops page-faulting after it has run twice), by the
extension's caching allocator (csrc/cpu/caching_allocator.cpp) or glibc's heap, given back after,
and switched off by its environment variable."""

import os
import subprocess
import sys

import pytest

# one "step": the sizes of a CPU training step in miniature (many 12 MiB activations, one
# 400 MiB logits block, small ones), all freed at its end
PROBE = r"""
import resource, torch
from optimum_lcqat._heap import retain_freed_memory
on = retain_freed_memory()
assert retain_freed_memory() is on  # decided once a process
def step():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    keep = [torch.ones(3 << 20) for _ in range(10)] + [torch.ones(100 << 20)] + [torch.ones(1 << 20) for _ in range(20)]
    del keep
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
faults = [step() for _ in range(8)]
from optimum_lcqat._heap import heap_mode
print(on, sum(faults[4:]) // 4, heap_mode())
"""


def probe(flag: str) -> tuple[bool, int, str]:
    env = {**os.environ, "OPTIMUM_LCQAT_RETAIN_HEAP": flag}
    out = subprocess.run([sys.executable, "-P", "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1]), out[2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize("flag,mode", [("1", "cache"), ("glibc", "glibc")])
def test_retained_heap_stops_step_page_faults_and_can_be_turned_off(flag, mode):
    from optimum_lcqat.kernels import native

    if mode == "cache" and not native.available():
        pytest.skip("the caching allocator is the native extension's")
    on, faults_on, got = probe(flag)
    off, faults_off, _ = probe("0")
    assert on and not off and got == mode
    # by default glibc maps the 400 MiB block fresh every step: ~102400 faults (one a 4 KiB page);
    # retained, later steps reuse the pages the process holds
    assert faults_off > 50_000, faults_off
    assert faults_on < 10_000, faults_on


# Steps whose blocks change size (20 x 12 MiB, then 12 x 20 MiB, 240 MiB live either way): the
# caching allocator serves the new sizes from the pages of the old ones (mremap), so it holds about
# the live 240 MiB, not both sets (480 MiB), and later steps still do not fault.
SIZES = r"""
import resource, torch
from optimum_lcqat._heap import cache_stats, retained_heap
from optimum_lcqat.memory_plan import current_rss
MiB = 1 << 20
def step(i):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n, numel = (20, 3 * MiB) if i % 2 == 0 else (12, 5 * MiB)  # fp32: 12 MiB or 20 MiB blocks
    keep = [torch.ones(numel) for _ in range(n)]
    del keep
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
base = current_rss()
with retained_heap():
    faults = [step(i) for i in range(8)]
    held = (current_rss() - base) // MiB
    st = cache_stats()
after = (current_rss() - base) // MiB
print(sum(faults[4:]) // 4, held, st["peak_bytes"] // MiB, st["live_peak_bytes"] // MiB, after)
"""


def _cache_child(code: str) -> list[str]:
    """What ``code`` prints, run in a fresh interpreter where the caching allocator is the default
    (skipped without the native extension, whose allocator it is)."""
    from optimum_lcqat.kernels import native

    if not native.available():
        pytest.skip("the caching allocator is the native extension's")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OPTIMUM_LCQAT_RETAIN_HEAP": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mmap / mremap")
def test_caching_allocator_reuses_pages_across_block_sizes_and_gives_them_back():
    words = _cache_child(SIZES)
    faults, held, peak, live_peak, after = map(int, words)
    out = " ".join(words)
    assert 235 <= live_peak <= 250, out
    assert peak <= 1.15 * live_peak, out  # not both sizes' sets (480 MiB)
    assert held >= 200 and held <= 1.25 * live_peak, out  # the cached pages are resident while held
    assert faults < 6_000, out  # a step touches 61440 pages; later ones reuse them
    assert after < 50, out  # unmapped when the last holder lets go


# A tensor allocated by the caching allocator stays valid after the cache is switched off (its
# block is unmapped when the tensor dies), small blocks come from torch's own allocator, and
# the cache does not change values.
AFTER_SWITCH = r"""
import torch
from optimum_lcqat._heap import cache_stats, retain_freed_memory, release_freed_memory
assert retain_freed_memory()
big, small = torch.arange(1 << 20, dtype=torch.float32), torch.arange(100, dtype=torch.float32)
live_big = cache_stats()["live_bytes"]
release_freed_memory()
assert torch.equal(big, torch.arange(1 << 20, dtype=torch.float32)) and float(small.sum()) == 4950.0
y = big * 2
del big
print(live_big, cache_stats()["live_bytes"], cache_stats()["cached_bytes"], float(y[-1]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mmap / mremap")
def test_caching_allocator_blocks_outlive_the_switch():
    live_big, live_after, cached_after, last = _cache_child(AFTER_SWITCH)
    assert int(live_big) == 4 << 20  # the 4 MiB block was the cache's, the 400-byte one was not
    assert int(live_after) == 0 and int(cached_after) == 0  # freed after the switch: unmapped, not cached
    assert float(last) == 2 * ((1 << 20) - 1)


# the heap is held while the work runs and handed back to the system after: RSS (what an OOM killer
# counts) falls back once the last holder lets go, nested holders keep it until then
RELEASE = r"""
import torch
from optimum_lcqat._heap import heap_holders, release_freed_memory, retained_heap
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss_mb()
with retained_heap() as on:
    assert on and heap_holders() == 1
    with retained_heap():
        x = torch.ones(100 << 20); x.add_(1); del x  # 400 MiB touched, then freed
        assert heap_holders() == 2
    held = rss_mb() - base
assert heap_holders() == 0
release_freed_memory()  # unpaired: nothing happens
after = rss_mb() - base
print(round(held), round(after))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retained_heap_is_given_back_when_the_work_ends():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    held, after = map(int, out.stdout.split())
    assert held > 300, (held, after)   # retained while a holder is left
    assert after < 50, (held, after)   # given back after the last one


# glibc's dynamic mmap threshold: once a 24 MiB mmap'd block is freed, a 16 MiB one comes from the
# heap and stays resident after it is freed; under fixed_mmap_threshold it is mmap'd and given back.
FIXED = r"""
import sys, torch
from optimum_lcqat._heap import fixed_mmap_threshold
from optimum_lcqat.memory_plan import current_rss
def kept_after_free():
    big = torch.ones(6 << 20)  # 24 MiB: mmap'd, and its free raises the dynamic threshold
    del big
    r0 = current_rss()
    t = torch.ones(4 << 20)  # 16 MiB
    del t
    return (current_rss() - r0) >> 20
if sys.argv[1] == "fixed":
    with fixed_mmap_threshold(8 << 20) as on:
        print(on, kept_after_free())
else:
    print(False, kept_after_free())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_fixed_mmap_threshold_gives_large_blocks_back():
    def run(mode):
        out = subprocess.run([sys.executable, "-P", "-c", FIXED, mode], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
        assert out.returncode == 0, out.stderr[-2000:]
        on, kept = out.stdout.split()
        return on == "True", int(kept)

    on, kept_fixed = run("fixed")
    _, kept_default = run("default")
    assert on
    assert kept_default >= 12, kept_default  # the default keeps the 16 MiB block in the heap
    assert kept_fixed <= 2, kept_fixed  # the fixed threshold mmaps it and returns it
