"""`LCLinear`: a linear layer whose weight is linear-constrained vector quantized.

Weight (out m, in n): ``W = diag(s_v) H_m^T What H_n diag(s_u)`` with
``What[j, d*g : d*g+d] = A q_{j,g} + beta`` and 2-bit codes ``q``.

State:
* ``codes``: uint8 ``[m, n/4]``, the packed codes; the saved truth of the layer.
* ``A`` ``[d, d]``, ``beta`` ``[d]``, ``s_u`` ``[n]``, ``s_v`` ``[m]``, ``bias``: parameters.
* ``latent`` (only while training, see :meth:`enable_training`): real latent codes, stored as
  ``latent = (U - 1.5) / alpha`` with ``alpha = sqrt(m + n) / 2`` so that an optimizer step of
  size ``lr`` moves ``U`` by about ``alpha * lr`` whatever the layer's shape; the codes are
  ``Q = clamp(round(U), 0, 3)`` with the DGE gradient.

Two forwards compute the same function:
* training: ``xt = H_n(x * s_u)``; ``z_g = A^T xt_g``; ``yt = Q z + sum_g <beta, xt_g>``; no
  codebook lookup, differentiable in everything;
* inference: from the packed codes through :mod:`optimum_lcqat.kernels`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from ..tensor.codebook import fold_activations, scalar_codebook
from ..tensor.hadamard import plan_rotation, rotate
from ..tensor.packing import CODES_PER_BYTE, pack_codes, unpack_codes
from .dge import dge_round

try:  # FSDP2 shards parameters as DTensors; absent only from torch builds without distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None

# Dtype in which A, beta, s_u, s_v are stored in checkpoints.
STORAGE_DTYPE = torch.float16


class LCLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        vector_dim: int = 4,
        hadamard_block_size: int | str = 128,
        codebook: str = "affine",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features % vector_dim or in_features % CODES_PER_BYTE:
            raise ValueError(
                f"LCLinear: in_features={in_features} must be a multiple of vector_dim={vector_dim} "
                f"and of {CODES_PER_BYTE} (codes are packed 4 per byte)"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.vector_dim = vector_dim
        self.hadamard_block_size = hadamard_block_size
        self.codebook = codebook
        self.plan_in = plan_rotation(in_features, hadamard_block_size)
        self.plan_out = plan_rotation(out_features, hadamard_block_size)
        fk = {"device": device, "dtype": dtype}
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features // CODES_PER_BYTE, dtype=torch.uint8, device=device)
        )
        A0, b0 = scalar_codebook(vector_dim)
        self.A = nn.Parameter(A0.to(**fk), requires_grad=codebook == "affine")
        self.beta = nn.Parameter(b0.to(**fk), requires_grad=codebook == "affine")
        self.s_u = nn.Parameter(torch.ones(in_features, **fk))
        self.s_v = nn.Parameter(torch.ones(out_features, **fk))
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None
        self.latent: nn.Parameter | None = None
        # (device, rotation arguments) once the native op has taken this layer's inference call
        # on that device: later calls go straight to the op (see forward).
        self._native: tuple | None = None
        # Opt-in int8 activations for inference (see set_int8_activations); not saved.
        self.int8_activations = False
        self.register_state_dict_pre_hook(_sync_before_state_dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, linear_like, packed, A, beta, s_u, s_v, bias, **kw) -> "LCLinear":
        layer = cls(s_u.numel(), s_v.numel(), bias=bias is not None, device=s_u.device, dtype=s_u.dtype, **kw)
        with torch.no_grad():
            layer.codes.copy_(packed)
            layer.A.copy_(A)
            layer.beta.copy_(beta)
            layer.s_u.copy_(s_u)
            layer.s_v.copy_(s_v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @property
    def alpha(self) -> float:
        return math.sqrt(self.in_features + self.out_features) / 2.0

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"d={self.vector_dim}, codebook={self.codebook}, rot_in={self.plan_in.description}, "
            f"rot_out={self.plan_out.description}, training_codes={self.latent is not None}"
        )

    # ------------------------------------------------------------------ storage
    def snap_to_storage(self) -> None:
        """Round A, beta, s_u, s_v to their 16-bit storage values, in place.

        After this the in-memory layer computes exactly what a saved-and-reloaded copy computes.
        """
        with torch.no_grad():
            for p in (self.A, self.beta, self.s_u, self.s_v):
                p.copy_(p.to(STORAGE_DTYPE).to(p.dtype))

    def bits_per_weight(self) -> float:
        m, n, d = self.out_features, self.in_features, self.vector_dim
        bits = 2 * m * n + 16 * (d * d + d + m + n)
        return bits / (m * n)

    # ------------------------------------------------------------------ training mode
    def enable_training(self) -> None:
        """Create the latent codes at the centres of the current codes' bins."""
        if self.latent is not None:
            return
        q = unpack_codes(self.codes).to(self.s_u.dtype)
        self.latent = nn.Parameter((q - 1.5) / self.alpha)

    def disable_training(self) -> None:
        """Pack the latent's codes and drop the latent."""
        if self.latent is None:
            return
        self.sync_codes()
        self.latent = None

    def hard_codes(self) -> torch.Tensor:
        """Current integer codes [m, n] (uint8) from the latent if training, else unpacked.

        Under FSDP2 the latent is a sharded DTensor outside the forward pass: each rank rounds its
        own rows and the codes are gathered, packed 4 to a byte when the latent is sharded by rows
        (FSDP2's default), else as uint8 (a collective: every rank must call this, as the
        callback's step end and the state-dict hook do)."""
        if self.latent is None:
            return unpack_codes(self.codes)
        with torch.no_grad():
            if is_dtensor(self.latent) and row_sharded(self.latent):
                # rows pack independently: pack the local rows, gather a quarter of the bytes
                local = _round_latent(self.latent.to_local(), self.alpha)
                packed = DTensor.from_local(
                    pack_codes(local), self.latent.device_mesh, self.latent.placements, run_check=False,
                    shape=torch.Size(self.codes.shape), stride=self.codes.stride(),
                )
                return unpack_codes(packed.full_tensor())
            return full_tensor(_round_latent(self.latent, self.alpha))

    @torch.no_grad()
    def limit_code_changes(self, max_changes: int) -> int:
        """Let at most ``max_changes`` codes change away from the stored ``codes``: the latents
        furthest past their bin edge keep their new code, the others are put back just inside
        their current bin. Returns how many latents were put back.

        Why: Adam moves every latent by about the same step, and the latents start at their bin
        centres, so the first code changes come as one wave (measured on SmolLM2: 0.34% of all
        codes in one step, loss 3 -> 12). Capping the changes a step turns the wave into a queue,
        deepest crossing first. Deterministic (a threshold, no sort order), so data-parallel
        ranks with equal latents agree."""
        if self.latent is None:
            return 0
        if is_dtensor(self.latent):
            raise NotImplementedError(
                "LCLinear.limit_code_changes (LCQATCallback(max_flip_share=...)) does not support FSDP-sharded "
                "latents yet; use DDP for capped code changes, or no cap."
            )
        old = unpack_codes(self.codes).float()
        u = self.latent.float() * self.alpha + 1.5  # as hard_codes rounds it
        changed = torch.clamp(torch.round(u), 0, 3) != old
        n = int(changed.sum())
        if n <= max_changes:
            return 0
        offset = u - old  # |offset| > 0.5 where changed: how far past the old bin's edge
        if max_changes <= 0:
            keep = torch.zeros_like(changed)
        else:
            threshold = torch.kthvalue(offset.abs()[changed], n - max_changes).values  # keep those strictly deeper
            keep = changed & (offset.abs() > threshold)
        back = changed & ~keep
        inside = old + torch.clamp(offset, -0.49, 0.49)  # just inside the old bin, same side
        self.latent.data[back] = ((inside[back] - 1.5) / self.alpha).to(self.latent.dtype)
        return int(back.sum())

    def sync_codes(self) -> int:
        """Write the latent's current codes into ``codes``; return how many codes changed."""
        if self.latent is None:
            return 0
        q = self.hard_codes()
        packed = pack_codes(q)
        changed = int((unpack_codes(self.codes) != q).sum())
        self.codes.copy_(packed)
        return changed

    # ------------------------------------------------------------------ dense views
    def rotated_weight(self) -> torch.Tensor:
        return kernels.dequantize_rotated(self.codes, self.A, self.beta)

    @torch.no_grad()
    def dequantize_weight(self) -> torch.Tensor:
        """The effective dense weight W [m, n]."""
        if self.latent is not None:
            self.sync_codes()
        what = self.rotated_weight()
        w = rotate(what, self.plan_in, transpose=True)  # What @ H_n
        w = rotate(w.T, self.plan_out, transpose=True).T  # H_m^T @ (.)
        return w * self.s_v[:, None] * self.s_u[None, :]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.latent is not None:
            return self._forward_latent(x)
        nat = self._native
        inference = not torch.is_grad_enabled()
        a8 = self.int8_activations
        if a8 and self.training and not inference and x.requires_grad:
            raise RuntimeError(
                "LCLinear: int8 activations are for inference only (their rounding has no useful "
                "gradient); call optimum_lcqat.set_int8_activations(model, False) before training."
            )
        if nat is not None and inference and x.device == nat[0] and x.dtype in kernels.NATIVE_DTYPES:
            # Inference fast path: eager decode calls ~200 LC layers a token, and the dispatcher's
            # checks (already passed for this layer and device) cost ~3 us a call in Python.
            if not a8:
                return torch.ops.lcqat.lc_linear.default(
                    x, self.codes, self.A, self.beta, self.s_u, self.s_v, self.bias, *nat[1]
                )
            if nat[0].type == "cpu":
                return torch.ops.lcqat.lc_linear_a8.default(
                    x, self.codes, self.A, self.beta, self.s_u, self.s_v, self.bias, *nat[1]
                )
        if inference and (nat is None or nat[0] != x.device) and not torch.compiler.is_compiling():
            args = kernels.native_rotation_args(x, self.codes, self.A, self.plan_in, self.plan_out)
            if args is not None:
                self._native = (x.device, args)
        fn = kernels.lc_linear_a8 if a8 else kernels.lc_linear
        return fn(x, self.codes, self.A, self.beta, self.s_u, self.s_v, self.bias, self.plan_in, self.plan_out)

    def _forward_latent(self, x: torch.Tensor) -> torch.Tensor:
        # float32 like hard_codes, so the codes trained on are the codes saved (a 16-bit latent
        # would round near a bin edge differently)
        q = dge_round(self.latent.float() * self.alpha + 1.5)  # [m, n], integer-valued, DGE gradient
        xt = rotate(x * self.s_u, self.plan_in)
        z, c = fold_activations(xt, self.A, self.beta)  # z_g = A^T xt_g, c = sum_g <beta, xt_g>
        yt = torch.nn.functional.linear(z, q.to(z.dtype)) + c
        y = rotate(yt, self.plan_out, transpose=True) * self.s_v
        return y if self.bias is None else y + self.bias


