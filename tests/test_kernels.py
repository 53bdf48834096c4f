"""Native kernels (torch.ops.lcqat, optimum_lcqat._C) against the pure-PyTorch reference.

The native tests are skipped, with the reason, when the extension is not built
(``python setup.py build_ext --inplace`` or a pip install with a compiler builds it).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimum_lcqat.init.data_free import lc_weight_from_dense
from optimum_lcqat import kernels
from optimum_lcqat.kernels import native, reference
from optimum_lcqat.tensor.codebook import fold_activations
from optimum_lcqat.tensor.hadamard import plan_rotation, rotate
from optimum_lcqat.tensor.lc_weight import LCWeight

ROOT = Path(__file__).resolve().parents[1]
HAVE_NATIVE = native.available()
needs_native = pytest.mark.skipif(not HAVE_NATIVE, reason="optimum_lcqat._C is not built (python setup.py build_ext --inplace)")


def make_layer(m, n, seed=0, bias=True, block=128):
    """A random packed weight (uniform codes) and bias."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (m, n // 4), dtype=torch.uint8, generator=g)
    A = torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)
    beta = 0.2 * torch.randn(4, generator=g)
    s_u = torch.randn(n, generator=g)
    s_v = torch.randn(m, generator=g)
    b = torch.randn(m, generator=g) if bias else None
    return LCWeight(packed, A, beta, s_u, s_v, plan_rotation(n, block), plan_rotation(m, block)), b


def bf16_products(z, c, q):
    """The rotated product as the bf16-product kernels compute it (kernels.h), in float64: the
    centred codes q - 1.5 times the folded activations rounded to bf16, plus the row constant and
    1.5 * sum z unrounded."""
    return z.bfloat16().double() @ (q - 1.5).T + c + 1.5 * z.sum(-1, keepdim=True)


def oracle(w, x, bias):
    """The reference in float64."""
    return reference.lc_forward(w.to(dtype=torch.float64), x.double(), None if bias is None else bias.double())


def assert_close_rel(out, ref, tol):
    err = float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    assert err < tol, f"relative max error {err:.3g} >= {tol}"


# (out m, in n, hadamard_block_size): odd m, n a multiple of 4 only, fallback blocks (4 and 1),
# full rotations with a Paley left factor (576 = 36 x 16, 200 = 200 x 1) and block fallbacks;
# n = 2048 so that 300 rows span several of the GEMM's L2-sized activation blocks.
SHAPES = [
    (576, 576, 128),
    (1536, 576, 128),
    (37, 44, 128),
    (13, 4, 128),
    (100, 200, "full"),
    (576, 576, "full"),
    (192, 1540, 64),
    (40, 2048, 128),
]
# 1-3 rows: the GEMV; from 4: the GEMM (tiles of 12 rows with AVX-512, 6 with AVX2: 13, 80 and
# 300 leave partial tiles).
BATCHES = [1, 3, 4, 8, 13, 64, 80, 300]


@needs_native
@pytest.mark.parametrize("m,n,block", SHAPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lc_linear_matches_reference(m, n, block, batch, dtype):
    w, bias = make_layer(m, n, seed=m + n + batch, block=block)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch)).to(dtype)
    ref = oracle(w, x, bias)  # from the same (rounded) input
    out = native.call_lc_linear_op(w, x, bias)
    assert out.dtype == dtype and out.shape == (batch, m)
    assert_close_rel(out, ref, 1e-4 if dtype == torch.float32 else 1e-2)


@needs_native
def test_lc_linear_leading_dims_fp16_and_params_in_bf16():
    m, n = 96, 160
    w, bias = make_layer(m, n)
    w, bias = w.to(dtype=torch.bfloat16), bias.bfloat16()
    x = torch.randn(2, 5, n)
    ref = oracle(w, x, bias)
    out = native.call_lc_linear_op(w, x, bias)
    assert out.shape == (2, 5, m)
    assert_close_rel(out, ref, 1e-4)
    out16 = native.call_lc_linear_op(w, x.half(), bias)
    assert out16.dtype == torch.float16
    assert_close_rel(out16, oracle(w, x.half(), bias), 2e-3)


@needs_native
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_other_isa_variants_match_reference(isa):
    # The ISA is fixed per process (OPTIMUM_LCQAT_CPU_ISA caps it), so each variant runs in a fresh one.
    code = f"""
import torch
from optimum_lcqat.kernels import native, reference
from optimum_lcqat.tensor.hadamard import plan_rotation
from optimum_lcqat.tensor.lc_weight import LCWeight
assert native.available()
assert native.cpu_isa() == {isa!r}, native.cpu_isa()
torch.manual_seed(0)
for m, n, b in [(37, 200, 1), (64, 300, 3), (16, 1540, 8), (5, 12, 2), (70, 576, 13), (33, 2048, 130)]:
    pi, po = plan_rotation(n, 128), plan_rotation(m, 128)
    p = torch.randint(0, 256, (m, n // 4), dtype=torch.uint8)
    A = torch.eye(4) + 0.3 * torch.randn(4, 4); be = torch.randn(4); su = torch.randn(n); sv = torch.randn(m)
    w = LCWeight(p, A, be, su, sv, pi, po)
    x = torch.randn(b, n)
    ref = reference.lc_forward(w.to(dtype=torch.float64), x.double())
    out = native.call_lc_linear_op(w, x)
    err = float((out.double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-4, (m, n, b, err)
    # int8 activations: VNNI only at avx512, so here the scalar integer code must give the same sums
    assert not native.cpu_has_vnni()
    ref8 = reference.lc_forward(w, x, int8_activations=True).double()
    out8 = native.call_lc_linear_op(w, x, int8_activations=True)
    err8 = float((out8.double() - ref8).abs().max() / ref8.abs().max())
    assert err8 < 1e-3, (m, n, b, err8)
print("ok")
"""
    env = dict(os.environ, OPTIMUM_LCQAT_CPU_ISA=isa)  # the installed package (its built _C), as in every test
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@needs_native
def test_cpu_switches_take_one_prefix_and_the_old_names_warn():
    # OPTIMUM_LCQAT_CPU_* is the switches' name; LCQAT_CPU_* still works with a warning once; the new
    # name wins where both are set; a value the ISA switch does not know is said, not ignored silently.
    code = "from optimum_lcqat.kernels import native; print(native.cpu_isa(), native.cpu_isa())"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIMUM_LCQAT_CPU_", "LCQAT_CPU_"))}

    def run(**env):
        proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                              env={**base, **env})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split(), proc.stderr

    out, err = run(OPTIMUM_LCQAT_CPU_ISA="scalar")
    assert out == ["scalar", "scalar"] and "deprecated" not in err
    out, err = run(LCQAT_CPU_ISA="scalar")
    assert out == ["scalar", "scalar"]
    assert err.count("LCQAT_CPU_ISA is deprecated") == 1 and "OPTIMUM_LCQAT_CPU_ISA=scalar" in err
    out, _ = run(LCQAT_CPU_ISA="scalar", OPTIMUM_LCQAT_CPU_ISA="avx512")
    assert out[0] != "scalar"
    out, err = run(OPTIMUM_LCQAT_CPU_ISA="avx-512")
    assert out[0] != "scalar" and "OPTIMUM_LCQAT_CPU_ISA=avx-512 is not one of scalar, avx2, avx512" in err


