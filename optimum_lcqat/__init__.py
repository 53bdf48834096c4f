"""optimum-lcqat: 2-bit LC-QAT (linear-constrained vector quantization) for transformers.

Importing the package makes quantization method ``lcqat`` known to transformers: at once when
transformers' quantizer registry is already imported, else the moment it is (see
_registration.py). The package itself imports neither torch nor transformers at import time, so
``optimum_lcqat.kernels``, ``.tensor`` and ``.nn`` load without transformers; the names below
load on first use. ``optimum_lcqat.quantize(model, config)`` converts any model's linears
(see quant_api.py).
"""

from importlib import import_module

from ._registration import install_hook as _install_hook

__version__ = "0.1.0"

_LAZY = {
    "LCQATConfig": ".config",
    "FORMAT_VERSION": ".config",
    "LCQATHfQuantizer": ".quantizer",
    "quantize": ".quant_api",
    "LCLinear": ".nn",
    "Int8Linear": ".nn",
    "compact_lm_head": ".nn",
    "set_int8_activations": ".nn",
    "LCWeight": ".tensor.lc_weight",
    "LCQATCallback": ".training",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'optimum_lcqat' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


_install_hook()

__all__ = ["quantize", "LCQATConfig", "LCQATHfQuantizer", "LCLinear", "LCWeight", "Int8Linear", "compact_lm_head", "FORMAT_VERSION",
           "LCQATCallback", "set_int8_activations", "__version__"]
