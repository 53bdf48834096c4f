"""LCLinear: training forward == packed inference forward, DGE gradient, dense view, bit budget."""

import math

import pytest
import torch

from optimum_lcqat.init.data_free import lc_weight_from_dense
from optimum_lcqat.nn import LCLinear, dge_round
from optimum_lcqat.tensor.lc_weight import LCWeight
from optimum_lcqat.tensor.packing import unpack_codes


def make_layer(n, m, block=128, codebook="affine", d=4, bias=True, seed=0):
    """A data-free LC layer and the dense Gaussian weight ``w`` it quantizes."""
    torch.manual_seed(seed)
    w = torch.randn(m, n) * 0.05
    lcw = lc_weight_from_dense(w, vector_dim=d, hadamard_block_size=block, codebook=codebook, seed=seed, name="t")
    layer = LCLinear.from_weight(lcw, torch.randn(m) if bias else None, codebook=codebook,
                                 hadamard_block_size=block, dtype=torch.float32)
    return layer, w


def rel(a, b):
    return float((a - b).norm() / b.norm())


SHAPES = [
    (256, 128, 128, 4), (576, 192, 128, 4), (96, 40, 128, 4), (192, 576, "full", 4), (64, 32, 16, 2), (32, 24, 8, 1),
]


@pytest.mark.parametrize("n,m,block,d", SHAPES)
def test_training_and_inference_forward_agree(n, m, block, d):
    layer, _ = make_layer(n, m, block=block, d=d)
    x = torch.randn(2, 5, n)
    y_inf = layer(x)
    layer.enable_training()
    y_train = layer(x)
    assert rel(y_train, y_inf) < 1e-5
    # and both equal the dense effective weight
    y_dense = x @ layer.dense_weight().T + layer.bias
    assert rel(y_dense, y_inf) < 1e-5


@pytest.mark.parametrize("codebook", ["affine", "scalar"])
@pytest.mark.parametrize("n,m,block,d", SHAPES)
def test_dense_weight_is_reconstructed_within_the_2bit_error(n, m, block, d, codebook):
    # w is i.i.d. Gaussian: the best 2-bit scalar quantizer (Lloyd-Max) leaves a relative
    # Frobenius error of sqrt(0.1175) = 0.343. Measured on these shapes (seeds 0-4): d = 4 and
    # d = 2: 0.340-0.356 (affine 0.340-0.348, scalar 0.346-0.356); d = 1 (768 weights, noisier):
    # 0.328-0.373. Outputs on Gaussian inputs: 0.33-0.36. A wrong rotation, sign or code order
    # gives ~1.0 or more.
    layer, w = make_layer(n, m, block=block, d=d, codebook=codebook)
    err = rel(layer.dense_weight(), w)
    assert err < (0.37 if d > 1 else 0.40), err
    # the layer's output is that of the dense weight, within the same error
    x = torch.randn(64, n)
    with torch.no_grad():
        y = layer(x) - layer.bias
    err_y = rel(y, x @ w.T)
    assert err_y < (0.40 if d > 1 else 0.45), err_y


def test_latent_starts_at_bin_centres_and_roundtrips_codes():
    layer, _ = make_layer(128, 64)
    codes = unpack_codes(layer.codes).clone()
    layer.enable_training()
    u = layer.latent * layer.alpha + 1.5
    assert torch.allclose(u, codes.float(), atol=1e-5)
    assert layer.sync_codes() == 0
    with torch.no_grad():
        layer.latent[0, 0] = (codes[0, 0].float() + (1.0 if codes[0, 0] < 3 else -1.0) - 1.5) / layer.alpha
    assert layer.sync_codes() == 1
    layer.disable_training()
    assert layer.latent is None