@needs_native
@pytest.mark.parametrize("n,block", [(576, 64), (576, "full"), (200, "full"), (44, 128), (1536, 128)])
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_op_matches_rotate(n, block, transpose):
    plan = plan_rotation(n, block)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, generator=g)
    si, so = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ref = rotate(x.double() * si.double(), plan, transpose=transpose) * so.double()
    out = native.hadamard(x, plan, si, so, transpose)
    assert out.shape == x.shape
    assert_close_rel(out, ref, 1e-5)
    out_plain = native.hadamard(x.bfloat16(), plan, transpose=transpose)
    assert out_plain.dtype == torch.bfloat16
    assert_close_rel(out_plain, rotate(x.bfloat16().double(), plan, transpose=transpose), 1e-2)


@needs_native
@pytest.mark.parametrize("batch", [1, 5, 8, 64, 70])
def test_lc_matmul_matches_dequantized_product(batch):
    m, n = 77, 132
    w, _ = make_layer(m, n)
    xt = torch.randn(batch, n)
    ref = torch.nn.functional.linear(xt.double(), w.to(dtype=torch.float64).rotated())
    assert_close_rel(native.lc_matmul(xt, w.codes, w.A, w.beta), ref, 1e-5)


@needs_native
@pytest.mark.parametrize("batch", [1, 2, 4, 5, 8, 13, 64])
@pytest.mark.parametrize("n", [576, 1024])
def test_bf16_activations_multiply_in_bf16_only_where_the_cpu_has_it(batch, n):
    # bf16 activations (the GEMV at 1-5 rows, the GEMM from 6): with AVX512_BF16 the rotated
    # product multiplies the centred code values (exact) by the folded activations rounded to bf16
    # (fp32 accumulation; bf16_products); without it, in fp32; the GEMV on AVX-512 VNNI CPUs in
    # 16-bit fixed point.
    # n = 576 ends in a partial 256-input block of the GEMV.
    # Emulate both in float64 and check which one the op's bf16 outputs equal (rounding the same
    # float to bf16 gives the same bits, so nearly every element matches the path that ran).
    m = 77
    w, _ = make_layer(m, n, seed=batch)
    xt = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch)).bfloat16()
    z, c = fold_activations(xt.double(), w.A.double(), w.beta.double())
    q = reference.integer_codes(w, torch.float64)
    exact = z @ q.T + c
    products = bf16_products(z, c, q)
    out = native.lc_matmul(xt, w.codes, w.A, w.beta)
    assert out.dtype == torch.bfloat16
    same_bf16 = float((out == products.bfloat16()).double().mean())
    same_exact = float((out == exact.bfloat16()).double().mean())
    # (on AMX CPUs the AMX GEMM takes 3 rows and more: bf16 products, amx.cpp)
    if native.cpu_has_int8_a16() and batch <= (2 if native.cpu_has_amx_bf16() else 5):
        # the decode GEMV on VNNI CPUs: 16-bit fixed point, exact integer sums (kernels.h). Beyond
        # the final rounding to bf16 (half a step) its error stays below 1.5e-4 of the largest
        # output (measured <= 3e-5), where bf16 products leave 6e-4 to 1.4e-3
        assert same_exact > 0.9 and same_exact > same_bf16, (same_bf16, same_exact)
        excess = ((out.double() - exact).abs() - exact.abs() * 2.0 ** -8).clamp(min=0).max()
        assert excess <= 1.5e-4 * exact.abs().max(), float(excess / exact.abs().max())
        for b in range(batch):  # and a row's result does not depend on the rows beside it
            assert torch.equal(native.lc_matmul(xt[b:b + 1], w.codes, w.A, w.beta), out[b:b + 1])
    elif native.cpu_has_bf16_dot():
        assert same_bf16 > 0.97 and same_exact < 0.9, (same_bf16, same_exact)
    else:
        assert same_exact > 0.97 and same_bf16 < 0.9, (same_bf16, same_exact)
    # fp32 activations always multiply in fp32
    out32 = native.lc_matmul(xt.float(), w.codes, w.A, w.beta)
    assert_close_rel(out32, exact, 1e-5)


@needs_native
def test_clear_errors_for_unsupported_inputs():
    m, n = 32, 64
    w, bias = make_layer(m, n, block=64)
    packed, A, beta, s_u, s_v = w.codes, w.A, w.beta, w.s_u, w.s_v
    args = (packed, A, beta, s_u, s_v, bias, 64, None, 32, None)
    x = torch.randn(2, n)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.lcqat.lc_linear(x.double(), *args)
    with pytest.raises(RuntimeError, match="only vector_dim 4"):
        torch.ops.lcqat.lc_linear(x, packed, torch.eye(2), beta[:2], s_u, s_v, bias, 64, None, 32, None)
    with pytest.raises(RuntimeError, match="must be uint8"):
        torch.ops.lcqat.lc_linear(x, packed.int(), *args[1:])
    with pytest.raises(RuntimeError, match="do not match the input dimension"):
        torch.ops.lcqat.lc_linear(torch.randn(2, n + 4), *args)
    with pytest.raises(RuntimeError, match="power of two"):
        torch.ops.lcqat.lc_linear(x, packed, A, beta, s_u, s_v, bias, 48, None, 32, None)
    with pytest.raises(RuntimeError, match="does not divide"):
        torch.ops.lcqat.lc_linear(x, packed, A, beta, s_u, s_v, bias, 128, None, 32, None)
    with pytest.raises(RuntimeError, match="s_v must be a float vector"):
        torch.ops.lcqat.lc_linear(x, packed, A, beta, s_u, s_v[:-1], bias, 64, None, 32, None)
    with pytest.raises(RuntimeError, match="left factor"):
        torch.ops.lcqat.hadamard(x, 64, torch.randn(3), None, None, False)
    with pytest.raises(RuntimeError, match="does not match the dimension"):
        torch.ops.lcqat.hadamard(x, 16, torch.eye(3), None, None, False)
    # The dispatcher declines what the native op does not do (the reference computes it).
    assert native.supports(w, x)
    assert not native.supports(w, x.double())
    assert not native.supports(LCWeight(packed, torch.eye(2), beta[:2], s_u, s_v, w.plan_in, w.plan_out), x)


