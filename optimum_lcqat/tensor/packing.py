"""2-bit code packing: four codes in {0..3} per byte along the input dimension.

Byte ``k`` of row ``j`` holds codes ``4k .. 4k+3`` of that row, the first in the two low bits:
``byte = q0 | q1 << 2 | q2 << 4 | q3 << 6``. With ``vector_dim == 4`` a byte is therefore
exactly one vector's codeword index in ``0..255``, which the native kernels use as a table
index.
"""

from __future__ import annotations

import torch

CODES_PER_BYTE = 4
_SHIFTS = (0, 2, 4, 6)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes ``[m, n]`` in 0..3 into uint8 ``[m, n // 4]``."""
    if codes.dim() != 2:
        raise ValueError(f"pack_codes expects a 2-D [out, in] tensor, got shape {tuple(codes.shape)}")
    m, n = codes.shape
    if n % CODES_PER_BYTE:
        raise ValueError(f"pack_codes: input dimension {n} is not a multiple of {CODES_PER_BYTE}")
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 3):
        raise ValueError("pack_codes: codes must lie in 0..3")
    c = c.view(m, n // CODES_PER_BYTE, CODES_PER_BYTE)
    packed = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 ``[m, n // 4]`` into uint8 codes ``[m, n]`` in 0..3."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"packed codes must be 2-D [out, in/4], got shape {tuple(packed.shape)}")
    p = packed.to(torch.int32).unsqueeze(-1)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    codes = (p >> shifts) & 3
    return codes.reshape(packed.shape[0], packed.shape[1] * CODES_PER_BYTE).to(torch.uint8)


# The latent <-> code mapping of a training LC layer (optimum_lcqat.nn.lc_linear.LCLinear): the latent
# stands at U = latent * alpha + 1.5 on the code axis, its code is clamp(round(U), 0, 3), and a code
# q's bin centre is the latent (q - 1.5) / alpha. One statement here, for the layer, the training
# callback's resume and the FSDP gather.
def latent_position(latent: torch.Tensor, alpha: float) -> torch.Tensor:
    """``U``: where a latent stands on the code axis (codes 0..3 at 0..3), in float32 whatever
    the latent's dtype."""
    return latent.float() * alpha + 1.5


def latent_from_codes(codes: torch.Tensor, alpha: float) -> torch.Tensor:
    """The latent at ``U = codes`` (the centres of the codes' bins), in the codes' float dtype."""
    return (codes - 1.5) / alpha


def round_latent(latent: torch.Tensor, alpha: float) -> torch.Tensor:
    """The codes a training latent rounds to (uint8, 0..3), in float32 whatever the latent's dtype."""
    return torch.clamp(torch.round(latent_position(latent, alpha)), 0, 3).to(torch.uint8)
