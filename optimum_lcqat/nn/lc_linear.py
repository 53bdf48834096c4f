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

* ``rotation``: int32 [[left_in, right_in], [left_out, right_out]], the resolved rotation plans
  (saved since format version 2, so a checkpoint means the same whatever code loads it).

The layer's weight is an :class:`~optimum_lcqat.tensor.lc_weight.LCWeight` over these tensors
(:attr:`LCLinear.lc_weight`); both forwards compute the one LC function of
:mod:`optimum_lcqat.kernels.reference`:
* training: with the DGE-rounded latent as the codes (no codebook lookup, differentiable in
  everything);
* inference: ``lc_weight.apply`` from the packed codes (native kernels when they take the call).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from .._deprecation import renamed_method
from ..kernels import reference
from ..tensor.codebook import scalar_codebook
from ..tensor.hadamard import RotationPlan, plan_rotation
from ..tensor.lc_weight import STORAGE_DTYPE, LCWeight, plans_from_record, rotation_record, storage_bits
from ..tensor.dtensor import gathered_codes, is_dtensor
from ..tensor.packing import CODES_PER_BYTE, latent_from_codes, latent_position, pack_codes, round_latent, unpack_codes
from .dge import dge_round
from .lc_training import lc_training_forward

__all__ = ["LCLinear", "STORAGE_DTYPE", "set_int8_activations", "lc_layers"]


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
        plan_in: RotationPlan | None = None,
        plan_out: RotationPlan | None = None,
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
        # a recorded plan (checkpoint) wins over the one the block setting would choose today
        self.plan_in = plan_in or plan_rotation(in_features, hadamard_block_size)
        self.plan_out = plan_out or plan_rotation(out_features, hadamard_block_size)
        if self.plan_in.n != in_features or self.plan_out.n != out_features:
            raise ValueError(f"LCLinear: rotation plans do not fit a {out_features}x{in_features} layer")
        fk = {"device": device, "dtype": dtype}
        self.register_buffer("rotation", rotation_record(self.plan_in, self.plan_out, device=device))
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
        self._lcw: LCWeight | None = None  # see lc_weight
        # Opt-in int8 activations for inference (see set_int8_activations); not saved.
        self.int8_activations = False
        self.register_state_dict_pre_hook(_sync_before_state_dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weight(cls, weight: LCWeight, bias: torch.Tensor | None = None, *, codebook: str = "affine",
                    hadamard_block_size: int | str = 128, device=None, dtype=None) -> "LCLinear":
        """A layer holding ``weight`` (copied; parameters cast to ``dtype``, default s_u's) and
        ``bias``. ``hadamard_block_size`` is recorded for the repr only: the plans are the weight's."""
        dtype = dtype or weight.s_u.dtype
        device = device if device is not None else weight.codes.device
        layer = cls(weight.in_features, weight.out_features, bias=bias is not None, vector_dim=weight.vector_dim,
                    hadamard_block_size=hadamard_block_size, codebook=codebook, device=device, dtype=dtype,
                    plan_in=weight.plan_in, plan_out=weight.plan_out)
        with torch.no_grad():
            layer.codes.copy_(weight.codes)
            for k in ("A", "beta", "s_u", "s_v"):
                getattr(layer, k).copy_(getattr(weight, k))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @property
    def lc_weight(self) -> LCWeight:
        """The layer's packed weight, over the layer's own tensors (kept while they are the same
        objects, so its native binding survives between calls; rebuilt when a move or FSDP
        replaced one)."""
        w = self._lcw
        if (w is None or w.codes is not self.codes or w.A is not self.A or w.beta is not self.beta
                or w.s_u is not self.s_u or w.s_v is not self.s_v):
            w = self._lcw = LCWeight(self.codes, self.A, self.beta, self.s_u, self.s_v, self.plan_in, self.plan_out)
        return w

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() / .to("meta") replace the tensors: drop the cached LCWeight,
        # which would otherwise keep the old ones alive until the next forward (streaming PTQ kept
        # every finished block's codes this way, ~1.6 MB a block at width 768)
        self._lcw = None
        return super()._apply(fn, recurse)

    def check_rotation_record(self) -> None:
        """After loading: the ``rotation`` buffer is a plan this code builds, and the one the
        layer was built with."""
        plans = plans_from_record(self.rotation, self.in_features, self.out_features)
        if plans != (self.plan_in, self.plan_out):
            raise ValueError(
                f"LCLinear: the loaded rotation record {self.rotation.tolist()} differs from the plans the "
                f"layer was built with ({self.plan_in}, {self.plan_out})"
            )

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

    def balance_scales_(self) -> float:
        """Rescale ``s_u`` by ``c`` and ``s_v`` by ``1/c`` so that both have the same RMS, in place;
        returns ``c``. The weight ``diag(s_v) H_m^T C H_n diag(s_u)`` is bilinear in the two, so the
        layer computes the same function (up to float rounding).

        Why: Adam moves every element by about ``lr`` a step, whatever its size. The
        initialisers leave ``s_u`` at +-1 and ``s_v`` at +-row RMS / 0.83 (~0.05 on SmolLM2), so at
        one learning rate ``s_u`` changes ~20x less, relatively, than ``s_v``; the LC-QAT release
        rescales both to equal norm before QAT (its create_qwen3_ckpt_from_quip.py)."""
        with torch.no_grad():
            ru = self.s_u.detach().float().pow(2).mean().sqrt()
            rv = self.s_v.detach().float().pow(2).mean().sqrt()
            if not (ru > 0 and rv > 0):
                return 1.0
            c = float((rv / ru).sqrt())
            self.s_u.mul_(c)
            self.s_v.div_(c)
        return c

    def bits_per_weight(self) -> float:
        return storage_bits(self.out_features, self.in_features, self.vector_dim) / (self.out_features * self.in_features)

    # ------------------------------------------------------------------ training mode
    def enable_training(self) -> None:
        """Create the latent codes at the centres of the current codes' bins."""
        if self.latent is not None:
            return
        q = unpack_codes(self.codes).to(self.s_u.dtype)
        self.latent = nn.Parameter(latent_from_codes(q, self.alpha))

    def disable_training(self) -> None:
        """Pack the latent's codes and drop the latent."""
        if self.latent is None:
            return
        self.sync_codes()
        self.latent = None

    def hard_codes(self) -> torch.Tensor:
        """Current integer codes [m, n] (uint8) from the latent if training, else unpacked.

        Under FSDP2 the latent is a sharded DTensor outside the forward pass; the codes are then
        gathered by :func:`optimum_lcqat.tensor.dtensor.gathered_codes` (a collective: every rank
        must call this, as the callback's step end and the state-dict hook do)."""
        if self.latent is None:
            return unpack_codes(self.codes)
        with torch.no_grad():
            if type(self.latent.data) is not torch.Tensor:  # a DTensor: only FSDP2 training makes one
                return gathered_codes(self.latent, self.alpha, self.codes)
            return round_latent(self.latent, self.alpha)

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
        if type(self.latent.data) is not torch.Tensor:  # FSDP2's DTensor
            raise NotImplementedError(
                "LCLinear.limit_code_changes (LCQATCallback(max_flip_share=...)) does not support FSDP-sharded "
                "latents yet; use DDP for capped code changes, or no cap."
            )
        old = unpack_codes(self.codes).float()
        u = latent_position(self.latent, self.alpha)
        changed = round_latent(self.latent, self.alpha) != old  # as hard_codes rounds it
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
        self.latent.data[back] = latent_from_codes(inside[back], self.alpha).to(self.latent.dtype)
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
        return self.lc_weight.rotated()

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The effective dense weight W [m, n]."""
        if self.latent is not None:
            self.sync_codes()
        return self.lc_weight.dense()

    dequantize_weight = renamed_method("LCLinear.dequantize_weight", "LCLinear.dense_weight")

    # ------------------------------------------------------------------ forward
    def plain_training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward through plain autograd over the reference's matmul rotations: the
        output of :meth:`forward` up to the rounding of its native rotations (bit for bit where
        they are not native, as for float64), keeping ~8 tensors for backward where forward keeps
        2. For DTensors, and the reference the tests and benchmarks/lc_training_fn.py compare the
        Function with."""
        q = dge_round(latent_position(self.latent, self.alpha))  # [m, n], integer-valued, DGE gradient
        return reference.lc_forward(self.lc_weight, x, self.bias, codes=q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.latent is not None
        if not training and self.int8_activations and torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "LCLinear: int8 activations are for inference only (their rounding has no useful "
                "gradient); call optimum_lcqat.set_int8_activations(model, False) before training."
            )
        # The differentiable forward: the codes trained (the latent, DGE-rounded in float32 like
        # hard_codes, so the codes trained on are the codes saved), or fixed while a gradient is
        # wanted (the end-to-end PTQ stage's scales and codebook, adapters or earlier layers
        # training through a frozen layer)
        if training or (torch.is_grad_enabled() and not self.int8_activations and any(
                t is not None and t.requires_grad for t in (x, self.A, self.beta, self.s_u, self.s_v, self.bias))):
            codes, alpha = (self.latent, self.alpha) if training else (self.codes, None)
            if not any(is_dtensor(t) for t in (x, codes, self.A, self.s_u, self.s_v)):
                # one autograd Function that keeps x and yt for backward, not ~8 tensors (issue #32)
                return lc_training_forward(x, codes, self.A, self.beta, self.s_u, self.s_v, self.bias, alpha,
                                           self.plan_in, self.plan_out)
            if training:
                # DTensors in the forward (FSDP2 hands the forward plain unsharded tensors; tensor
                # parallelism would not): plain autograd through the same maths, whose ops DTensor
                # dispatches; the Function's hand-written product and saved-tensor juggling are
                # untested there. (Fixed codes: the dispatcher below, as before.)
                return self.plain_training_forward(x)
        return self.lc_weight.apply(x, self.bias, self.int8_activations)


def _sync_before_state_dict(module: LCLinear, prefix, keep_vars) -> None:
    # Anything that reads the state dict (save_pretrained, Trainer checkpoints) sees the codes
    # the latent currently rounds to.
    if module.latent is not None and not module.latent.is_meta:
        with torch.no_grad():
            module.sync_codes()


def lc_layers(model: nn.Module) -> dict[str, LCLinear]:
    """The model's LC layers by module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LCLinear)}


def lc_prefixes(model: nn.Module) -> set[str]:
    """``"<name>."`` of every LC layer of ``model``: the key prefixes of its LC tensors."""
    return {f"{n}." for n in lc_layers(model)}


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
