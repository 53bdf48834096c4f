"""LCWeight: the one packed-weight object (apply, dense views, checkpoint keys, tensor-parallel shards)."""

import pytest
import torch

from optimum_lcqat.init.data_free import lc_weight_from_dense
from optimum_lcqat.kernels import reference
from optimum_lcqat.nn import LCLinear
from optimum_lcqat.tensor.hadamard import plan_rotation
from optimum_lcqat.tensor.lc_weight import KEYS, LCWeight, storage_bits


def random_weight(m, n, block=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LCWeight(
        torch.randint(0, 256, (m, n // 4), dtype=torch.uint8, generator=g),
        torch.eye(4, dtype=torch.float64) + 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64),
        0.2 * torch.randn(4, generator=g, dtype=torch.float64),
        torch.randn(n, generator=g, dtype=torch.float64),
        torch.randn(m, generator=g, dtype=torch.float64),
        plan_rotation(n, block), plan_rotation(m, block),
    )


@pytest.mark.parametrize("m,n,block", [(96, 256, 64), (40, 96, "full"), (12, 44, 128)])
def test_apply_is_the_product_with_the_dense_weight(m, n, block):
    w = random_weight(m, n, block)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    bias = torch.randn(m, dtype=torch.float64)
    dense = torch.nn.functional.linear(x, w.dense(), bias)
    assert torch.allclose(w.apply(x, bias), dense, atol=1e-10, rtol=1e-10)
    # the native kernels (float32) compute the same function
    with torch.no_grad():
        y32 = w.to(dtype=torch.float32).apply(x.float(), bias.float())
    assert float((y32.double() - dense).abs().max() / dense.abs().max()) < 1e-5


def test_from_dense_reconstructs_within_the_measured_error():
    torch.manual_seed(0)
    dense = torch.randn(192, 256) * 0.05
    w = lc_weight_from_dense(dense, hadamard_block_size=64)
    rel = float((w.dense() - dense.double()).norm() / dense.double().norm())
    # 2 bits on Gaussian weights: measured 0.343 (the optimal 4-level scalar quantizer alone
    # leaves 0.34 of the norm); a broken rotation, codebook fit or packing gives > 0.5
    assert 0.2 < rel < 0.37, rel
    assert w.bits_per_weight() == storage_bits(192, 256, 4) / (192 * 256)


def test_state_dict_round_trip_and_keys():
    w = random_weight(48, 96, "full")
    sd = w.state_dict("layer.")
    assert sorted(sd) == sorted(f"layer.{k}" for k in KEYS)
    assert sd["layer.rotation"].tolist() == [[12, 8], [12, 4]] and sd["layer.rotation"].dtype == torch.int32
    assert all(sd[f"layer.{k}"].dtype == torch.float16 for k in ("A", "beta", "s_u", "s_v"))
    back = LCWeight.from_state_dict(sd, "layer.")
    assert (back.plan_in, back.plan_out) == (w.plan_in, w.plan_out)
    x = torch.randn(2, 96, dtype=torch.float64)
    assert torch.allclose(back.to(dtype=torch.float64).apply(x), w.snapped().apply(x), atol=1e-10)
    del sd["layer.rotation"]  # format version 1: the plans come from the block setting
    with pytest.raises(KeyError, match="hadamard_block_size"):
        LCWeight.from_state_dict(sd, "layer.")
    v1 = LCWeight.from_state_dict(sd, "layer.", hadamard_block_size="full")
    assert (v1.plan_in, v1.plan_out) == (w.plan_in, w.plan_out)


def test_shards_compute_the_whole_layer():
    w = random_weight(192, 256, 64)
    x = torch.randn(4, 256, dtype=torch.float64)
    bias = torch.randn(192, dtype=torch.float64)
    whole = w.apply(x, bias)
    # column-parallel: each rank its output rows
    rows = w.split(0, 3)
    assert [s.shape for s in rows] == [(64, 256)] * 3
    out = torch.cat([s.apply(x, b) for s, b in zip(rows, bias.split(64))], -1)
    assert torch.allclose(out, whole, atol=1e-10)
    # row-parallel: each rank its input columns; the partial sums add up, the bias once
    cols = w.split(1, 4)
    partial = sum(s.apply(xs) for s, xs in zip(cols, x.split(64, -1)))
    assert torch.allclose(partial + bias, whole, atol=1e-10)
    assert all(s.codes.is_contiguous() for s in cols)


def test_shards_that_cut_a_rotation_are_refused_with_the_fix():
    w = random_weight(96, 96, "full")  # 96 = 12 x 8: a full rotation mixes every entry
    with pytest.raises(ValueError, match="mixes entries across that boundary.*hadamard_block_size"):
        w.split(0, 2)
    b = random_weight(192, 256, 64)
    with pytest.raises(ValueError, match=r"cannot split dimension 192 at 0:96.*multiples of the block \(64\)"):
        b.split(0, 2)
    with pytest.raises(ValueError, match="do not split into 3 equal parts"):
        b.split(1, 3)


def test_lclinear_holds_an_lcweight_over_its_own_tensors():
    w = random_weight(64, 128, 64).to(dtype=torch.float32)
    layer = LCLinear.from_weight(w, torch.randn(64))
    lw = layer.lc_weight
    assert lw.A is layer.A and lw.codes is layer.codes and layer.lc_weight is lw  # kept between calls
    assert layer.rotation.tolist() == [[1, 64], [1, 64]]
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = layer(x)
    assert lw._bound is not None  # the native op was bound on the first inference call
    layer.to(torch.float64)  # replaces the parameters' data / the buffers
    with torch.no_grad():
        y64 = layer(x.double())
    assert torch.allclose(y64, reference.lc_forward(layer.lc_weight, x.double(), layer.bias), atol=1e-10)
    assert torch.allclose(y.double(), y64, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        LCWeight(w.codes, w.A, w.beta, w.s_u[:-4], w.s_v, w.plan_in, w.plan_out)


def test_cuda_kernels_stay_off_until_validated_or_opted_in(monkeypatch, caplog):
    # No CUDA kernel of this package has run on a GPU yet: CUDA tensors take the reference path
    # unless OPTIMUM_LCQAT_CUDA_KERNELS=1 (decision logic only; no GPU here).
    from optimum_lcqat.kernels import native

    assert native.CUDA_KERNELS_VALIDATED is False
    monkeypatch.setattr(native, "cuda_built", lambda: True)
    for env, expect in ((None, False), ("1", True), ("0", False)):
        monkeypatch.setattr(native, "_cuda_decision", None)
        if env is None:
            monkeypatch.delenv(native.CUDA_OPT_IN_ENV, raising=False)
        else:
            monkeypatch.setenv(native.CUDA_OPT_IN_ENV, env)
        caplog.clear()
        assert native.cuda_kernels_enabled() is expect
        assert native.cuda_kernels_enabled() is expect  # decided once
        said = [r.message for r in caplog.records if native.CUDA_OPT_IN_ENV in r.message]
        assert len(said) == (0 if expect else 1)
    monkeypatch.setattr(native, "_cuda_decision", None)


def test_missing_extension_is_logged_once():
    """Without optimum_lcqat._C the fallback to the reference says so in one warning (with the
    reason), however many calls take the reference."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import run_python

    proc = run_python(
        "import logging, sys, torch\n"
        "sys.modules['optimum_lcqat._C'] = None  # the import fails as for an unbuilt extension\n"
        "records = []\n"
        "class H(logging.Handler):\n"
        "    def emit(self, r): records.append(r.getMessage())\n"
        "logging.getLogger('optimum_lcqat.kernels').addHandler(H())\n"
        "logging.getLogger('optimum_lcqat').setLevel(logging.INFO)\n"
        "from optimum_lcqat.init.data_free import lc_weight_from_dense\n"
        "from optimum_lcqat import kernels\n"
        "w = lc_weight_from_dense(torch.randn(128, 128)).to(dtype=torch.float32)\n"
        "with torch.no_grad():\n"
        "    for _ in range(3): w.apply(torch.randn(2, 128))\n"
        "assert kernels.backend_name() == 'reference'\n"
        "print(len(records)); print(records[0])\n"
    )
    count, message = proc.stdout.strip().splitlines()
    assert count == "1", proc.stdout
    assert "reference" in message and "_C" in message


def test_bound_call_follows_replaced_fields_and_copies():
    # the inference fast path binds the tensors; a replaced field or a copy must not compute with stale ones
    import copy

    w = random_weight(64, 128, 64).to(dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(3, 128, generator=g), torch.randn(64, generator=g)
    with torch.no_grad():
        y = w.apply(x, bias)
        # fp32 sums of 128 products: compare at fp32 precision relative to the output's size (the
        # random weight is not seeded here, so its scale varies with the tests that ran before)
        tol = dict(rtol=1e-4, atol=1e-5 * float(y.abs().max()))
        if w._bound is None:
            pytest.skip("the native op does not take this call here")
        c = copy.deepcopy(w)
        assert c._bound is None
        c.s_v.mul_(2.0)  # in place, on the copy only
        assert torch.allclose(c.apply(x, bias) - bias, 2 * (y - bias), **tol)
        assert torch.equal(w.apply(x, bias), y)
        w.s_v = w.s_v * 3.0  # a new tensor: unbinds
        assert w._bound is None
        assert torch.allclose(w.apply(x, bias) - bias, 3 * (y - bias), **tol)
        assert torch.allclose(w.apply(x, bias), reference.lc_forward(w, x, bias), **tol)


def test_renamed_dense_views_keep_their_old_names_with_one_warning():
    """LCWeight.dequantize, LCLinear.dequantize_weight, Int8Linear.dequantize_weight (the names
    before dense / dense_weight): the same tensors, one FutureWarning each, then silent."""
    import warnings

    from optimum_lcqat import _deprecation
    from optimum_lcqat.nn import Int8Linear

    w = random_weight(8, 16, "full")
    layer = LCLinear.from_weight(w.to(dtype=torch.float32))
    head = Int8Linear.from_weight(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)))
    _deprecation._warned.clear()
    for obj, old, new in ((w, "dequantize", "dense"), (layer, "dequantize_weight", "dense_weight"),
                          (head, "dequantize_weight", "dense_weight")):
        with pytest.warns(FutureWarning, match=f"{type(obj).__name__}.{old}.*{new}"):
            assert torch.equal(getattr(obj, old)(), getattr(obj, new)())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            getattr(obj, old)()  # warned once already