@needs_native
def test_dispatch_uses_native_without_grad_and_reference_with_grad(monkeypatch):
    m, n = 48, 64
    w, bias = make_layer(m, n, block=64)
    w.s_u.requires_grad_(True)
    x = torch.randn(3, n)
    calls = []
    real = native.call_lc_linear_op
    monkeypatch.setattr(native, "call_lc_linear_op", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y0 = kernels.lc_linear(w, x, bias)
    assert calls == [1]
    y1 = kernels.lc_linear(w, x, bias)  # s_u needs a gradient
    assert calls == [1] and y1.requires_grad
    y1.sum().backward()
    assert w.s_u.grad is not None and torch.isfinite(w.s_u.grad).all()
    assert_close_rel(y0, y1.detach().double(), 1e-5)


@needs_native
def test_lclinear_module_uses_native_and_matches_reference_backend():
    from optimum_lcqat.nn.lc_linear import LCLinear

    w, bias = make_layer(192, 576)
    layer = LCLinear.from_weight(w, bias)
    x = torch.randn(2, 4, 576)
    with torch.inference_mode():
        out = layer(x)
        ref = reference.lc_forward(layer.lc_weight, x, layer.bias)
    assert kernels.backend_name() == "native"
    assert_close_rel(out, ref.double(), 1e-4)


@needs_native
def test_lclinear_inference_fast_path_matches_and_steps_aside(monkeypatch):
    # After its first inference call an LCLinear calls the op directly (no dispatcher checks);
    # it must give the same numbers, and still leave what the op cannot take to the other paths: a
    # dtype it does not support (the dispatcher, then the reference), a call that needs a gradient
    # (the layer's autograd Function, nn/lc_training.py).
    from optimum_lcqat.nn.lc_linear import LCLinear

    w, bias = make_layer(40, 576, block="full")
    layer = LCLinear.from_weight(w, bias, hadamard_block_size="full")
    assert layer.plan_in.left > 1  # 576 = 9 x 64: a Paley left factor travels in the cached arguments
    x = torch.randn(1, 1, 576)
    calls = []
    real = kernels.lc_linear
    monkeypatch.setattr(kernels, "lc_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = oracle(layer.lc_weight, x, layer.bias)
    with torch.no_grad():
        first = layer(x)
        bound = layer.lc_weight._bound
        assert calls == [1] and bound is not None and bound[0] == x.device
        second = layer(x)
        assert calls == [1]  # the fast path
        wide = copy.deepcopy(layer).double()(x.double())  # float64: not native, the reference takes it
        assert calls == [1, 1] and wide.dtype == torch.float64
    assert torch.equal(first, second)
    assert_close_rel(second, ref, 1e-4)
    assert_close_rel(wide, ref, 1e-4)
    xg = x.clone().requires_grad_(True)
    out = layer(xg)  # grad enabled: the differentiable path (LCTrainingForward), never the fast one
    assert calls == [1, 1] and out.requires_grad and "LCTrainingForward" in type(out.grad_fn).__name__
    assert_close_rel(out.detach(), ref, 1e-4)
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert_close_rel(compiled(x), ref, 1e-4)


@needs_native
@pytest.mark.parametrize("m,n,block", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 8, 13])
def test_lc_linear_a8_matches_its_emulation_and_stays_close_to_exact(m, n, block, batch):
    # The native int8-activation op against the reference's emulation of the same rounding (a
    # layout or sign slip gives O(1) errors; an activation rounded the other way at a tie, ~1e-4),
    # and against the exact layer: one absmax scale per row costs a few percent of the largest
    # output on these random layers (what it costs a real model: benchmarks/decode.py --quality-dir).
    w, bias = make_layer(m, n, seed=m + n + batch, block=block)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch))
    out = native.call_lc_linear_op(w, x, bias, int8_activations=True)
    emul = reference.lc_forward(w, x, bias, int8_activations=True)
    assert out.shape == (batch, m) and out.dtype == torch.float32
    assert_close_rel(out, emul.double(), 1e-3)
    assert_close_rel(out, oracle(w, x, bias), 1e-1)
    # a row's result does not depend on how many rows share the call (slices of 8)
    assert_close_rel(out[:1], native.call_lc_linear_op(w, x[:1], bias, int8_activations=True).double(), 1e-6)


@needs_native
def test_set_int8_activations_switches_layers_and_refuses_training():
    from optimum_lcqat import set_int8_activations
    from optimum_lcqat.nn.lc_linear import LCLinear

    w, bias = make_layer(64, 576)
    model = torch.nn.Sequential(LCLinear.from_weight(w, bias), torch.nn.ReLU())
    layer = model[0]
    x = torch.randn(2, 1, 576)
    emul = reference.lc_forward(w, x, bias, int8_activations=True)
    exact = oracle(w, x, bias)
    assert set_int8_activations(model, True) == 1 and layer.int8_activations
    model.eval()
    with torch.no_grad():
        first, second = layer(x), layer(x)  # the second call takes the cached fast path
    assert torch.equal(first, second)
    assert_close_rel(second, emul.double(), 1e-3)
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        layer(x.clone().requires_grad_(True))
    assert set_int8_activations(model, False) == 1
    with torch.no_grad():
        assert_close_rel(layer(x), exact, 1e-4)


@needs_native
def test_torch_compile_fullgraph():
    m, n = 96, 128
    w, bias = make_layer(m, n, block=64)

    def f(x):
        h = torch.relu(x) + 1.0
        return w.apply(h, bias) * 2.0

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    x = torch.randn(2, n)
    with torch.no_grad():
        out = compiled(x)
        ref = oracle(w, torch.relu(x) + 1.0, bias) * 2.0
    assert_close_rel(out, ref, 1e-4)


