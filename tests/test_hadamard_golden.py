"""Golden values: the rotations a checkpoint's layers are built with must never change under a
checkpoint. Format version 2 records each layer's plan (left factor, block); these tests pin the
matrix behind every factor the code can choose (a hash of the +-1 pattern per size) and which
plan it chooses for common dimensions (what version-1 checkpoints, which record no plan, rely on).
Powers of two are pinned up to 4096; larger full-dimension factors are Sylvester's doubling of
those (the same code path), not hashed here to keep the test light.
"""

import hashlib

import pytest
import torch

from optimum_lcqat.tensor.hadamard import _odd_orders, hadamard_matrix, plan_from_record, plan_rotation

POW2 = {
    1: "4bf5122f344554c5", 2: "ae0c359ec39763b6", 4: "14edb060b895542e", 8: "7c99a8eda1a433af",
    16: "4173cdf0377bf83a", 32: "0b71401da96bcee9", 64: "4be469934f00a70b", 128: "6c75072bc838cd31",
    256: "48e8331c828232b2", 512: "6746c1ade12fafc8", 1024: "5a173b88a228b188", 2048: "1b0bbe0b93141d45",
    4096: "1d9ba72dad9df866",
}
PALEY = {
    12: "96c4e95b8f52c8de", 20: "e5d1e5dd287996d7", 24: "63f0dd7a293ef123", 28: "db393c59352ae46b",
    32: "0b71401da96bcee9", 36: "056051ac3be0a775", 44: "f67bcf7e314abc96", 48: "8df912a0de9b1e6a",
    60: "249ae98f22299dea", 68: "8e91c3b174eba93a", 72: "f52aba99c566dfcc", 76: "7640ea823bce33ed",
    80: "0ef24e30397489a1", 84: "fcb0d169a95b85c1", 104: "446ce5d2db2e397f", 108: "1ec1116b816c108c",
    124: "022b6609bf702819", 128: "6c75072bc838cd31", 132: "68f021629a4fca6c", 140: "6f6c84c918ab7eff",
    148: "0138921cba1add8b", 152: "7f17aee2f17dbd53", 164: "254202513c27ad63", 168: "f07c4777890e9429",
    180: "d36aff58f0f65cdd", 192: "45d0a3ef5edd13b4", 196: "e814b1f7d6271d15", 200: "6be7319711921ee6",
    204: "2d8cf389cee0aa3e", 212: "f1d92ee062820560", 220: "0655813451387978", 224: "77a94f091e6473a5",
    228: "d18b6c740119cb34", 240: "2ab54dece3163b35", 252: "5c29a03156c2a811",
}
# dimension -> (plan record at hadamard_block_size=128, plan record at "full")
PLANS = {
    64: ((1, 64), (1, 64)), 96: ((1, 32), (12, 8)), 192: ((1, 64), (12, 16)), 576: ((1, 64), (36, 16)),
    896: ((1, 128), (28, 32)), 960: ((1, 64), (60, 16)), 1536: ((1, 128), (12, 128)),
    2048: ((1, 128), (1, 2048)), 3072: ((1, 128), (12, 256)), 4096: ((1, 128), (1, 4096)),
    4864: ((1, 128), (76, 64)), 8192: ((1, 128), (1, 8192)), 11008: ((1, 128), (1, 256)),
    14336: ((1, 128), (28, 512)), 28672: ((1, 128), (28, 1024)),
}


def sign_pattern_hash(n: int) -> str:
    h = torch.round(hadamard_matrix(n) * n**0.5).to(torch.int8)
    return hashlib.sha256(h.numpy().tobytes()).hexdigest()[:16]


def test_the_left_factors_the_code_can_choose_are_the_pinned_ones():
    assert _odd_orders(256) == sorted(PALEY)


@pytest.mark.parametrize("n", sorted(POW2))
def test_power_of_two_hadamard_is_pinned(n):
    assert sign_pattern_hash(n) == POW2[n]


@pytest.mark.parametrize("n", sorted(PALEY))
def test_paley_hadamard_is_pinned(n):
    assert sign_pattern_hash(n) == PALEY[n]


@pytest.mark.parametrize("n", sorted(PLANS))
def test_plan_choice_is_pinned(n):
    block, full = PLANS[n]
    assert plan_rotation(n, 128).record() == block
    assert plan_rotation(n, "full").record() == full
    for record in (block, full):  # and each record rebuilds the same plan
        assert plan_from_record(n, *record) == plan_rotation(n, 128 if record == block else "full")


def test_bad_records_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="does not describe dimension 96"):
        plan_from_record(96, 1, 64)  # 64 does not divide 96
    with pytest.raises(ValueError, match="does not describe dimension 96"):
        plan_from_record(96, 12, 4)  # 12 x 4 != 96
    with pytest.raises(ValueError, match="no Hadamard construction of order 6"):
        plan_from_record(96, 6, 16)
