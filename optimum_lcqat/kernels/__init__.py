"""Kernel dispatch: one entry point per op, backed by the native extension when it is built
and by the pure-PyTorch reference otherwise. :func:`lc_linear` is the dispatcher of the LC layer:
it calls :func:`native.call_lc_linear_op <optimum_lcqat.kernels.native.call_lc_linear_op>` (the
torch op ``lcqat.lc_linear``) or :func:`reference.lc_forward <optimum_lcqat.kernels.reference.lc_forward>`.

Backends: ``"reference"`` (always there; the oracle) and ``"native"`` (``torch.ops.lcqat``
from ``optimum_lcqat._C``). ``OPTIMUM_LCQAT_BACKEND=reference`` forces the reference.
A fallback from native to reference is logged once. The ops take an
:class:`~optimum_lcqat.tensor.lc_weight.LCWeight`; :meth:`LCWeight.apply` is the usual caller.
This package imports no transformers.
"""

from __future__ import annotations

import logging
import os

import torch

from ..tensor import codebook
from . import reference

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
        reason = None
        try:
            from . import native as _mod

            _native = _mod if _mod.available() else None
            reason = _mod.load_error
        except ImportError as exc:  # pragma: no cover - depends on the build
            _native, reason = None, exc
        if _native is None:  # the one log line of the fallback
            logger.warning(
                "optimum-lcqat: the C++ extension optimum_lcqat._C is not available (%s); LC layers use the "
                "pure-PyTorch reference kernels (correct, slower). Reinstall with a compiler to build it.", reason,
            )
    return _native


def backend_name() -> str:
    return "native" if native_backend() is not None else "reference"


def _taken_by_native(w, x, bias, int8_activations: bool):
    nat = _native if _native_checked else native_backend()
    if nat is None or (int8_activations and x.device.type != "cpu"):  # int8 activations: CPU only
        return None
    return nat if nat.supports(w, x, bias) else None


def lc_linear(w, x, bias=None, int8_activations: bool = False):
    """The dispatcher: ``w`` applied to ``x`` (plus ``bias``), native when it takes the call, else the reference.
    ``int8_activations``: the opt-in int8-activation variant (inference only; native on CPU,
    else the reference emulation, which computes the same rounding)."""
    nat = _taken_by_native(w, x, bias, int8_activations)
    if nat is not None:
        return nat.call_lc_linear_op(w, x, bias, int8_activations)
    return reference.lc_forward(w, x, bias, int8_activations=int8_activations)


# Activation dtypes the native ops take (others use the reference).
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bind_native(w, x, bias=None, int8_activations: bool = False):
    """The native op and its trailing rotation arguments for ``w`` on ``x``'s device, or None
    when the native op would not take the call. LCWeight keeps them to skip the checks of
    :func:`lc_linear` on later inference calls (eager decode calls ~200 LC layers a token)."""
    nat = _taken_by_native(w, x, bias, int8_activations)
    if nat is None:
        return None
    return nat.lc_linear_op(int8_activations), nat.rotation_args(w, x.device)


def nearest_codeword(w: torch.Tensor, A: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Index (row of :func:`~optimum_lcqat.tensor.codebook.lattice`) of the codeword ``A q + beta``
    nearest to each row of ``w`` [N, d], searched in float32: the native search on CPU tensors (the
    distances stay in registers; csrc/cpu/codebook_search.cpp), else the reference,
    :func:`optimum_lcqat.tensor.codebook.nearest_codeword`. The two may pick different codewords
    only where two distances tie to float32 rounding."""
    nat = _native if _native_checked else native_backend()
    if nat is None or w.device.type != "cpu":
        return codebook.nearest_codeword(w, A, beta)
    return nat.nearest_codeword(w.to(torch.float32).contiguous(), codebook.codewords(A.float(), beta.float()))


__all__ = ["lc_linear", "nearest_codeword", "bind_native", "backend_name", "native_backend", "NATIVE_DTYPES", "reference"]
