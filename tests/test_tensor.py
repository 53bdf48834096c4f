"""Tensor-level pieces: Hadamard rotations, packing, codebook search and fit."""

import pytest
import torch

from optimum_lcqat.tensor.codebook import (
    codewords, fit_affine, index_to_codes, lattice, nearest_codeword, scalar_codebook,
)
from optimum_lcqat.tensor.hadamard import hadamard_matrix, plan_rotation, rotate, rotation_matrix
from optimum_lcqat.tensor.packing import pack_codes, unpack_codes


@pytest.mark.parametrize(
    "n,block,expect",
    [
        (1536, 128, (1, 128, False)),
        (576, 128, (1, 64, True)),  # SmolLM2 hidden size: fallback to the largest dividing block
        (192, 128, (1, 64, True)),
        (576, "full", (36, 16, False)),  # Paley II order 36 times Sylvester 16
        (192, "full", (12, 16, False)),  # Paley I order 12
        (4096, "full", (1, 4096, False)),
        (11008, "full", (1, 256, True)),  # no construction known: documented fallback
        (6, 128, (1, 2, True)),
    ],
)
def test_rotation_plans_are_orthonormal(n, block, expect):
    plan = plan_rotation(n, block)
    assert (plan.left, plan.right, plan.fallback) == expect
    if n <= 4096:
        m = rotation_matrix(plan)
        assert torch.allclose(m @ m.T, torch.eye(n, dtype=m.dtype), atol=1e-9)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(rotate(rotate(x, plan), plan, transpose=True), x, atol=1e-10)


def test_hadamard_matrix_rejects_unknown_order():
    with pytest.raises(ValueError, match="no Hadamard construction"):
        hadamard_matrix(10)


def test_rotate_checks_dimension():
    with pytest.raises(ValueError, match="does not match"):
        rotate(torch.zeros(2, 8), plan_rotation(16, 128))


def test_pack_roundtrip_and_byte_layout():
    codes = torch.randint(0, 4, (7, 32), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 8)
    assert torch.equal(unpack_codes(packed), codes)
    # First code in the low bits: byte == row index of lattice(4)
    q = lattice(4)[packed[0, 0].long()]
    assert torch.equal(q.to(torch.uint8), codes[0, :4])


@pytest.mark.parametrize(
    "bad,err", [(torch.full((2, 4), 4), ValueError), (torch.zeros(2, 6), ValueError), (torch.zeros(8), ValueError)]
)
def test_pack_rejects_bad_input(bad, err):
    with pytest.raises(err):
        pack_codes(bad)


def test_unpack_rejects_wrong_dtype():
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(torch.zeros(2, 2, dtype=torch.int32))


def test_nearest_codeword_matches_brute_force():
    torch.manual_seed(0)
    A = torch.eye(4) * 0.8 + 0.05 * torch.randn(4, 4)
    beta = torch.randn(4) * 0.1 - 1.2
    w = torch.randn(5000, 4)
    idx = nearest_codeword(w, A, beta)
    table = codewords(A, beta)
    brute = torch.cdist(w, table).argmin(1)
    d_idx = (w - table[idx]).norm(dim=1)
    d_brute = (w - table[brute]).norm(dim=1)
    assert torch.allclose(d_idx, d_brute, atol=1e-5)


def test_fit_affine_recovers_exact_map():
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.float64)
    beta = torch.randn(4, dtype=torch.float64)
    idx = torch.randint(0, 256, (2000,))
    q = index_to_codes(idx, 4)
    w = q.double() @ A.T + beta
    A2, b2 = fit_affine(w, q)
    assert torch.allclose(A2, A, atol=1e-6) and torch.allclose(b2, beta, atol=1e-6)


def test_scalar_codebook_is_unit_variance_grid():
    A, beta = scalar_codebook(1)
    levels = lattice(1) @ A.T + beta
    assert torch.allclose(levels.var(unbiased=False), torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(levels.mean(), torch.tensor(0.0), atol=1e-6)
