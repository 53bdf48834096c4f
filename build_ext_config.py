"""Build description of the native extension ``optimum_lcqat._C`` (csrc/), used by setup.py.

``extensions()`` returns ``(ext_modules, cmdclass)``:

* CPU-only torch: a ``CppExtension`` with the C++ ops (csrc/lcqat_ops.cpp) and the CPU kernels
  (csrc/cpu/kernels.cpp: AVX-512 / AVX2 / scalar variants chosen at run time), OpenMP on.
* torch with CUDA and nvcc present (CUDA_HOME): a ``CUDAExtension`` that adds the CUDA kernels
  (csrc/cuda/*.cu) and registers them for the CUDA dispatch key.
* No usable torch or no C++ compiler: ``([], {})`` with a printed reason, so the package still
  installs and runs the pure-PyTorch reference kernels (the runtime says so once).

``OPTIMUM_LCQAT_NO_CUDA=1`` forces the CPU-only extension even where CUDA could be built.
"""

from __future__ import annotations

import glob
import os
import shutil
import sysconfig

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _have_cxx() -> str | None:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    exe = cxx.split()[0]
    return shutil.which(exe)


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing or broken
        print(f"optimum-lcqat: not building the native extension (torch unavailable: {exc})")
        return [], {}
    if _have_cxx() is None:
        print("optimum-lcqat: not building the native extension (no C++ compiler found)")
        return [], {}

    cpp_sources = _rel([os.path.join(ROOT, "csrc", "lcqat_ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
    link_flags = ["-fopenmp"]
    use_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cu_sources)
        and not os.environ.get("OPTIMUM_LCQAT_NO_CUDA")
    )
    if use_cuda:
        ext = CUDAExtension(
            "optimum_lcqat._C",
            cpp_sources + cu_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DLCQAT_WITH_CUDA"], "nvcc": ["-O3", "-DLCQAT_WITH_CUDA"]},
            extra_link_args=link_flags,
        )
        print(f"optimum-lcqat: building optimum_lcqat._C with CUDA ({CUDA_HOME})")
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "no nvcc / CUDA_HOME or disabled"
        ext = CppExtension("optimum_lcqat._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
        print(f"optimum-lcqat: building optimum_lcqat._C for CPU ({why})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}
