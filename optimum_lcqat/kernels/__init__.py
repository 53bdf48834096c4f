"""Kernel dispatch: one entry point per op, backed by the native extension when it is built
and by the pure-PyTorch reference otherwise.

Backends: ``"reference"`` (always there; the oracle) and ``"native"`` (``torch.ops.lcqat``
from ``optimum_lcqat._C``). ``OPTIMUM_LCQAT_BACKEND=reference`` forces the reference.
A fallback from native to reference is logged once.
"""

from __future__ import annotations

import logging
import os

import torch

from . import reference
from .reference import dequantize_rotated

logger = logging.getLogger(__name__)

_native = None
_native_checked = False


def native_backend():
    """The native ops module, or None (logged once) when the extension is not available."""
    global _native, _native_checked
    if not _native_checked:
        _native_checked = True
        if os.environ.get("OPTIMUM_LCQAT_BACKEND", "").lower() == "reference":
            logger.info("optimum-lcqat: OPTIMUM_LCQAT_BACKEND=reference, native kernels disabled.")
            return None
        try:
            from . import native as _mod

            _native = _mod if _mod.available() else None
        except ImportError as exc:  # pragma: no cover - depends on the build
            logger.warning("optimum-lcqat: native kernels unavailable (%s); using the PyTorch reference.", exc)
            _native = None
        if _native is None:
            logger.warning(
                "optimum-lcqat: the C++ extension is not built; LC layers use the pure-PyTorch "
                "reference kernels (correct, slower). Reinstall with a compiler to build it."
            )
    return _native


def backend_name() -> str:
    return "native" if native_backend() is not None else "reference"


def lc_linear(x, packed, A, beta, s_u, s_v, bias, plan_in, plan_out):
    nat = _native if _native_checked else native_backend()
    if nat is not None and nat.supports(x, packed, A, plan_in, plan_out, beta, s_u, s_v, bias):
        return nat.lc_linear(x, packed, A, beta, s_u, s_v, bias, plan_in, plan_out)
    return reference.lc_linear(x, packed, A, beta, s_u, s_v, bias, plan_in, plan_out)


def lc_linear_a8(x, packed, A, beta, s_u, s_v, bias, plan_in, plan_out):
    """:func:`lc_linear` with int8 activations (inference only; native on CPU, else the reference
    emulation, which computes the same rounding)."""
    nat = _native if _native_checked else native_backend()
    params = (beta, s_u, s_v, bias)
    if nat is not None and x.device.type == "cpu" and nat.supports(x, packed, A, plan_in, plan_out, *params):
        return nat.lc_linear_a8(x, packed, A, beta, s_u, s_v, bias, plan_in, plan_out)
    return reference.lc_linear_a8(x, packed, A, beta, s_u, s_v, bias, plan_in, plan_out)


# Activation dtypes the native ops take (others use the reference).
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def native_rotation_args(x, packed, A, plan_in, plan_out):
    """The trailing arguments of ``torch.ops.lcqat.lc_linear`` (block_in, left_in, block_out,
    left_out) for a layer on ``x``'s device, or None when the native op would not take the call
    (no extension, unsupported shape, dtype or device). LCLinear keeps them to skip
    :func:`lc_linear`'s checks on later inference calls."""
    nat = _native if _native_checked else native_backend()
    if nat is None or not nat.supports(x, packed, A, plan_in, plan_out):
        return None
    return nat.rotation_args(plan_in, plan_out, x.device)


__all__ = [
    "lc_linear", "lc_linear_a8", "dequantize_rotated", "backend_name", "native_backend", "native_rotation_args",
    "NATIVE_DTYPES",
]