@needs_native
@pytest.mark.parametrize("d", [4, 2, 1])
@pytest.mark.parametrize("n", [1, 17, 64, 1000, 70001])
def test_nearest_codeword_search_finds_the_nearest(n, d):
    """The native codebook search (csrc/cpu/codebook_search.cpp, this process's ISA tier; the
    lower tiers in tests/test_isa_tiers.py) against the float64 distances: every chosen codeword
    is a nearest one (within float32 rounding of the distances), nearly always the reference's
    choice (ties aside), and a tie goes to the lowest index. Vector counts
    around the 16 x 4 lanes of a step and the thread split."""
    from optimum_lcqat.tensor import codebook

    g = torch.Generator().manual_seed(n * 10 + d)
    A = (0.8 * torch.eye(d) + 0.2 * torch.randn(d, d, generator=g)).double()
    beta = (0.3 * torch.randn(d, generator=g)).double()
    table = codebook.codewords(A, beta)
    w = 1.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    w[: n // 4] = table[torch.randint(0, len(table), (n // 4,), generator=g)]  # exact codewords: ties
    got = kernels.nearest_codeword(w, A, beta)
    ref = codebook.nearest_codeword(w, A, beta)
    assert got.dtype == torch.long and got.shape == (n,)
    dist = torch.cdist(w, table) ** 2
    best = dist.min(1).values
    chosen = dist.gather(1, got[:, None]).squeeze(1)
    assert bool((chosen <= best + 1e-5 * (1 + best)).all()), float((chosen - best).max())
    assert (got != ref).sum() <= max(1, n // 1000)
    # a table holding every codeword twice: each tie goes to the lower index, the first copy
    twice = torch.cat([table, table]).float()
    assert torch.equal(native.nearest_codeword(w.float(), twice), native.nearest_codeword(w.float(), table.float()))


@needs_native
def test_data_free_init_with_the_native_search_equals_the_reference(monkeypatch):
    """The data-free initialiser (five searches and four codebook fits on a SmolLM2 MLP shape) gives
    the same codes and codebook with the native search as with the reference's."""
    from optimum_lcqat.tensor import codebook

    weight = torch.randn(1536, 576, generator=torch.Generator().manual_seed(3))
    nat = lc_weight_from_dense(weight, name="mlp.up_proj")
    import optimum_lcqat.init.data_free as data_free

    monkeypatch.setattr(data_free, "nearest_codeword", codebook.nearest_codeword)
    ref = lc_weight_from_dense(weight, name="mlp.up_proj")
    assert (nat.codes != ref.codes).float().mean() < 1e-4
    torch.testing.assert_close(nat.A, ref.A, rtol=1e-6, atol=1e-9)


def _stage_case(n, block, rows, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    s_u = torch.rand(n, generator=g) + 0.5
    A = torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)
    beta = 0.2 * torch.randn(4, generator=g)
    return x, s_u, A, beta, plan_rotation(n, block)


@needs_native
@pytest.mark.parametrize("n,block", [(64, 64), (576, 128), (1536, 128), (96, 128), (576, "full"), (20, 4)])
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_training_input_side_matches_the_reference(n, block, rows):
    """lcqat.lc_input_side and its backward (csrc/cpu/training_stages.cpp; this process's ISA tier,
    the lower ones in tests/test_isa_tiers.py) against the reference's input side and autograd
    through it, in float64: block-diagonal plans (576 falls back to block 64), a full plan with a
    Paley left factor, and row counts around the fixed chunking of the grads' sums."""
    x, s_u, A, beta, plan = _stage_case(n, block, rows, seed=n + rows)
    z, c = kernels.input_side(x, s_u, A, beta, plan)
    z64, c64 = reference.input_side(x.double(), s_u.double(), A.double(), beta.double(), plan)
    assert z.dtype == torch.float32 and z.shape == x.shape and c.shape == (rows, 1)
    assert_close_rel(z, z64, 1e-6)
    assert_close_rel(c, c64, 1e-5)
    g = torch.Generator().manual_seed(1)
    g_z, g_c = torch.randn(rows, n, generator=g), torch.randn(rows, 1, generator=g)
    args64 = (x.double(), g_z.double(), g_c.double(), s_u.double(), A.double(), beta.double(), plan)
    want = reference.input_side_backward(*args64, (True, True, True, True))
    for needs in [(True, True, True, True), (True, False, False, False), (False, True, True, False),
                  (False, False, False, True)]:
        got = kernels.input_side_backward(x, g_z, g_c, s_u, A, beta, plan, needs)
        for name, need, a, b in zip(("x", "s_u", "A", "beta"), needs, got, want):
            assert (a is None) == (not need), name
            if need:
                assert a.dtype == torch.float32 and a.shape == b.shape, name
                assert_close_rel(a, b, 1e-5)
    # bf16 activations: read exactly, computed in float32, z rounded once to bf16
    zb, _ = kernels.input_side(x.bfloat16(), s_u, A, beta, plan)
    z_exact, _ = reference.input_side(x.bfloat16().double(), s_u.double(), A.double(), beta.double(), plan)
    assert zb.dtype == torch.bfloat16
    assert_close_rel(zb, z_exact, 2**-8)


@needs_native
def test_training_input_side_grads_do_not_depend_on_the_thread_count():
    """The grads' sums over rows run in a fixed chunking, whatever the threads: the same bits."""
    x, s_u, A, beta, plan = _stage_case(576, 128, 300, seed=5)
    g_z, g_c = torch.randn(300, 576), torch.randn(300, 1)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(kernels.input_side_backward(x, g_z, g_c, s_u, A, beta, plan, (True, True, True, True)))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@needs_native
def test_opcheck():
    from torch.library import opcheck

    m, n = 40, 64
    w, bias = make_layer(m, n)
    packed, A, beta, s_u, s_v = w.codes, w.A, w.beta, w.s_u, w.s_v
    x = torch.randn(3, n)
    opcheck(torch.ops.lcqat.lc_linear.default, (x, packed, A, beta, s_u, s_v, bias, 64, None, 8, None))
    opcheck(torch.ops.lcqat.lc_linear.default, (x.bfloat16(), packed, A, beta, s_u, s_v, None, 16, None, 8, None))
    opcheck(torch.ops.lcqat.lc_linear_a8.default, (x, packed, A, beta, s_u, s_v, bias, 64, None, 8, None))
    opcheck(torch.ops.lcqat.lc_matmul.default, (x, packed, A, beta))
    opcheck(torch.ops.lcqat.hadamard.default, (x, 32, None, s_u, None, True))
    opcheck(torch.ops.lcqat.hadamard.default, (torch.randn(2, 24), 2, torch.tensor(plan_left(12)), None, None, False))
    opcheck(torch.ops.lcqat.nearest_codeword.default, (torch.randn(70, 4), torch.randn(256, 4)))
    opcheck(torch.ops.lcqat.lc_input_side.default, (x, 32, None, s_u, A, beta))
    left = torch.tensor(plan_left(12))
    opcheck(torch.ops.lcqat.lc_input_side.default, (torch.randn(2, 24).bfloat16(), 2, left, s_u[:24], A, beta))
    g_z, g_c = torch.randn(3, n), torch.randn(3, 1)
    opcheck(torch.ops.lcqat.lc_input_side_backward.default,
            (x, g_z, g_c, 64, None, s_u, A, beta, True, True, True, True))
    opcheck(torch.ops.lcqat.lc_input_side_backward.default,
            (x, g_z, g_c, 16, None, s_u, A, beta, False, True, False, True))


def plan_left(k):
    from optimum_lcqat.tensor.hadamard import hadamard_matrix

    return hadamard_matrix(k).float().tolist()


def test_build_config_describes_the_extension():
    sys.path.insert(0, str(ROOT))
    try:
        cfg = importlib.import_module("build_ext_config")
    finally:
        sys.path.remove(str(ROOT))
    exts, cmd = cfg.extensions()
    if not exts:  # no compiler here: the package must still install
        assert cmd == {}
        return
    (ext,) = exts
    assert ext.name == "optimum_lcqat._C"
    assert any(s.endswith("lcqat_ops.cpp") for s in ext.sources) and "build_ext" in cmd


CUDA_DIR = ROOT / "csrc" / "cuda"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    # The kernels themselves (no torch headers), for a spread of architectures.
    src = CUDA_DIR / "lc_kernels.cu"
    cmd = ["nvcc", "-std=c++17", "-O3", "-c", str(src), "-o", str(tmp_path / "k.o"),
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_torch_binding_compiles_with_nvcc(tmp_path):
    # The torch glue (TORCH_LIBRARY_IMPL for CUDA) compiled to an object file against torch's
    # headers; linking and running need a CUDA build of torch (and a GPU).
    from torch.utils.cpp_extension import include_paths

    inc = sum((["-I", p] for p in include_paths()), [])
    import sysconfig

    inc += ["-I", sysconfig.get_paths()["include"]]
    # A CPU-only torch wheel ships the c10/cuda headers but not the generated config header they
    # include; a stub with the value CUDA builds use lets the glue compile (only where missing).
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    inc += ["-I", str(tmp_path / "stub")]
    cmd = ["nvcc", "-std=c++20", "-O0", "-c", str(CUDA_DIR / "lcqat_cuda.cu"), "-o", str(tmp_path / "b.o"),
           "-gencode=arch=compute_90,code=sm_90", "-DLCQAT_WITH_CUDA", "--expt-relaxed-constexpr", *inc]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


needs_cuda_native = pytest.mark.skipif(
    not (HAVE_NATIVE and torch.cuda.is_available() and native.cuda_built()),
    reason="needs a GPU and the extension built with CUDA",
)


@needs_cuda_native
@pytest.mark.parametrize("m,n,block", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_lc_linear_matches_reference(m, n, block, batch, dtype):
    w, bias = make_layer(m, n, seed=m + n + batch, block=block)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch)).to(dtype)
    ref = oracle(w, x, bias)
    out = native.call_lc_linear_op(w.to(device="cuda"), x.cuda(), None if bias is None else bias.cuda())
    assert out.device.type == "cuda" and out.dtype == dtype
    # fp32 GEMV is exact fp32 math; batches > 8 go through cuBLAS (TF32 off by default).
    assert_close_rel(out.cpu(), ref, 1e-4 if dtype == torch.float32 else 2e-2)


@needs_cuda_native
def test_cuda_hadamard_and_matmul_match_reference():
    plan = plan_rotation(576, "full")
    x = torch.randn(4, 576)
    si = torch.randn(576)
    ref = rotate(x.double() * si.double(), plan, transpose=True)
    assert_close_rel(native.hadamard(x.cuda(), plan, si.cuda(), None, True).cpu(), ref, 1e-5)
    w, _ = make_layer(77, 132)
    xt = torch.randn(5, 132)
    ref = torch.nn.functional.linear(xt.double(), w.to(dtype=torch.float64).rotated())
    assert_close_rel(native.lc_matmul(xt.cuda(), w.codes.cuda(), w.A.cuda(), w.beta.cuda()).cpu(), ref, 1e-5)


@needs_native
@pytest.mark.parametrize("batch", [1, 3, 8, 20, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [100, 584])
def test_int8_head_matches_dequantized_linear(batch, dtype, n):
    from optimum_lcqat.nn import Int8Linear

    # n = 100: one unrolled step of 64, one of 16 and a scalar tail of 4 (AVX-512); n = 584: nine
    # unrolled steps and a tail of 8. 333 rows: more than the prefetch distance, none a multiple of 4.
    lin = torch.nn.Linear(n, 333, bias=True)
    head = Int8Linear.from_linear(lin)
    assert (head.dense_weight() - lin.weight).abs().max() <= head.scale.max() / 2 + 1e-6
    x = torch.randn(2, batch, n).to(dtype)
    ref = torch.nn.functional.linear(x.double(), head.dense_weight().double(), lin.bias.double())
    with torch.no_grad():
        out = head(x)
    assert out.dtype == dtype and out.shape == (2, batch, 333)
    assert_close_rel(out, ref, 1e-5 if dtype == torch.float32 else 1e-2)
    from torch.library import opcheck

    opcheck(torch.ops.lcqat.int8_linear.default, (x[0].float(), head.weight_int8, head.scale, lin.bias.detach()))
    with pytest.raises(RuntimeError, match="weight must be int8"):
        torch.ops.lcqat.int8_linear(x, head.weight_int8.float(), head.scale, None)


def _int8_a16_emulation(x, w, scale, bias):
    """What lcqat.int8_linear computes for bf16 x where cpu_has_int8_a16() (csrc/cpu/kernels.h):
    each row rounded to 16-bit fixed point (the same fp32 operations), split q = 256 h + l, the
    integer sums exact (int64 here), scaled in double, rounded once to fp32."""
    xf = x.float().reshape(-1, x.shape[-1])
    amax = xf.abs().amax(dim=1, keepdim=True)
    tiny = amax < 2.0 ** -100  # such a row counts as zero
    s = torch.where(tiny, torch.ones_like(amax), amax / 32639)
    q = torch.round(xf * torch.where(tiny, torch.zeros_like(s), 1 / s)).clamp(-32639, 32639).to(torch.int64)
    hi = torch.div(q + 128, 256, rounding_mode="floor")
    lo = q - 256 * hi
    assert hi.abs().max() <= 127 and lo.min() >= -128 and lo.max() <= 127
    w64 = w.to(torch.int64)
    total = 256 * (hi @ w64.T) + lo @ w64.T
    y = (total.double() * s.double() * scale.double()[None]).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


needs_a16 = pytest.mark.skipif(not native.cpu_has_int8_a16(),
                               reason="int8_linear's 16-bit activation path needs AVX-512 VNNI")


@needs_a16
@pytest.mark.parametrize("n", [100, 576, 2048])
def test_int8_head_bf16_activations_are_exact_integer_sums(n):
    from optimum_lcqat.nn import Int8Linear

    # 1 (four output rows a step, 333 = 83 x 4 + 1: one left over), 3, 8, 9 and 20 (tiles of output
    # rows over batch slices of 8, the last slice of 9 a single row) and 64 (the largest GEMV batch)
    # rows; n = 100 ends in a masked chunk of 36. Row 5 is tiny (below 2^-100: counts as zero).
    g = torch.Generator().manual_seed(n)
    lin = torch.nn.Linear(n, 333, bias=True)
    head = Int8Linear.from_linear(lin)
    dtype = torch.bfloat16
    x = (torch.randn(64, n, generator=g) * torch.logspace(-3, 1, n)[torch.randperm(n, generator=g)]).to(dtype)
    x[5] *= 2.0 ** -110
    w, sc, b = head.weight_int8, head.scale, lin.bias.detach()
    full = torch.ops.lcqat.int8_linear(x, w, sc, b)
    assert torch.equal(full, _int8_a16_emulation(x, w, sc, b))
    assert torch.equal(full[5], b.to(dtype))
    for rows in (1, 3, 8, 9, 20):  # a row's output does not depend on the rows beside it
        assert torch.equal(torch.ops.lcqat.int8_linear(x[:rows], w, sc, b), full[:rows])
    # against the exact product of the half-precision inputs: the 16-bit rounding is far below
    # the final rounding to the activation dtype
    ref = torch.nn.functional.linear(x.double(), head.dense_weight().double(), b.double())
    exact32 = ref.float()
    err = (torch.ops.lcqat.int8_linear(x, w, sc, None).float() + b - exact32).abs().max() / exact32.abs().max()
    assert err < 1e-2
    # before that final rounding (the emulation on the same values in fp32, which the kernel
    # rounds to the activation dtype at the end): the 16-bit fixed point alone
    y32 = _int8_a16_emulation(x.float(), w, sc, b).double()
    assert ((y32 - ref).abs().max() / ref.abs().max()) < 2e-4
    # fp16 activations compute in fp32 (as in the LC layers)
    x16 = x[:4].half()
    assert torch.equal(torch.ops.lcqat.int8_linear(x16, w, sc, b), torch.ops.lcqat.int8_linear(x16.float(), w, sc, b).half())


@needs_a16
def test_int8_head_bf16_activations_non_finite_rows():
    lin = torch.nn.Linear(128, 40)
    from optimum_lcqat.nn import Int8Linear

    head = Int8Linear.from_linear(lin)
    x = torch.randn(3, 128).bfloat16()
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y = torch.ops.lcqat.int8_linear(x, head.weight_int8, head.scale, None)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.equal(y[0], torch.ops.lcqat.int8_linear(x[:1], head.weight_int8, head.scale, None)[0])


@needs_native
def test_cpu_bf16_and_a16_switches():
    # OPTIMUM_LCQAT_CPU_BF16=0: bf16 activations compute as fp32 ones in the LC layers and the int8 head
    code = ("import torch, optimum_lcqat.kernels.native as n; assert n.available(); "
            "from optimum_lcqat.nn import Int8Linear; lin = torch.nn.Linear(96, 40); h = Int8Linear.from_linear(lin); "
            "x = torch.randn(2, 96).bfloat16(); "
            "ok = torch.equal(torch.ops.lcqat.int8_linear(x, h.weight_int8, h.scale, None), "
            "torch.ops.lcqat.int8_linear(x.float(), h.weight_int8, h.scale, None).bfloat16()); "
            "print(torch.ops.lcqat.cpu_has_int8_a16(), torch.ops.lcqat.cpu_has_bf16_dot(), ok)")
    out = subprocess.run([sys.executable, "-P", "-c", code], env={**os.environ, "OPTIMUM_LCQAT_CPU_BF16": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"], out
    # OPTIMUM_LCQAT_CPU_A16=0: only the 16-bit path off (bf16 products stay where the CPU has them)
    out = subprocess.run([sys.executable, "-P", "-c", code], env={**os.environ, "OPTIMUM_LCQAT_CPU_A16": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", str(native.cpu_has_bf16_dot()), "True"], out


@needs_native
@pytest.mark.skipif(not native.cpu_has_amx_bf16(), reason="needs a CPU with AMX-BF16 (csrc/cpu/amx.cpp)")
@pytest.mark.parametrize("batch", [3, 5, 16, 17, 64, 65, 130])
@pytest.mark.parametrize("m,n", [(16, 2048), (77, 576), (200, 1088)])
def test_amx_gemm_rounds_like_bf16_products(batch, m, n):
    # The AMX GEMM (bf16 activations, 3 rows and more, n a multiple of 32): the centred codes times
    # the folded activations rounded to bf16, fp32 sums (bf16_products). Against that product in float64, beyond the
    # output's rounding to bf16 (half a step), the kernel's z (fp32, then bf16) differs from the
    # emulation's (float64 to bf16) in an element's last bit now and then, and the fp32 sums in
    # order: measured at most 1.6e-4 of the largest output, the same as the AVX512_BF16 GEMM's.
    # Row groups of 16 with a tail (77, 200), activation blocks of 64 rows with a tail (65, 130).
    w, _ = make_layer(m, n, seed=batch + m)
    xt = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch)).bfloat16()
    z, c = fold_activations(xt.double(), w.A.double(), w.beta.double())
    q = reference.integer_codes(w, torch.float64)
    products = bf16_products(z, c, q)
    out = native.lc_matmul(xt, w.codes, w.A, w.beta)
    assert out.dtype == torch.bfloat16 and out.shape == (batch, m)
    excess = ((out.double() - products).abs() - products.abs() * 2.0 ** -8).clamp(min=0).max()
    assert excess <= 5e-4 * products.abs().max(), float(excess / products.abs().max())
    assert float((out == products.bfloat16()).double().mean()) > 0.97
    # rows are independent: the last 5 rows alone (another padding of the 16-row tiles) end alike
    alone = native.lc_matmul(xt[-5:], w.codes, w.A, w.beta)
    assert torch.equal(alone, out[-5:])


@needs_native
@pytest.mark.skipif(not native.cpu_has_amx_bf16(), reason="needs a CPU with AMX-BF16")
def test_amx_switch_keeps_the_avx512_bf16_gemm(tmp_path):
    # OPTIMUM_LCQAT_CPU_AMX=0 turns only the AMX GEMM off: the AVX512_BF16 GEMM then runs, with the same
    # rounding of the activations (outputs within the fp32 summation order, after bf16 rounding)
    w, _ = make_layer(77, 576, seed=3)
    xt = torch.randn(16, 576, generator=torch.Generator().manual_seed(3)).bfloat16()
    amx = native.lc_matmul(xt, w.codes, w.A, w.beta)
    code = ("import sys, torch, optimum_lcqat.kernels.native as n; assert n.available(); "
            "d = torch.load(sys.argv[1]); "
            "print(n.cpu_has_amx_bf16(), n.cpu_has_bf16_dot()); "
            "torch.save(n.lc_matmul(d['x'], d['codes'], d['A'], d['beta']), sys.argv[1])")
    path = str(tmp_path / "io.pt")
    torch.save({"x": xt, "codes": w.codes, "A": w.A, "beta": w.beta}, path)
    out = subprocess.run([sys.executable, "-P", "-c", code, path], env={**os.environ, "OPTIMUM_LCQAT_CPU_AMX": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"], out
    other = torch.load(path)
    # at most one bf16 step apart (fp32 sums in another order, then each rounded to bf16)
    assert float((amx == other).double().mean()) > 0.97
    step = (other.double().abs() * 2.0 ** -7).clamp(min=1e-6 * other.double().abs().max())
    assert ((amx.double() - other.double()).abs() <= step).all()


@needs_native
@pytest.mark.skipif(not native.cpu_has_amx_int8(), reason="needs a CPU with AMX-INT8 (csrc/cpu/amx.cpp)")
@pytest.mark.parametrize("m,n", [(40, 576), (77, 128), (33, 64)])
def test_int8_head_on_amx_tiles_equals_the_gemv(m, n):
    # int8_linear with bf16 activations: from 2 rows on AMX-INT8 CPUs the integer sums run on tiles
    # (the weight as the A tile, the activations' 16-bit parts as B tiles); the sums are the same
    # integers as the VNNI GEMV's (which a single row takes), so every output has the same bits.
    # m: weight rows past the last whole 16 (zero-padded tile); batches across 16-column blocks.
    w = torch.randint(-127, 128, (m, n), dtype=torch.int8, generator=torch.Generator().manual_seed(m))
    scale = torch.rand(m, generator=torch.Generator().manual_seed(n)) / 100
    for batch in (2, 16, 17, 33, 64):
        x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch)).bfloat16()
        y = torch.ops.lcqat.int8_linear(x, w, scale, None)
        rows = torch.cat([torch.ops.lcqat.int8_linear(x[b:b + 1], w, scale, None) for b in range(batch)])
        assert torch.equal(y, rows), batch
        assert torch.equal(y, _int8_a16_emulation(x, w, scale, None)), batch


@needs_native
@pytest.mark.skipif(not native.cpu_has_amx_int8(), reason="needs a CPU with AMX-INT8 (csrc/cpu/amx.cpp)")
def test_int8_head_on_amx_tiles_extremes_and_thread_chunks():
    # Many 16-row groups (several parallel chunks, chunks starting past row 0, a 12-row tail), the
    # weight's -128, and activations whose 16-bit parts reach h = +-127 and l = -128: still the
    # GEMV's bits, and the exact product within the input rounding.
    m, n = 1100, 64
    w = torch.randint(-128, 128, (m, n), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    w[:, 0] = -128
    scale = torch.rand(m, generator=torch.Generator().manual_seed(2)) / 100 + 1e-3
    x = torch.randn(24, n, generator=torch.Generator().manual_seed(3)).clamp(-3.9, 3.9)
    sign = torch.where(torch.arange(24) % 2 == 0, 1.0, -1.0)
    x[:, 0] = 4.0 * sign  # the row's max: q = +-32639, h = +-127
    x[:, 1] = (4.0 - 2.0 ** -5) * sign  # exact in bf16: q = +-32384 = 256 h - 128, l = -128
    x = x.bfloat16()
    y = torch.ops.lcqat.int8_linear(x, w, scale, None)
    rows = torch.cat([torch.ops.lcqat.int8_linear(x[b:b + 1], w, scale, None) for b in range(x.shape[0])])
    assert torch.equal(y, rows)
    assert torch.equal(y, _int8_a16_emulation(x, w, scale, None))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the row groups split across threads
        assert torch.equal(torch.ops.lcqat.int8_linear(x, w, scale, None), y)
    finally:
        torch.set_num_threads(old)


@needs_native
@pytest.mark.skipif(not native.cpu_has_amx_int8(), reason="needs a CPU with AMX-INT8")
def test_amx_switch_turns_off_both_amx_paths():
    code = ("import torch, optimum_lcqat.kernels.native as n; assert n.available(); "
            "print(n.cpu_has_amx_bf16(), n.cpu_has_amx_int8(), n.cpu_has_int8_a16(), n.cpu_has_bf16_dot())")
    out = subprocess.run([sys.executable, "-P", "-c", code], env={**os.environ, "OPTIMUM_LCQAT_CPU_AMX": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True", "True"], out


@needs_native
@pytest.mark.skipif(not native.cpu_has_amx_bf16(), reason="needs a CPU with AMX-BF16 (csrc/cpu/amx.cpp)")
@pytest.mark.parametrize("m,n,block", [(1536, 576, 128), (192, 576, 128), (77, 576, 128), (40, 64, 8), (96, 320, "full"),
                                       (128, 64, "full")])
@pytest.mark.parametrize("batch", [16, 64, 70])
def test_amx_layer_rows_equal_the_decode_path_and_round_like_bf16_products(m, n, block, batch):
    # lc_linear with bf16 activations of more than 8 rows on AMX CPUs: one pass over the rows (scale,
    # Hadamard, folding, bf16), then the AMX GEMM with the output Hadamard, scale and bias fused per
    # block of output rows (lcqat_ops.cpp amx_call). A row's result equals the same row in an 8-row
    # call (the decode path's AMX branch: 5-8 rows), bit for bit; block 8 outputs (tiles of 16 rows
    # hold two blocks), an output tail (77), and full-dimension rotations (left factors, or one block
    # of 128 for fewer blocks than threads: the output stage runs as a pass over the rows) included. Against the layer emulated in float64 with the folded
    # activations rounded to bf16, the gap is the fp32 sums and the last bits of z (see
    # test_amx_gemm_rounds_like_bf16_products) plus the output's rounding to bf16.
    w = lc_weight_from_dense(torch.randn(m, n, generator=torch.Generator().manual_seed(m)) / n**0.5,
                            hadamard_block_size=block)
    bias = torch.randn(m, generator=torch.Generator().manual_seed(1))
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch)).bfloat16()
    out = native.call_lc_linear_op(w, x, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (batch, m)
    chunks = torch.cat([native.call_lc_linear_op(w, x[i:i + 8], bias) for i in range(0, batch, 8)])
    assert torch.equal(out, chunks)
    xt = rotate(x.double() * w.s_u.double(), w.plan_in)
    z, c = fold_activations(xt, w.A.double(), w.beta.double())
    yt = bf16_products(z, c, reference.integer_codes(w, torch.float64))
    emulated = rotate(yt, w.plan_out, transpose=True) * w.s_v.double() + bias.double()
    excess = ((out.double() - emulated).abs() - emulated.abs() * 2.0 ** -8).clamp(min=0).max()
    assert excess <= 1e-3 * emulated.abs().max(), float(excess / emulated.abs().max())  # measured <= 3.1e-4
    assert float((out == emulated.bfloat16()).double().mean()) > 0.98  # measured >= 0.9967


@needs_native
@pytest.mark.skipif(not native.cpu_has_amx_bf16(), reason="needs a CPU with AMX-BF16 (csrc/cpu/amx.cpp)")
@pytest.mark.parametrize("m,n,block", [(1536, 576, 128), (576, 1536, 64), (192, 576, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_amx_layer_row_results_do_not_depend_on_the_batch(m, n, block, dtype):
    # A one-ulp fp32 difference before the outputs' rounding to bf16 changes about one output in 2^16:
    # enough rows (here ~600K outputs; 400 and 22 rows take the AMX GEMM's 32 x 32 C blocks, 8-row
    # chunks its 16 x 64 ones) make a row's result depending on the batch visible (an FMA-contracted
    # r * s_v + bias once did, when 5-8 rows took the decode path's unfused passes; since 2026-12-05
    # bf16 rows from 3 take the AMX layer whatever the batch). The whole batch runs on two threads, the
    # chunks on one: 192 rows (1.5 output blocks of 128) split the batch by rows between the threads,
    # the others their weight rows; fp32 rows multiply as three bf16 parts.
    w = lc_weight_from_dense(torch.randn(m, n, generator=torch.Generator().manual_seed(5)) / n**0.5,
                            hadamard_block_size=block)
    bias = torch.randn(m, generator=torch.Generator().manual_seed(6))
    x = torch.randn(400, n, generator=torch.Generator().manual_seed(7)).to(dtype)
    old = torch.get_num_threads()
    try:
        for rows in (x, x[:22], x[:37]):  # (8-row chunks, the last of 22 rows 6; 1-2 rows take the GEMV, other sums)
            torch.set_num_threads(2)
            out = native.call_lc_linear_op(w, rows, bias)
            torch.set_num_threads(1)
            chunks = torch.cat([native.call_lc_linear_op(w, rows[i:i + 8], bias) for i in range(0, rows.shape[0], 8)])
            assert torch.equal(out, chunks)
    finally:
        torch.set_num_threads(old)


def _split_bf16(z, parts):
    """z (float64 of fp32 values) as the sum of `parts` bf16 parts, each the remainder rounded."""
    out, r = torch.zeros_like(z), z.float()
    for _ in range(parts):
        p = r.bfloat16().float()
        out, r = out + p.double(), r - p
    return out


@needs_native
@pytest.mark.parametrize("m,n,block", [(576, 576, 128), (1536, 576, 64), (576, 576, "full")])
@pytest.mark.parametrize("batch", [2, 4, 13, 64, 300])
def test_fp32_activations_keep_fp32_accuracy(m, n, block, batch):
    # fp32 activations of 2+ rows on AMX CPUs multiply as three bf16 parts a row (hi + mid + lo = z
    # exactly; lcqat_ops.cpp amx_call), elsewhere in the fp32 GEMV / GEMM: either way as accurate as a
    # dense fp32 layer of the same dequantized weight (F.linear, the yardstick). A centred codebook is
    # the case that tells: the fp32 GEMV and GEMM once multiplied codes 0..3 and cancelled the offset
    # in the row constant, 1.0e-6 to 2.4e-6 of the largest output, 2-5x the dense layer's (centred now,
    # kernels.h; measured <= 1.7x dense, <= 6.4e-7, on every ISA tier). Two AMX parts (hi + mid, 16
    # bits) would leave 1.9e-6 to 3.8e-6 (emulated below: the bound tells them apart); "full": the
    # unfused row stages.
    w, bias = make_layer(m, n, seed=batch, block=block)
    w = dataclasses.replace(w, beta=-1.5 * w.A.sum(1) + 0.05 * torch.randn(4, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch))
    exact = oracle(w, x, bias)

    def err(y):
        return float((y.double() - exact).abs().max() / exact.abs().max())

    dense = err(torch.nn.functional.linear(x, w.dense().float(), bias))
    lc = err(native.call_lc_linear_op(w, x, bias))
    assert lc < 1e-6 and lc <= 2.0 * dense, (lc, dense)
    xt = rotate(x.double() * w.s_u.double(), w.plan_in)
    z, c = fold_activations(xt, w.A.double(), w.beta.double())
    q = reference.integer_codes(w, torch.float64)
    two_parts = _split_bf16(z, 2) @ (q - 1.5).T + c + 1.5 * z.sum(-1, keepdim=True)
    assert err(rotate(two_parts, w.plan_out, transpose=True) * w.s_v.double() + bias.double()) > 1.5e-6


@needs_native
@pytest.mark.skipif(not native.cpu_has_bf16_dot(), reason="needs a CPU with AVX512_BF16 (bf16 products)")
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_bf16_layer_is_as_accurate_as_a_dense_bf16_layer(batch):
    # With codes 0..3 the bf16 rounding of the folded activations added up around an offset that the
    # row constant cancelled again: here 0.7% (8 rows) and 1.5% (64) of the largest output (float64
    # emulation), 2.5-3.5x a dense bf16 layer. Centred codes (kernels.h) bring the LC layer's error to
    # the dense bf16 layer's (the same dequantized weight in bf16, torch's F.linear): measured
    # 0.25-0.34% against 0.29-0.41%. (1 row on VNNI CPUs: the 16-bit GEMV, exact sums.)
    m, n = 1536, 576
    w, _ = make_layer(m, n, seed=batch)
    # a codebook centred on zero, as fitted ones are (A q + beta for q in 0..3 around 0): the case
    # where the row constant cancels a large offset
    w = dataclasses.replace(w, beta=-1.5 * w.A.sum(1) + 0.05 * torch.randn(4, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch)).bfloat16()
    exact = oracle(w, x, None)
    dense = torch.nn.functional.linear(x, w.dense().bfloat16())

    def err(y):
        return float((y.double() - exact).abs().max() / exact.abs().max())

    assert err(native.call_lc_linear_op(w, x)) <= 1.5 * err(dense) + 1e-3, (err(native.call_lc_linear_op(w, x)), err(dense))


@needs_native
@pytest.mark.skipif(not native.cpu_has_amx_bf16(), reason="needs a CPU with AMX-BF16 (csrc/cpu/amx.cpp)")
def test_amx_layer_prefill_sized_call_takes_its_own_buffers_and_rows_stay_equal():
    # Above 4 MiB of buffers (here 1904 rows x 576) amx_call takes memory for the call instead of the
    # thread's kept buffers; then a serving-sized call reuses the kept ones again. Rows equal the
    # decode path's (8-row calls) in both.
    w, bias = make_layer(576, 576, seed=7)
    x = torch.randn(1904, 576, generator=torch.Generator().manual_seed(7)).bfloat16()
    big = native.call_lc_linear_op(w, x, bias)
    chunks = torch.cat([native.call_lc_linear_op(w, x[i:i + 8], bias) for i in range(0, x.shape[0], 8)])
    assert torch.equal(big, chunks)
    assert torch.equal(native.call_lc_linear_op(w, x[:64], bias), big[:64])
