"""In-flight quantization, packed save, reload without re-quantization, dequantize: tiny models
of several families, built and saved by the tests."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import TINY_FAMILIES, lc_names
from optimum_lcqat import LCLinear, LCQATConfig
from optimum_lcqat.init.common import rotated_start, rotation_plans
from optimum_lcqat.init.data_free import assign_and_fit
from optimum_lcqat.tensor.codebook import index_to_codes
from optimum_lcqat.tensor.packing import unpack_codes

IDS = torch.tensor([[1, 5, 17, 33, 90, 2, 7, 11, 200, 3]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# Relative logit error of the data-free 2-bit model against full precision on IDS, measured for
# seeds 0-3: llama and mistral 0.44-0.50, qwen2 0.45-0.55, qwen3 0.55-0.66, gemma 0.054-0.058
# (its embeddings, scaled by sqrt(hidden), dominate the residual stream), gemma3 0.74-0.81.
# Bounds: about 1.2x the largest. (Two unrelated logit vectors of the same norm are ~1.4 apart.)
LOGIT_ERR_BOUND = {"llama": 0.60, "mistral": 0.60, "qwen2": 0.66, "qwen3": 0.80, "gemma": 0.07, "gemma3": 0.97}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_quantize_save_reload_identical(family, tiny_fp_dirs, tmp_path):
    fp_dir = tiny_fp_dirs[family]
    dense = AutoModelForCausalLM.from_pretrained(fp_dir)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=LCQATConfig())
    names = lc_names(model)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in dense.modules())
    # every decoder linear converted, output embedding kept dense
    assert len(names) == n_linear - 1 and not any("lm_head" in n for n in names)
    assert isinstance(model.lm_head, torch.nn.Linear)
    ref = logits(model)
    assert torch.isfinite(ref).all()
    # each LC layer is a 2-bit approximation of its dense weight: relative Frobenius error measured
    # 0.346-0.353 (the largest over a model's layers, every family, seeds 0-3; the best 2-bit
    # scalar quantizer of a Gaussian leaves 0.343)
    for n in names:
        err = rel_err(model.get_submodule(n).dense_weight(), dense.get_submodule(n).weight)
        assert err < 0.37, (n, err)
    # the quantized model computes exactly the dense model with those weights (measured 1e-7 to 9e-7)
    effective = AutoModelForCausalLM.from_pretrained(fp_dir)
    with torch.no_grad():
        for n in names:
            effective.get_submodule(n).weight.copy_(model.get_submodule(n).dense_weight())
    assert rel_err(ref, logits(effective)) < 1e-5
    # so quantization changes the function, by what 2-bit weights cost these random tiny models
    err = rel_err(ref, logits(dense))
    assert 0.01 < err < LOGIT_ERR_BOUND[family], err

    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "lcqat" and cfg["format_version"] == 2

    # packed format on disk
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        name = names[0]
        codes = f.get_tensor(f"{name}.codes")
        layer = model.get_submodule(name)
        assert codes.dtype == torch.uint8 and codes.shape == (layer.out_features, layer.in_features // 4)
        for leaf in ("A", "beta", "s_u", "s_v"):
            assert f.get_tensor(f"{name}.{leaf}").dtype == torch.float16
    assert meta["lcqat_format_version"] == "2"
    assert not any(k.endswith(".latent") for k in keys)
    assert not any(k == f"{n}.weight" for n in names for k in keys)

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert lc_names(again) == names
    for n in names:
        assert torch.equal(again.get_submodule(n).codes, model.get_submodule(n).codes)
    assert torch.equal(logits(again), ref)


def test_reload_does_not_requantize(tiny_fp_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"], quantization_config=LCQATConfig())
    name = lc_names(model)[0]
    layer = model.get_submodule(name)
    # hand-edit the codes: a reload must return exactly these, not a fresh quantization
    with torch.no_grad():
        layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, dtype=torch.uint8))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.get_submodule(name).codes, layer.codes)


def test_passing_a_config_to_a_quantized_checkpoint_keeps_the_saved_one(tiny_fp_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"], quantization_config=LCQATConfig())
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=LCQATConfig(codebook="scalar"))
    assert again.config.quantization_config.codebook == "affine"
    assert torch.equal(logits(again), logits(model))


def test_bits_per_weight_of_converted_linears(tiny_fp_dirs, smollm2_lcqat, tmp_path):
    def stored_bits(m):
        return m.codes.numel() * 8 + 16 * (m.A.numel() + m.beta.numel() + m.s_u.numel() + m.s_v.numel())

    tiny = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["qwen3"], quantization_config=LCQATConfig())
    for m in tiny.modules():
        if isinstance(m, LCLinear):
            assert stored_bits(m) / (m.in_features * m.out_features) == pytest.approx(m.bits_per_weight())
    # The bound, on real layer sizes (A and beta, 320 bits a layer, vanish there):
    n_layers = 0
    for m in smollm2_lcqat[0].modules():
        if isinstance(m, LCLinear):
            mn = m.in_features * m.out_features
            assert stored_bits(m) / mn <= 2 + 16 * (m.in_features + m.out_features) / mn + 0.01
            n_layers += 1
    assert n_layers == 210


def test_dequantize_gives_dense_model_with_same_outputs(tiny_fp_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["mistral"], quantization_config=LCQATConfig())
    ref = logits(model)
    dense = model.dequantize()
    assert not lc_names(dense)
    assert not getattr(dense, "is_quantized", False)
    out = logits(dense)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_modules_to_not_convert(tiny_fp_dirs):
    cfg = LCQATConfig(modules_to_not_convert=["mlp.down_proj", "self_attn.o_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"], quantization_config=cfg)
    names = lc_names(model)
    assert names and not any(n.endswith(("down_proj", "o_proj", "lm_head")) for n in names)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_full_hadamard_and_scalar_codebook_models(tiny_fp_dirs, tmp_path):
    cfg = LCQATConfig(hadamard_block_size="full", codebook="scalar")
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["qwen2"], quantization_config=cfg)
    layer = model.model.layers[0].mlp.up_proj
    assert (layer.plan_in.left, layer.plan_in.right) == (12, 8)  # full Hadamard of 96 = Paley 12 x Sylvester 8
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization_config.hadamard_block_size == "full"
    assert torch.equal(logits(again), logits(model))


def test_model_with_no_convertible_layer_is_an_error(tiny_fp_dirs):
    with pytest.raises(ValueError, match="no linear layer to convert"):
        AutoModelForCausalLM.from_pretrained(
            tiny_fp_dirs["llama"], quantization_config=LCQATConfig(modules_to_not_convert=["model"])
        )


def test_quantization_is_deterministic_under_seed(tiny_fp_dirs):
    a = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"], quantization_config=LCQATConfig(seed=3))
    b = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"], quantization_config=LCQATConfig(seed=3))
    c = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"], quantization_config=LCQATConfig(seed=4))
    n = lc_names(a)[0]
    assert torch.equal(a.get_submodule(n).codes, b.get_submodule(n).codes)
    assert not torch.equal(a.get_submodule(n).s_u, c.get_submodule(n).s_u)


def test_affine_init_not_worse_than_scalar(tiny_fp_dirs):
    dense = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"])
    errs = {}
    for cb in ("scalar", "affine"):
        cfg = LCQATConfig(codebook=cb)
        model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"], quantization_config=cfg)
        err = 0.0
        for n in lc_names(model):
            w = dense.get_submodule(n).weight
            err += float((model.get_submodule(n).dense_weight() - w).norm() ** 2 / w.norm() ** 2)
        errs[cb] = err
        # The layer holds, unpacked, exactly the codes the initialiser assigns to the dense weight
        # (nearest codeword indices, two bits per coordinate), and every level occurs.
        n = lc_names(model)[0]
        linear = dense.get_submodule(n)
        start = rotated_start(linear.weight.detach(), cfg.seed, n, *rotation_plans(linear, cfg))
        idx, _, _ = assign_and_fit(start.what.reshape(-1, cfg.vector_dim), cfg.vector_dim, cb, cfg.init_iters)
        chosen = index_to_codes(idx, cfg.vector_dim).view(linear.out_features, linear.in_features)
        got = unpack_codes(model.get_submodule(n).codes)
        assert torch.equal(got, chosen)
        assert sorted(got.unique().tolist()) == [0, 1, 2, 3]
    assert errs["affine"] <= errs["scalar"] * 1.001
