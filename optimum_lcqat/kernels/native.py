"""The native backend: ops registered by the ``optimum_lcqat._C`` extension under ``torch.ops.lcqat``.

Ops (schemas in csrc/lcqat_ops.cpp; CPU kernels in csrc/cpu, CUDA kernels in csrc/cuda):

* ``lcqat.hadamard(x, block, left=None, scale_in=None, scale_out=None, transpose=False)``:
  ``H(x * scale_in) * scale_out`` along the last dimension, ``H = left (x) H_block``.
* ``lcqat.lc_matmul(xt, packed, A, beta)``: the rotated-domain product ``xt @ What^T`` from the
  packed 2-bit codes and the affine codebook (decode GEMV for at most 8 rows, tiled GEMM above).
* ``lcqat.lc_linear(x, packed, A, beta, s_u, s_v, bias, block_in, left_in, block_out, left_out)``:
  the whole LC layer in one call. :func:`lc_linear_op` names it (or its int8 variant below),
  :func:`call_lc_linear_op` calls it with an :class:`~optimum_lcqat.tensor.lc_weight.LCWeight`'s fields.
* ``lcqat.lc_linear_a8(...)``: the same with int8 activations (opt-in, CPU only): the rotated,
  codebook-folded activations are rounded per row to int8 and the products with the 2-bit codes
  run on AVX-512 VNNI (``vpdpbusd``). Its oracle is :func:`reference.lc_forward` with ``int8_activations=True``.
* ``lcqat.int8_linear(x, weight, scale, bias=None)``: weight-only int8 linear (per-row scale),
  used by the int8 lm_head :class:`optimum_lcqat.nn.int8_linear.Int8Linear` (CPU only).
* ``lcqat.cpu_isa()``: the CPU kernel variant in use (``avx512``, ``avx2`` or ``scalar``);
  ``lcqat.cpu_has_bf16_dot()``: whether bf16 activations multiply in bf16 (AVX512_BF16, any number of rows).

Each tensor op has a fake implementation here (``torch.library.register_fake``) so that
torch.compile traces through them with ``fullgraph=True``. The ops are inference-only (no
autograd formula): :func:`supports` declines whenever gradients would be needed, and the
dispatcher then uses the reference, which is differentiable.
"""

from __future__ import annotations

import logging
import os

import torch

from ..tensor.hadamard import RotationPlan, hadamard_matrix

logger = logging.getLogger(__name__)

_loaded: bool | None = None
_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


load_error: ImportError | None = None  # why optimum_lcqat._C did not load (the dispatcher logs it, once)


def available() -> bool:
    """Whether ``optimum_lcqat._C`` is built and loads (the reason it does not: :data:`load_error`;
    the one warning about it is the dispatcher's, :func:`optimum_lcqat.kernels.native_backend`)."""
    global _loaded, load_error
    if _loaded is None:
        try:
            from .. import _C  # noqa: F401  (loading the library registers torch.ops.lcqat)

            _loaded = True
            _register_fakes()
        except ImportError as exc:
            load_error = exc
            _loaded = False
    return _loaded


def cuda_built() -> bool:
    """Whether the extension has CUDA kernels (it was built as a CUDAExtension)."""
    if not available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("lcqat::lc_linear", "CUDA")