def test_limit_code_changes_keeps_the_deepest_crossings_and_holds_the_rest_in_their_bins():
    layer, _ = make_layer(128, 64)
    codes = unpack_codes(layer.codes).clone().float()
    layer.enable_training()
    g = torch.Generator().manual_seed(0)
    # push 40 latents past their bin edge by distinct depths (towards the inside of 0..3)
    idx = torch.randperm(codes.numel(), generator=g)[:40]
    depth = 0.55 + 0.01 * torch.arange(40, dtype=torch.float32)
    direction = torch.where(codes.view(-1)[idx] < 2, 1.0, -1.0)
    u = codes.clone().view(-1)
    u[idx] += direction * depth
    with torch.no_grad():
        layer.latent.copy_(((u - 1.5) / layer.alpha).view_as(codes))
        # and move 100 others inside their bins: they must not be touched
        inner = torch.randperm(codes.numel(), generator=g)
        inner = inner[~torch.isin(inner, idx)][:100]
        layer.latent.view(-1)[inner] += 0.3 / layer.alpha
    before = layer.latent.detach().clone()
    assert layer.limit_code_changes(100) == 0  # under the cap: nothing changes
    assert torch.equal(layer.latent, before)
    assert layer.limit_code_changes(10) == 30
    new_u = (layer.latent.detach() * layer.alpha + 1.5).view(-1)
    kept = idx[-10:]  # the ten deepest
    assert torch.allclose(new_u[kept], u[kept], atol=1e-5)
    held = idx[:-10]
    assert torch.all((new_u[held] - codes.view(-1)[held]).abs() < 0.5)
    assert torch.all(torch.sign(new_u[held] - codes.view(-1)[held]) == direction[:-10])  # same side
    untouched = torch.ones(codes.numel(), dtype=torch.bool)
    untouched[held] = False
    assert torch.equal(layer.latent.detach().view(-1)[untouched], before.view(-1)[untouched])
    assert layer.sync_codes() == 10
    assert layer.limit_code_changes(0) == 0  # the kept ones are the stored codes now
    # a cap of 0 freezes the codes: every crossing is held back
    with torch.no_grad():
        layer.latent.view(-1)[held[:3]] += direction[:3] * 0.3 / layer.alpha
    assert layer.limit_code_changes(0) == 3 and layer.sync_codes() == 0


def test_gradients_reach_every_trainable_part():
    layer, _ = make_layer(128, 64)
    layer.enable_training()
    x = torch.randn(4, 128)
    layer(x).pow(2).sum().backward()
    for name in ("latent", "A", "beta", "s_u", "s_v", "bias"):
        g = getattr(layer, name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_scalar_codebook_is_frozen():
    layer, _ = make_layer(64, 32, codebook="scalar")
    assert not layer.A.requires_grad and not layer.beta.requires_grad


def test_dge_derivative_follows_the_formula():
    u = torch.tensor([0.1, 0.45, 0.5, 0.9, 1.0, 2.3, 3.7], requires_grad=True)
    q = dge_round(u)
    assert torch.equal(q, torch.clamp(torch.round(u.detach()), 0, 3))
    q.sum().backward()
    r = u.detach() - torch.floor(u.detach())
    k, c = 5.0, 3.0
    expect = torch.clamp((2 * r - 1).abs().clamp_min(1e-12).pow(1 / k - 1) / k, max=c)
    assert torch.allclose(u.grad, expect)
    assert u.grad[2] == pytest.approx(3.0)  # capped at the bin edge
    assert u.grad[4] == pytest.approx(0.2)  # 1/k at the bin centre


def test_bits_per_weight_bound():
    for n, m in [(576, 576), (576, 1536), (1536, 576), (576, 192)]:
        layer = LCLinear(n, m, bias=False)
        assert layer.bits_per_weight() <= 2 + 16 * (m + n) / (m * n) + 0.01


def test_rejects_input_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiple"):
        LCLinear(30, 8)


def test_snap_to_storage_is_idempotent_and_fp16_exact():
    layer, _ = make_layer(128, 64)
    layer.snap_to_storage()
    for p in (layer.A, layer.beta, layer.s_u, layer.s_v):
        assert torch.equal(p.data, p.data.half().float())


def test_balance_scales_keeps_the_function_and_equalises_rms():
    layer, _ = make_layer(256, 128)
    x = torch.randn(3, 256)
    y = layer(x)
    ru, rv = (float(p.detach().pow(2).mean().sqrt()) for p in (layer.s_u, layer.s_v))
    assert ru / rv > 5  # the initialisers leave s_u ~1 and s_v ~ row RMS: far apart
    c = layer.balance_scales_()
    assert c == pytest.approx(math.sqrt(rv / ru), rel=1e-5)
    ru2, rv2 = (float(p.detach().pow(2).mean().sqrt()) for p in (layer.s_u, layer.s_v))
    assert ru2 == pytest.approx(rv2, rel=1e-5)
    assert rel(layer(x), y) < 1e-5
    assert layer.balance_scales_() == pytest.approx(1.0, rel=1e-5)  # balanced stays put


def test_moving_a_layer_frees_its_old_tensors():
    """The cached LCWeight is dropped when the layer's tensors are replaced (.to), so the old codes
    are freed at once (streaming PTQ moves every finished block to meta: it kept their codes)."""
    import gc
    import weakref

    layer = LCLinear(64, 32, hadamard_block_size=64)
    with torch.no_grad():
        layer(torch.randn(2, 64))  # builds and caches the LCWeight over the layer's tensors
    assert layer._lcw is not None
    old = weakref.ref(layer.codes)
    layer.to("meta")
    gc.collect()
    assert old() is None
