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
from ..tensor.hadamard import RotationPlan, rotate
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


def hadamard(x: torch.Tensor, plan: RotationPlan, scale_in: torch.Tensor | None = None,
             scale_out: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
    """``H(x * scale_in) * scale_out`` along the last dimension (``H^T`` with ``transpose``), in
    ``x``'s dtype. Native (the fast Walsh-Hadamard transform in registers: ``log2(block)`` adds a
    value where the reference's matmul takes ``block`` multiply-adds) on float32 and bfloat16
    tensors of the extension's devices, computed in float32; else the reference
    (:func:`~optimum_lcqat.tensor.hadamard.rotate`, a matmul per block). The two round
    differently (float32: ~1e-7 relative). No autograd: the training forward
    (nn/lc_training.py) applies the adjoint itself, which is this same function with
    ``transpose`` flipped and the scales swapped."""
    nat = _native if _native_checked else native_backend()
    if (nat is not None and plan.right > 1 and x.dtype in (torch.float32, torch.bfloat16)
            and nat.device_supported(x.device) and not any(
                s is not None and s.device != x.device for s in (scale_in, scale_out))):
        return nat.hadamard(x, plan, scale_in, scale_out, transpose)
    y = rotate(x if scale_in is None else x * scale_in, plan, transpose=transpose)
    return (y if scale_out is None else y * scale_out).to(x.dtype)


def _native_input_side(x: torch.Tensor, A: torch.Tensor):
    nat = _native if _native_checked else native_backend()
    if nat is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and A.shape == (4, 4):
        return nat
    return None


def input_side(x: torch.Tensor, s_u: torch.Tensor, A: torch.Tensor, beta: torch.Tensor,
               plan: RotationPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The LC layer's input side ``(z, c)`` = the codebook fold of ``H_in(x * s_u)``
    (:func:`reference.input_side`), no autograd: native on CPU (one pass a row, float32 inside,
    ``x``'s dtype out), else the reference. For the training forward (nn/lc_training.py)."""
    nat = _native_input_side(x, A)
    if nat is not None:
        return nat.input_side(x, s_u, A, beta, plan)
    return reference.input_side(x, s_u, A, beta, plan)


def input_side_backward(x: torch.Tensor, g_z: torch.Tensor, g_c: torch.Tensor, s_u: torch.Tensor, A: torch.Tensor,
                        beta: torch.Tensor, plan: RotationPlan, needs: tuple[bool, bool, bool, bool]):
    """``(g_x, g_s_u, g_A, g_beta)`` of :func:`input_side` at ``x`` for the grads ``g_z``, ``g_c``
    of its outputs, None where ``needs`` (four booleans in that order) says no; native on CPU
    (float32 grads), else autograd through the reference."""
    nat = _native_input_side(x, A)
    if nat is not None:
        return nat.input_side_backward(x, g_z, g_c, s_u, A, beta, plan, needs)
    return reference.input_side_backward(x, g_z, g_c, s_u, A, beta, plan, needs)


__all__ = ["lc_linear", "hadamard", "input_side", "input_side_backward", "nearest_codeword", "bind_native", "backend_name", "native_backend", "NATIVE_DTYPES", "reference"]
