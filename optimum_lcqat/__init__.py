"""optimum-lcqat: 2-bit LC-QAT (linear-constrained vector quantization) for transformers.

Importing the package registers quantization method ``lcqat`` with transformers.
"""

from ._registration import register as _register
from .config import FORMAT_VERSION, LCQATConfig
from .nn import LCLinear, set_int8_activations
from .quantizer import LCQATHfQuantizer

__version__ = "0.1.0"

_register()


def __getattr__(name):
    # Heavier, optional pieces load on first use.
    if name == "LCQATCallback":
        from .training import LCQATCallback

        return LCQATCallback
    raise AttributeError(name)


__all__ = ["LCQATConfig", "LCQATHfQuantizer", "LCLinear", "FORMAT_VERSION", "LCQATCallback", "set_int8_activations", "__version__"]
