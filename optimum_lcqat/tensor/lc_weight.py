"""`LCWeight`: one packed LC weight, the object every backend computes with.

``W = diag(s_v) H_m^T What H_n diag(s_u)``, ``What[j, d*g : d*g+d] = A q_{j,g} + beta``, 2-bit
codes ``q`` packed four to a byte (:mod:`packing`), rotations ``H`` given by resolved
:class:`~optimum_lcqat.tensor.hadamard.RotationPlan` s. Like torchao's AffineQuantizedTensor it
owns the packing, the layout and the kernels it dispatches to:

* ``apply(x, bias)``: the layer's product, native CPU/CUDA kernels when they take the call, the
  reference (:mod:`optimum_lcqat.kernels.reference`) otherwise; inference calls bind the native
  op once per device and skip the dispatcher's checks afterwards;
* ``dense()`` / ``rotated()``: dense views;
* ``state_dict(prefix)`` / ``from_state_dict(sd, prefix)``: its checkpoint keys
  (``codes, A, beta, s_u, s_v, rotation``), ``expected_layout`` to validate a file's header;
* ``shard(dim, start, stop)``: tensor-parallel slices (``dim=0`` output rows, column-parallel;
  ``dim=1`` input columns, row-parallel, on Hadamard-block boundaries).

The tensors are whatever the owner holds (LCLinear passes its own parameters, so an LCWeight
made from a layer trains with it). This module imports no transformers, and nothing above it:
data-free construction from a dense weight is
:func:`optimum_lcqat.init.data_free.lc_weight_from_dense`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .. import kernels
from .._deprecation import renamed_method
from ..kernels import reference
from .hadamard import RotationPlan, plan_from_record, plan_rotation
from .packing import CODES_PER_BYTE

# Dtype in which A, beta, s_u, s_v are stored in checkpoints.
STORAGE_DTYPE = torch.float16
# Checkpoint keys of one LC weight, after the layer's prefix. ``rotation`` (format version 2) is
# int32 [[left_in, right_in], [left_out, right_out]]: the resolved rotation plans.
PARAM_KEYS = ("A", "beta", "s_u", "s_v")
KEYS = ("codes",) + PARAM_KEYS + ("rotation",)


def storage_bits(out_features: int, in_features: int, vector_dim: int) -> int:
    """Bits an LC weight stores: 2-bit codes plus 16-bit A, beta, s_u, s_v (the 16-byte
    rotation record is layout metadata, like the shape, and not counted)."""
    m, n, d = out_features, in_features, vector_dim
    return 2 * m * n + 16 * (d * d + d + m + n)


def rotation_record(plan_in: RotationPlan, plan_out: RotationPlan, device=None) -> torch.Tensor:
    return torch.tensor([plan_in.record(), plan_out.record()], dtype=torch.int32, device=device)


def plans_from_record(record, in_features: int, out_features: int) -> tuple[RotationPlan, RotationPlan]:
    r = [[int(v) for v in row] for row in (record.tolist() if torch.is_tensor(record) else record)]
    if len(r) != 2 or any(len(row) != 2 for row in r):
        raise ValueError(f"rotation record {r} is not [[left_in, right_in], [left_out, right_out]]")
    return plan_from_record(in_features, *r[0]), plan_from_record(out_features, *r[1])


_grad_enabled = torch._C.is_grad_enabled
_compiling = torch.compiler.is_compiling


def _bound_call(w: "LCWeight", op, rotation: tuple):
    """``call(x, bias)``: the native op (its pybind entry, past OpOverload.__call__) with w's tensors
    and rotation arguments bound."""
    fn, codes, A, beta, s_u, s_v = op._op, w.codes, w.A, w.beta, w.s_u, w.s_v
    block_in, left_in, block_out, left_out = rotation

    def call(x, bias):
        return fn(x, codes, A, beta, s_u, s_v, bias, block_in, left_in, block_out, left_out)

    return call


@dataclass(eq=False)
class LCWeight:
    codes: torch.Tensor  # uint8 [m, n/4]
    A: torch.Tensor  # [d, d]
    beta: torch.Tensor  # [d]
    s_u: torch.Tensor  # [n]
    s_v: torch.Tensor  # [m]
    plan_in: RotationPlan
    plan_out: RotationPlan
    # (device, int8 activations, call(x, bias)) once the native op took an inference call
    _bound: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        m, nb = self.codes.shape
        n, d = nb * CODES_PER_BYTE, self.A.shape[0]
        if self.codes.dtype != torch.uint8:
            raise TypeError(f"LCWeight: codes must be uint8 [out, in/4], got {self.codes.dtype}")
        if self.A.shape != (d, d) or self.beta.shape != (d,) or n % d:
            raise ValueError(f"LCWeight: A {tuple(self.A.shape)} / beta {tuple(self.beta.shape)} do not fit in_features {n}")
        if self.s_u.shape != (n,) or self.s_v.shape != (m,):
            raise ValueError(
                f"LCWeight: s_u {tuple(self.s_u.shape)} / s_v {tuple(self.s_v.shape)} do not fit codes for a {m}x{n} weight"
            )
        if self.plan_in.n != n or self.plan_out.n != m:
            raise ValueError(f"LCWeight: rotation plans ({self.plan_in.n}, {self.plan_out.n}) do not fit a {m}x{n} weight")

    # ------------------------------------------------------------------ shape
    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * CODES_PER_BYTE

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def vector_dim(self) -> int:
        return self.A.shape[0]

    def bits_per_weight(self) -> float:
        m, n = self.shape
        return storage_bits(m, n, self.vector_dim) / (m * n)

    # ------------------------------------------------------------------ compute
    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None, int8_activations: bool = False) -> torch.Tensor:
        """``x @ W^T + bias``, from the packed codes."""
        b = self._bound
        # the bound fast path: an eager decode step calls ~200 LC layers, and these checks plus the
        # prebound call cost ~0.4 us less a call than reading the fields and OpOverload.__call__.
        # Not while torch.compile traces: it traces the op (OpOverload), not its pybind entry.
        if b is not None and b[1] == int8_activations and x.device == b[0] and not _grad_enabled() \
                and x.dtype in kernels.NATIVE_DTYPES and not _compiling():
            return b[2](x, bias)
        if not _grad_enabled() and not _compiling():
            bound = kernels.bind_native(self, x, bias, int8_activations)
            if bound is not None:
                self._bound = (x.device, bool(int8_activations), _bound_call(self, *bound))
        return kernels.lc_linear(self, x, bias, int8_activations=int8_activations)

    def __setattr__(self, name, value):
        # the bound call holds the tensors and rotation arguments: a replaced field unbinds it
        object.__setattr__(self, name, value)
        if name != "_bound":
            object.__setattr__(self, "_bound", None)

    def __getstate__(self):
        # copies (copy, deepcopy, pickle) bind afresh: the bound call would compute with the original's tensors
        return {**self.__dict__, "_bound": None}

    def rotated(self) -> torch.Tensor:
        """The rotated-domain weight ``What`` [m, n]."""
        return reference.rotated_weight(self)

    def dense(self) -> torch.Tensor:
        """The effective dense weight ``W`` [m, n]."""
        return reference.dense_weight(self)

    dequantize = renamed_method("LCWeight.dequantize", "LCWeight.dense")

    # ------------------------------------------------------------------ construction
    def to(self, device=None, dtype=None) -> "LCWeight":
        """Codes moved to ``device``; A, beta, s_u, s_v moved and cast to ``dtype``."""
        fk = {"device": device, "dtype": dtype}
        return replace(self, codes=self.codes.to(device=device), A=self.A.to(**fk), beta=self.beta.to(**fk),
                       s_u=self.s_u.to(**fk), s_v=self.s_v.to(**fk))

    def snapped(self, dtype=None) -> "LCWeight":
        """A, beta, s_u, s_v rounded to their 16-bit storage values (kept in ``dtype``, default
        their own): the weight a saved-and-reloaded checkpoint computes with."""
        def snap(t):
            return t.to(STORAGE_DTYPE).to(dtype or t.dtype)

        return replace(self, A=snap(self.A), beta=snap(self.beta), s_u=snap(self.s_u), s_v=snap(self.s_v))

    # ------------------------------------------------------------------ checkpoint keys
    def rotation_record(self) -> torch.Tensor:
        return rotation_record(self.plan_in, self.plan_out, device=self.codes.device)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The checkpoint tensors of this weight, parameters in their 16-bit storage dtype."""
        out = {f"{prefix}codes": self.codes}
        out.update({f"{prefix}{k}": getattr(self, k).to(STORAGE_DTYPE) for k in PARAM_KEYS})
        out[f"{prefix}rotation"] = self.rotation_record()
        return out

    @classmethod
    def from_state_dict(cls, sd, prefix: str = "", hadamard_block_size: int | str | None = None) -> "LCWeight":
        """Rebuild from checkpoint tensors. Without a ``rotation`` record (format version 1) the
        plans are recomputed from ``hadamard_block_size``, as version-1 code did."""
        codes = sd[f"{prefix}codes"]
        m, n = codes.shape[0], codes.shape[1] * CODES_PER_BYTE
        if f"{prefix}rotation" in sd:
            plan_in, plan_out = plans_from_record(sd[f"{prefix}rotation"], n, m)
        elif hadamard_block_size is not None:
            plan_in, plan_out = plan_rotation(n, hadamard_block_size), plan_rotation(m, hadamard_block_size)
        else:
            raise KeyError(f"{prefix}rotation is missing; pass hadamard_block_size for a format-version-1 checkpoint")
        return cls(codes, *(sd[f"{prefix}{k}"] for k in PARAM_KEYS), plan_in, plan_out)

    @staticmethod
    def expected_layout(out_features: int, in_features: int, vector_dim: int) -> dict[str, tuple[str | None, tuple]]:
        """``{key: (safetensors dtype or None for any float, shape)}`` of one weight's tensors."""
        m, n, d = out_features, in_features, vector_dim
        return {
            "codes": ("U8", (m, n // CODES_PER_BYTE)),
            "A": (None, (d, d)),
            "beta": (None, (d,)),
            "s_u": (None, (n,)),
            "s_v": (None, (m,)),
            "rotation": ("I32", (2, 2)),
        }

    # ------------------------------------------------------------------ tensor parallelism
    def shard(self, dim: int, start: int, stop: int) -> "LCWeight":
        """The part of this weight a tensor-parallel rank holds.

        ``dim=0``: output rows ``start:stop`` (column-parallel layers: each rank computes its
        rows; ``s_v`` and the output rotation are sliced, which needs a block-diagonal output
        rotation split on block boundaries). ``dim=1``: input columns ``start:stop``
        (row-parallel layers: each rank computes a partial sum over its columns, and the sum of
        the ranks' outputs is the layer's output, because the output rotation and ``s_v`` are
        linear; add the bias once, after the reduction). A rotation that cannot be split that way
        raises ValueError naming the fix.
        """
        m, n = self.shape
        if dim == 0:
            plan_out = self.plan_out.slice(start, stop)
            return replace(self, codes=self.codes[start:stop], s_v=self.s_v[start:stop], plan_out=plan_out)
        if dim == 1:
            plan_in = self.plan_in.slice(start, stop)
            step = max(CODES_PER_BYTE, self.vector_dim)
            if start % step or stop % step:
                raise ValueError(
                    f"LCWeight: cannot split {n} input columns at {start}:{stop}: shards must hold whole bytes of "
                    f"codes and whole code vectors (multiples of {step})"
                )
            codes = self.codes[:, start // CODES_PER_BYTE : stop // CODES_PER_BYTE].contiguous()
            return replace(self, codes=codes, s_u=self.s_u[start:stop], plan_in=plan_in)
        raise ValueError(f"LCWeight.shard: dim must be 0 (output rows) or 1 (input columns), got {dim}")

    def split(self, dim: int, parts: int) -> list["LCWeight"]:
        """Equal shards along ``dim`` (see :meth:`shard`)."""
        size = self.shape[dim]
        if parts < 1 or size % parts:
            raise ValueError(f"LCWeight.split: {size} {'rows' if dim == 0 else 'columns'} do not split into {parts} equal parts")
        step = size // parts
        return [self.shard(dim, i * step, (i + 1) * step) for i in range(parts)]
