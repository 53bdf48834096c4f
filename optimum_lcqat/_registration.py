"""Registration of method ``lcqat`` with transformers' quantizer registry (idempotent)."""

from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from transformers.quantizers import auto

    from .config import QUANT_METHOD, LCQATConfig
    from .quantizer import LCQATHfQuantizer

    # The registry's decorators refuse a second registration: check first, so that importing
    # this package twice (or after the autoload hook) is harmless.
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LCQATConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantization_config(QUANT_METHOD)(LCQATConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LCQATHfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(LCQATHfQuantizer)
    _done = True
