"""The CPU kernel tests once more under every ISA tier this CPU can run, each forced in turn.

The CPU kernels pick their path at run time from what the CPU has (AMX, AVX512_BF16, VNNI, AVX-512,
AVX2, scalar). A test run sees only the top tier of the machine it runs on, so a path the CI machine
does not pick went untested: on an AMD EPYC (no AMX) the fp32 GEMM's accuracy had never been held to
the bound the AMX path met. Here tests/test_kernels.py runs in a child pytest for each lower tier,
forced through the kernels' own switches (OPTIMUM_LCQAT_CPU_ISA, OPTIMUM_LCQAT_CPU_BF16, OPTIMUM_LCQAT_CPU_A16,
OPTIMUM_LCQAT_CPU_AMX); a tier this CPU cannot run is skipped with the reason, so `pytest -rs` lists it.
The top tier is the main run itself.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from helpers import run_process_group
from optimum_lcqat.kernels import native

ROOT = Path(__file__).resolve().parents[1]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


FLAGS = _cpu_flags()
HAS_AVX512 = "avx512f" in FLAGS
HAS_BF16 = HAS_AVX512 and "avx512_bf16" in FLAGS
HAS_VNNI = HAS_AVX512 and "avx512_vnni" in FLAGS
HAS_AMX = HAS_BF16 and "amx_bf16" in FLAGS  # the OS granting the tile state is checked by the kernels

# tier: (switches, whether this CPU can run it, why not, what the kernels must report under it).
# The report is read back in the child: a switch that stopped working fails here, not silently.
TIERS = {
    "avx512-no-amx": ({"OPTIMUM_LCQAT_CPU_AMX": "0"}, HAS_AMX, "no AMX on this CPU (the main run is this tier)",
                      {"isa": "avx512", "amx_bf16": False, "amx_int8": False, "bf16_dot": True}),
    "avx512-bf16-no-a16": ({"OPTIMUM_LCQAT_CPU_A16": "0"}, HAS_VNNI, "no AVX-512 VNNI on this CPU",
                           {"isa": "avx512", "int8_a16": False}),
    "avx512-no-bf16-no-vnni16": ({"OPTIMUM_LCQAT_CPU_BF16": "0"}, HAS_BF16 or HAS_VNNI,
                                 "neither AVX512_BF16 nor VNNI on this CPU",
                                 {"isa": "avx512", "bf16_dot": False, "int8_a16": False, "amx_bf16": False}),
    "avx2": ({"OPTIMUM_LCQAT_CPU_ISA": "avx2"}, HAS_AVX512, "no AVX-512 on this CPU (AVX2 is its top tier or absent)",
             {"isa": "avx2", "bf16_dot": False, "int8_a16": False, "vnni": False, "amx_bf16": False}),
    "scalar": ({"OPTIMUM_LCQAT_CPU_ISA": "scalar"}, native.available() and native.cpu_isa() != "scalar",
               "the main run already is the scalar tier",
               {"isa": "scalar", "bf16_dot": False, "int8_a16": False, "vnni": False, "amx_bf16": False}),
}

REPORT = """
import json
from optimum_lcqat.kernels import native
print(json.dumps({"isa": native.cpu_isa(), "bf16_dot": native.cpu_has_bf16_dot(), "int8_a16": native.cpu_has_int8_a16(),
                  "vnni": native.cpu_has_vnni(), "amx_bf16": native.cpu_has_amx_bf16(),
                  "amx_int8": native.cpu_has_amx_int8()}))
"""

# Not rerun per tier: CUDA builds, the build description, the tests that set the switches themselves, and
# those that do not reach a kernel's arithmetic (argument checks, dispatch, schema, fake kernels, binding).
DESELECT = ("not cuda and not nvcc and not build_config and not other_isa_variants and not switch and not fast_path "
            "and not compile and not opcheck and not clear_errors and not dispatch and not set_int8")


@pytest.mark.skipif(not native.available(), reason="the native extension is not built")
@pytest.mark.parametrize("tier", list(TIERS))
def test_kernel_tests_pass_under_forced_isa_tier(tier):
    switches, runnable, why_not, expect = TIERS[tier]
    if not runnable:
        pytest.skip(f"ISA tier {tier} not run: {why_not}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIMUM_LCQAT_CPU_", "LCQAT_CPU_"))}
    env.update(switches)
    report = run_process_group([sys.executable, "-P", "-c", REPORT], timeout=120, env=env, cwd="/")
    assert report.returncode == 0, report.stderr[-3000:]
    seen = json.loads(report.stdout.strip().splitlines()[-1])
    assert {k: seen[k] for k in expect} == expect, f"{switches} did not force tier {tier}: the kernels report {seen}"
    proc = run_process_group([sys.executable, "-P", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
                              str(ROOT / "tests" / "test_kernels.py"), "-k", DESELECT], timeout=600, env=env,
                             cwd=ROOT)
    tail = (proc.stdout[-4000:] + proc.stderr[-2000:])
    assert proc.returncode == 0, f"tier {tier} ({switches}): kernel tests failed\n{tail}"
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 100, f"tier {tier}: too few kernel tests ran\n{tail}"