def _register_fakes() -> None:
    if getattr(_register_fakes, "done", False):
        return
    _register_fakes.done = True

    @torch.library.register_fake("lcqat::hadamard")
    def _hadamard_fake(x, block, left=None, scale_in=None, scale_out=None, transpose=False):
        torch._check(x.dtype in _ACT_DTYPES, lambda: f"lcqat.hadamard: unsupported dtype {x.dtype}")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lcqat::lc_matmul")
    def _lc_matmul_fake(xt, packed, A, beta):
        torch._check(packed.dim() == 2 and packed.dtype == torch.uint8, lambda: "lcqat.lc_matmul: bad packed codes")
        torch._check(packed.shape[1] * 4 == xt.shape[-1], lambda: "lcqat.lc_matmul: shape mismatch")
        return xt.new_empty((*xt.shape[:-1], packed.shape[0]))

    @torch.library.register_fake("lcqat::int8_linear")
    def _int8_linear_fake(x, weight, scale, bias=None):
        torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1], lambda: "lcqat.int8_linear: shape mismatch")
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("lcqat::lc_linear_a8")
    def _lc_linear_a8_fake(x, packed, A, beta, s_u, s_v, bias, block_in, left_in, block_out, left_out):
        torch._check(packed.dim() == 2 and packed.dtype == torch.uint8, lambda: "lcqat.lc_linear_a8: bad packed codes")
        torch._check(packed.shape[1] * 4 == x.shape[-1], lambda: "lcqat.lc_linear_a8: shape mismatch")
        return x.new_empty((*x.shape[:-1], packed.shape[0]))

    @torch.library.register_fake("lcqat::nearest_codeword")
    def _nearest_codeword_fake(w, table):
        torch._check(w.dim() == 2 and table.dim() == 2 and w.shape[1] == table.shape[1],
                     lambda: "lcqat.nearest_codeword: w [N, d] and table [K, d] expected")
        return w.new_empty((w.shape[0],), dtype=torch.long)

    @torch.library.register_fake("lcqat::lc_input_side")
    def _lc_input_side_fake(x, block, left, s_u, A, beta):
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((*x.shape[:-1], 1))

    @torch.library.register_fake("lcqat::lc_input_side_backward")
    def _lc_input_side_backward_fake(x, g_z, g_c, block, left, s_u, A, beta, need_x, need_s_u, need_A, need_beta):
        f32, n = torch.float32, x.shape[-1]
        return (x.new_empty(x.shape if need_x else (0,), dtype=f32), x.new_empty((n if need_s_u else 0,), dtype=f32),
                x.new_empty((4, 4) if need_A else (0,), dtype=f32), x.new_empty((4 if need_beta else 0,), dtype=f32))

    @torch.library.register_fake("lcqat::lc_linear")
    def _lc_linear_fake(x, packed, A, beta, s_u, s_v, bias, block_in, left_in, block_out, left_out):
        torch._check(packed.dim() == 2 and packed.dtype == torch.uint8, lambda: "lcqat.lc_linear: bad packed codes")
        torch._check(packed.shape[1] * 4 == x.shape[-1], lambda: "lcqat.lc_linear: shape mismatch")
        return x.new_empty((*x.shape[:-1], packed.shape[0]))


# Left Kronecker factors (Paley orders) as float32 tensors, per (K, device).
_LEFT: dict = {}


def left_factor(plan: RotationPlan, device) -> torch.Tensor | None:
    if plan.left == 1:
        return None
    key = (plan.left, device)  # torch.device hashes by value; no str() per call (decode calls this ~400x a token)
    t = _LEFT.get(key)
    if t is None:
        t = hadamard_matrix(plan.left).to(device=device, dtype=torch.float32).contiguous()
        _LEFT[key] = t
    return t


def device_supported(device: torch.device) -> bool:
    """Whether the native ops run on ``device`` (CPU; CUDA where built and enabled)."""
    return device.type == "cpu" or _device_ok(device)


def _device_ok(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    return device.type == "cuda" and cuda_kernels_enabled()


# No CUDA kernel of this package has run on a GPU yet: until the CUDA tests pass on one and their
# result file is committed (benchmarks/results/gpu_*.json, written by scripts/gpu_check.sh), CUDA
# tensors take the reference path (torch ops on the GPU) unless the user opts in.
CUDA_KERNELS_VALIDATED = False
CUDA_OPT_IN_ENV = "OPTIMUM_LCQAT_CUDA_KERNELS"
_cuda_decision: bool | None = None


def cuda_kernels_enabled() -> bool:
    """Whether CUDA tensors run this package's CUDA kernels (built, and validated or opted in);
    the first call that says no on a CUDA build logs why, once."""
    global _cuda_decision
    if _cuda_decision is None:
        opted_in = os.environ.get(CUDA_OPT_IN_ENV, "") == "1"
        _cuda_decision = cuda_built() and (CUDA_KERNELS_VALIDATED or opted_in)
        if cuda_built() and not _cuda_decision:
            logger.warning(
                "optimum-lcqat: the CUDA kernels have not been validated on a GPU yet; CUDA tensors use "
                "the PyTorch reference path (correct, slower). Set %s=1 to use the CUDA kernels.",
                CUDA_OPT_IN_ENV,
            )
    return _cuda_decision


def supports(w, x, bias=None) -> bool:
    """True when the native op computes ``w.apply(x, bias)`` (else the dispatcher uses the
    reference).

    Requirements: vector_dim 4 (A is 4x4), uint8 codes ``[m, n/4]``, fp32/bf16/fp16
    activations, a device the extension was built (and enabled) for, and no gradient needed
    (the ops are inference-only). Cheapest tests first.
    """
    if not (_loaded or available()):
        return False
    packed, A = w.codes, w.A
    if x.dtype not in _ACT_DTYPES or packed.dtype != torch.uint8 or packed.dim() != 2 or A.shape != (4, 4):
        return False
    if packed.shape[1] * 4 != x.shape[-1] or w.plan_in.n != x.shape[-1] or w.plan_out.n != packed.shape[0]:
        return False
    dev = x.device
    if packed.device != dev or not (dev.type == "cpu" or _device_ok(dev)):
        return False
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, A, w.beta, w.s_u, w.s_v, bias)
    ):
        return False
    return True