def _round_latent(latent: torch.Tensor, alpha: float) -> torch.Tensor:
    """The codes a latent rounds to (uint8, 0..3), in float32 whatever the latent's dtype."""
    return torch.clamp(torch.round(latent.float() * alpha + 1.5), 0, 3).to(torch.uint8)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (FSDP2 holds sharded parameters as DTensors)."""
    return DTensor is not None and isinstance(t, DTensor)


def row_sharded(t) -> bool:
    """Whether DTensor ``t`` is split by rows over a 1-D mesh (FSDP2's default placement)."""
    from torch.distributed.tensor import Shard

    return t.device_mesh.ndim == 1 and len(t.placements) == 1 and t.placements[0] == Shard(0)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of an FSDP2-sharded DTensor (an all-gather)."""
    return t.full_tensor() if is_dtensor(t) else t


def _sync_before_state_dict(module: LCLinear, prefix, keep_vars) -> None:
    # Anything that reads the state dict (save_pretrained, Trainer checkpoints) sees the codes
    # the latent currently rounds to.
    if module.latent is not None and not module.latent.is_meta:
        with torch.no_grad():
            module.sync_codes()


def set_int8_activations(model: nn.Module, enabled: bool = True) -> int:
    """Switch the LC layers of ``model`` to int8 activations for inference (or back); returns
    how many layers were switched.

    With it on, each layer rounds its rotated, codebook-folded activations to int8 (one absmax
    scale per token) and multiplies them with the 2-bit codes in integer arithmetic (AVX-512
    VNNI on CPU): faster decoding, at the price of that rounding (held-out perplexity measured
    in benchmarks/decode.py). Off by default; not saved with the model; inference only.
    """
    n = 0
    for mod in model.modules():
        if isinstance(mod, LCLinear):
            mod.int8_activations = bool(enabled)
            n += 1
    if enabled and n:
        nat = kernels.native_backend()
        if nat is None or not nat.cpu_has_vnni():
            _log_once_no_vnni()
    return n


def _log_once_no_vnni() -> None:
    if getattr(_log_once_no_vnni, "done", False):
        return
    _log_once_no_vnni.done = True
    import logging

    logging.getLogger(__name__).warning(
        "optimum-lcqat: int8 activations requested, but this CPU has no AVX-512 VNNI (or the "
        "extension is not built): the same int8 arithmetic runs in scalar code, slower than fp32."
    )
