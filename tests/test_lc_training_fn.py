"""LCTrainingForward (issue #32): the training forward as one autograd Function that saves x and
yt only. The same output and gradients as plain autograd through reference.lc_forward (bit for
bit where the reference rotations run, as in float64; to float32 rounding where the native
Walsh-Hadamard transform and input stage do), far fewer saved bytes."""

import pytest
import torch

from helpers import saved_bytes
from optimum_lcqat.nn import LCLinear
from optimum_lcqat.nn.lc_training import lc_training_forward
from optimum_lcqat.tensor.packing import unpack_codes

NAMES = ("x", "latent", "A", "beta", "s_u", "s_v", "bias")


def training_layer(n, m, block=64, bias=True, dtype=torch.float32, seed=0, codebook="affine"):
    """A training LC layer with random codes, parameters off their initial values and latents off
    their bin centres (so every gradient is non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    layer = LCLinear(n, m, bias=bias, hadamard_block_size=block, codebook=codebook, dtype=dtype)
    with torch.no_grad():
        for p in (layer.A, layer.beta, layer.s_u, layer.s_v, layer.bias):
            if p is not None:
                p.add_((torch.randn(p.shape, generator=g) * 0.1).to(dtype))
        layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, generator=g, dtype=torch.uint8))
    layer.enable_training()
    with torch.no_grad():
        layer.latent.add_((torch.randn(layer.latent.shape, generator=g) * 0.3 / layer.alpha).to(dtype))
    return layer


def old_forward(layer, x):
    """The training forward before the Function: plain autograd through lc_forward."""
    return layer.plain_training_forward(x)


def inputs(layer, x):
    return [x] + [getattr(layer, k) for k in NAMES[1:]]


def grads(y, ts, g):
    want = [t for t in ts if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, want, g, retain_graph=True))
    return [next(got) if t is not None and t.requires_grad else None for t in ts]


def assert_close(a, b, rtol):
    assert a.dtype == b.dtype and a.shape == b.shape
    err = float((a.float() - b.float()).abs().max())
    assert err <= rtol * float(b.float().abs().max()), (err, float(b.float().abs().max()))


# output bounds against the reference rotations' matmuls (relative to the largest output): float32
# rounding (bf16: assert_bf16_no_worse)
OUT_RTOL = {torch.float32: 5e-6, torch.float64: 0.0}


def float64_twin(layer, x):
    """The layer and input in float64 (the same values): the yardstick of the bf16 comparisons."""
    import copy

    twin = copy.deepcopy(layer).double()
    return twin, x.detach().double().requires_grad_(x.requires_grad)


def assert_bf16_no_worse(new, old, exact):
    """bf16: the native input stage computes in float32 and rounds z once, the reference rounds
    after each of its bf16 matmuls, so the two differ by several bf16 ulps. Against the float64
    values, each result's relative RMS error must be within twice the reference's, or within 2%
    (5 bf16 ulps). Not beta's grad: a sum over tokens of products that cancel (the rows' grads of
    c times their sums of rotated inputs), whose bf16 error is the cancellation's in either code
    (up to ~5% RMS over 12 seeds); float32 and float64 check it."""
    for i, (a, b, e) in enumerate(zip(new, old, exact)):
        if e is None or (len(new) == len(NAMES) and NAMES[i] == "beta"):
            continue
        e = e.detach().double()
        scale = float(e.norm())
        err_new, err_old = float((a.double() - e).norm()) / scale, float((b.double() - e).norm()) / scale
        assert err_new <= max(2 * err_old, 0.02), (i, err_new, err_old)


def assert_close_grads(new, old, rtol):
    for name, a, b in zip(NAMES, new, old):
        assert (a is None) == (b is None), name
        if b is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = float((a.float() - b.float()).abs().max())
        assert err <= rtol * float(b.float().abs().max()) + 1e-30, (name, err, float(b.abs().max()))


CASES = [  # (n in, m out, block): block 64; 96 falls back to block 32; "full" 576 = 36 x 16 (a left matrix)
    (128, 64, 64), (64, 96, 64), (192, 576, "full"), (576, 192, "full"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead", [(17,), (2, 9)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,m,block", CASES)
def test_same_output_and_same_gradients(n, m, block, bias, lead, dtype):
    layer = training_layer(n, m, block, bias=bias, dtype=dtype)
    if block == "full":
        assert layer.plan_in.left != 1 or layer.plan_out.left != 1  # a left-matrix rotation is in play
    gen = torch.Generator().manual_seed(len(lead) * 7 + n)
    x = torch.randn(*lead, n, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(*lead, m, generator=gen).to(dtype)
    y_old = old_forward(layer, x)
    g_old = grads(y_old, inputs(layer, x), g)
    y_new = layer(x)
    assert y_new.grad_fn is not None and "LCTrainingForward" in type(y_new.grad_fn).__name__
    if dtype == torch.float64:  # no native op takes float64: the reference's rotations, the same bits
        assert torch.equal(y_new, y_old)
    g_new = grads(y_new, inputs(layer, x), g)
    if dtype == torch.bfloat16:
        twin, x64 = float64_twin(layer, x)
        y64 = old_forward(twin, x64)
        assert_bf16_no_worse([y_new], [y_old], [y64])
        assert_bf16_no_worse(g_new, g_old, grads(y64, inputs(twin, x64), g.double()))
        return
    assert_close(y_new, y_old, OUT_RTOL[dtype])
    assert_close_grads(g_new, g_old, 1e-5)


@pytest.mark.parametrize("frozen", [("x",), ("x", "s_u"), ("A", "beta"), ("x", "A", "beta", "s_u", "s_v", "bias"),
                                    ("latent",), ("latent", "x", "A", "beta", "s_u")])
def test_only_the_needed_gradients(frozen):
    # the first layer's x needs no grad, the scalar codebook freezes A and beta, ...
    layer = training_layer(128, 64)
    x = torch.randn(5, 128, requires_grad="x" not in frozen)
    for k in frozen:
        if k != "x":
            getattr(layer, k).requires_grad_(False)
    g = torch.randn(5, 64)
    g_old = grads(old_forward(layer, x), inputs(layer, x), g)
    y = layer(x)
    assert_close_grads(grads(y, inputs(layer, x), g), g_old, 1e-5)
    y.backward(g)  # and through .backward: frozen tensors get no .grad
    for k in frozen:
        assert (x if k == "x" else getattr(layer, k)).grad is None, k


def test_gradcheck_float64():
    # the latent's DGE derivative is an estimator (round has derivative 0), so gradcheck covers
    # every other input; the latent's grad is compared with plain autograd above
    layer = training_layer(16, 8, block=8, dtype=torch.float64)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    lat = layer.latent.detach()
    f = lambda x, A, beta, s_u, s_v, bias: lc_training_forward(  # noqa: E731
        x, lat, A, beta, s_u, s_v, bias, layer.alpha, layer.plan_in, layer.plan_out)
    params = [getattr(layer, k).detach().clone().requires_grad_() for k in ("A", "beta", "s_u", "s_v", "bias")]
    assert torch.autograd.gradcheck(f, (x, *params))


def test_bf16_autocast_matches_plain_autograd():
    # DDP with bf16 autocast is a supported QAT setting (float32 latents and parameters): the
    # backward recomputes under the forward's autocast state
    layer = training_layer(128, 96)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 128, generator=gen, requires_grad=True)
    g = torch.randn(2, 7, 96, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_old = old_forward(layer, x)
        y_new = layer(x)
    twin, x64 = float64_twin(layer, x)
    y64 = old_forward(twin, x64)  # float64, no autocast: the exact values
    assert_bf16_no_worse([y_new], [y_old], [y64])
    assert_bf16_no_worse(grads(y_new, inputs(layer, x), g), grads(y_old, inputs(layer, x), g),
                         grads(y64, inputs(twin, x64), g.double()))


def test_saves_only_x_and_yt_for_backward():
    n, m, T = 256, 192, 2048
    layer = training_layer(n, m)
    x = torch.randn(T, n, requires_grad=True)
    params = list(layer.parameters())
    new, y = saved_bytes(lambda: layer(x), params)
    old, _ = saved_bytes(lambda: old_forward(layer, x), params)
    x_bytes, yt_bytes = x.nbytes, T * m * 4
    assert new <= x_bytes + yt_bytes + 4096, (new, x_bytes, yt_bytes)
    # besides x, plain autograd keeps u and q [m, n] and ~4 activation-sized tensors (x * s_u, xt,
    # z, the rotated output; yt is a view the output rotation keeps): measured 6.3 MB against 1.6 MB
    assert old - x_bytes > 3 * (new - x_bytes), (old, new)


def test_twenty_adam_steps_same_codes_and_losses():
    def run(forward):
        torch.manual_seed(1)
        layers = [training_layer(128, 128, seed=s) for s in range(3)]
        params = [p for lay in layers for p in lay.parameters()]
        opt = torch.optim.Adam(params, lr=3e-3)
        data = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(20):
            h = torch.randn(16, 128, generator=data)
            target = torch.randn(16, 128, generator=data)
            for lay in layers:
                h = forward(lay, h)
            loss = (h - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [lay.hard_codes() for lay in layers], layers


    l_new, c_new, lay_new = run(lambda lay, h: lay(h))
    l_old, c_old, lay_old = run(old_forward)
    assert torch.allclose(torch.tensor(l_new), torch.tensor(l_old), rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(c_new, c_old))
    # and the run did move codes (the stored codes are the initial ones: nothing synced them)
    assert sum(int((c != unpack_codes(lay.codes)).sum()) for c, lay in zip(c_new, lay_new)) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m,block", CASES)
def test_fixed_codes_take_the_function_with_the_reference_output_and_gradients(n, m, block, dtype):
    """No latent (the end-to-end PTQ stage, adapters on a frozen layer) and a gradient wanted: the
    Function over the packed codes, the same output as reference.lc_forward (to rounding), the same
    gradients of x and the scales/codebook, and only x and yt kept for backward."""
    from optimum_lcqat.kernels import reference

    layer = training_layer(n, m, block, bias=True, dtype=dtype)
    layer.disable_training()  # the latent's codes packed, the latent dropped
    gen = torch.Generator().manual_seed(n + m)
    x = torch.randn(2, 9, n, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(2, 9, m, generator=gen).to(dtype)
    ts = [x, None, layer.A, layer.beta, layer.s_u, layer.s_v, layer.bias]
    y_ref = reference.lc_forward(layer.lc_weight, x, layer.bias)
    y = layer(x)
    assert "LCTrainingForward" in type(y.grad_fn).__name__
    if dtype == torch.bfloat16:
        twin, x64 = float64_twin(layer, x)
        ts64 = [x64, None, twin.A, twin.beta, twin.s_u, twin.s_v, twin.bias]
        y64 = reference.lc_forward(twin.lc_weight, x64, twin.bias)
        assert_bf16_no_worse([y], [y_ref], [y64])
        assert_bf16_no_worse(grads(y, ts, g), grads(y_ref, ts, g), grads(y64, ts64, g.double()))
    else:
        assert_close(y, y_ref, OUT_RTOL[dtype])
        assert_close_grads(grads(y, ts, g), grads(y_ref, ts, g), 1e-5)
    kept, _ = saved_bytes(lambda: layer(x), list(layer.parameters()) + list(layer.buffers()))
    assert kept <= x.numel() * x.element_size() + y.numel() * 4 + 4096, kept  # x and yt (yt fp32 at most)
    with torch.no_grad():  # inference still takes the packed op (native where it takes the call)
        assert layer(x).grad_fn is None