def rotation_args(w, device) -> tuple:
    """The trailing arguments of the lc_linear ops: (block_in, left_in, block_out, left_out)."""
    return (w.plan_in.right, left_factor(w.plan_in, device), w.plan_out.right, left_factor(w.plan_out, device))


def lc_linear_op(int8_activations: bool = False):
    """The op of the whole LC layer: ``torch.ops.lcqat.lc_linear`` (``lc_linear_a8`` with int8 activations)."""
    return torch.ops.lcqat.lc_linear_a8.default if int8_activations else torch.ops.lcqat.lc_linear.default


def call_lc_linear_op(w, x, bias=None, int8_activations: bool = False):
    """:func:`lc_linear_op` on ``w``'s fields: ``w`` applied to ``x``, unchecked (the dispatcher,
    :func:`optimum_lcqat.kernels.lc_linear`, asks :func:`supports` first)."""
    return lc_linear_op(int8_activations)(x, w.codes, w.A, w.beta, w.s_u, w.s_v, bias, *rotation_args(w, x.device))


def cpu_has_vnni() -> bool:
    """Whether the int8-activation GEMV runs on AVX-512 VNNI here (else scalar code, same results)."""
    return bool(torch.ops.lcqat.cpu_has_vnni()) if available() else False


def cpu_has_bf16_dot() -> bool:
    """Whether bf16 activations multiply in bf16 (fp32 accumulation) in the CPU GEMM, and in the
    GEMV where :func:`cpu_has_int8_a16` is false: AVX512_BF16 present, AVX-512 kernels in use,
    OPTIMUM_LCQAT_CPU_BF16 not "0". fp32 activations never do."""
    return bool(torch.ops.lcqat.cpu_has_bf16_dot()) if available() else False


def cpu_has_amx_bf16() -> bool:
    """Whether bf16 activations of 3 rows and more (fp32: 2, as three bf16 parts) multiply on AMX tiles (Intel AMX-BF16, the OS granting
    the tile state, :func:`cpu_has_bf16_dot`, OPTIMUM_LCQAT_CPU_AMX not "0"; csrc/cpu/amx.cpp): the
    same rounding as the AVX512_BF16 GEMM, for layers whose input dimension is a multiple of 32."""
    return bool(torch.ops.lcqat.cpu_has_amx_bf16()) if available() else False


def cpu_has_amx_int8() -> bool:
    """Whether ``int8_linear``'s 16-bit path (:func:`cpu_has_int8_a16`) sums on AMX tiles from 2 rows
    (Intel AMX-INT8, OPTIMUM_LCQAT_CPU_AMX not "0"; csrc/cpu/amx.cpp): the same integers, the same outputs."""
    return bool(torch.ops.lcqat.cpu_has_amx_int8()) if available() else False


def cpu_has_int8_a16() -> bool:
    """Whether ``int8_linear`` and the LC decode GEMV compute bf16 activations as 16-bit fixed point with exact
    integer sums (AVX-512 VNNI; neither OPTIMUM_LCQAT_CPU_BF16 nor OPTIMUM_LCQAT_CPU_A16 is "0"); see csrc/cpu/kernels.h."""
    return bool(torch.ops.lcqat.cpu_has_int8_a16()) if available() else False


def hadamard(x, plan: RotationPlan, scale_in=None, scale_out=None, transpose: bool = False):
    """``H(x * scale_in) * scale_out`` (``H^T`` with ``transpose``) for a rotation plan."""
    return torch.ops.lcqat.hadamard(x, plan.right, left_factor(plan, x.device), scale_in, scale_out, transpose)


def input_side(x, s_u, A, beta, plan: RotationPlan):
    """``(z, c)`` of the LC layer's input side, ``fold(H_in(x * s_u))`` (csrc/cpu/training_stages.cpp)."""
    return torch.ops.lcqat.lc_input_side(x, plan.right, left_factor(plan, x.device), s_u, A, beta)


def input_side_backward(x, g_z, g_c, s_u, A, beta, plan: RotationPlan, needs):
    """``(g_x, g_s_u, g_A, g_beta)`` of :func:`input_side` (float32; None where ``needs``, four
    booleans in that order, says no)."""
    out = torch.ops.lcqat.lc_input_side_backward(x, g_z, g_c, plan.right, left_factor(plan, x.device), s_u, A, beta,
                                                 *needs)
    return tuple(g if need else None for g, need in zip(out, needs))


def lc_matmul(xt, packed, A, beta):
    return torch.ops.lcqat.lc_matmul(xt, packed, A, beta)


def nearest_codeword(w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the row of ``table`` [K, d] nearest to each row of ``w`` [N, d] (float32, CPU)."""
    return torch.ops.lcqat.nearest_codeword(w, table)


def cpu_isa() -> str:
    return torch.ops.lcqat.cpu_isa() if available() else "none"
