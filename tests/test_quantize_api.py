"""`optimum_lcqat.quantize(model, config)` on plain nn.Modules: the linears become LC layers, the
outputs stay close to the float ones, modules_to_not_convert is respected."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optimum_lcqat
from optimum_lcqat import LCQATConfig
from optimum_lcqat.convert import NoConvertibleLayerError
from optimum_lcqat.init.data_free import lc_weight_from_dense
from optimum_lcqat.nn import LCLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(64, 128)
        self.block = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128, bias=False))
        self.odd = nn.Linear(6, 6)  # in_features not a multiple of 4: stays dense
        self.head = nn.Linear(128, 32)

    def forward(self, x):
        h = self.proj_in(x)
        return self.head(h + self.block(h))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _float_model(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def test_sequential_data_free_close_to_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = model(x)
    out_model = optimum_lcqat.quantize(model, LCQATConfig(hadamard_block_size=64))
    assert out_model is model
    assert isinstance(model[0], LCLinear) and isinstance(model[2], LCLinear) and isinstance(model[1], nn.ReLU)
    with torch.no_grad():
        got = model(x)
    # 2-bit data-free weights of random (structureless) linears through two layers: measured 0.45;
    # the output is far from the float one's scale of 1 yet clearly the same function
    assert _rel(got, ref) < 0.6
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)) > 0.85


def test_custom_module_respects_modules_to_not_convert():
    model = _float_model()
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref = model(x)
    optimum_lcqat.quantize(model, LCQATConfig(modules_to_not_convert=["head"]))
    assert type(model.head) is nn.Linear and type(model.odd) is nn.Linear
    assert all(isinstance(m, LCLinear) for m in (model.proj_in, model.block[0], model.block[2]))
    with torch.no_grad():
        assert _rel(model(x), ref) < 0.5
    # the keyword replaces the config's list (transformers' patterns: "block.0" is a module prefix)
    model = _float_model()
    optimum_lcqat.quantize(model, LCQATConfig(), modules_to_not_convert=["block.0"])
    assert type(model.block[0]) is nn.Linear
    assert isinstance(model.block[2], LCLinear) and isinstance(model.head, LCLinear)


def test_the_layer_holds_what_the_initialiser_returned():
    """quantize swaps in exactly the initialiser's LCWeight (snapped to its 16-bit storage values)."""
    model = _float_model()
    w = model.block[0].weight.detach().clone()
    cfg = LCQATConfig(seed=3)
    optimum_lcqat.quantize(model, cfg)
    expected = lc_weight_from_dense(w, vector_dim=cfg.vector_dim, hadamard_block_size=cfg.hadamard_block_size,
                                    codebook=cfg.codebook, seed=3, name="block.0", iters=cfg.init_iters).snapped()
    layer = model.block[0]
    assert torch.equal(layer.codes, expected.codes)
    torch.testing.assert_close(layer.s_v, expected.s_v.to(layer.s_v.dtype))
    torch.testing.assert_close(layer.A, expected.A.to(layer.A.dtype))


def test_nothing_to_convert_raises():
    model = nn.Sequential(nn.Linear(6, 6))
    with pytest.raises(NoConvertibleLayerError):
        optimum_lcqat.quantize(model, LCQATConfig())
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(NoConvertibleLayerError):
        optimum_lcqat.quantize(model, LCQATConfig(), modules_to_not_convert=["0"])


def test_from_pretrained_goes_through_quantize(tmp_path, monkeypatch):
    """The transformers quantizer converts through optimum_lcqat.quantize (its skips passed on),
    and the result equals quantize() on the float model."""
    import transformers as tf

    from optimum_lcqat import quant_api

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    calls = []
    real = quant_api.quantize

    def spy(model, config=None, **kw):
        calls.append(kw.get("modules_to_not_convert"))
        return real(model, config, **kw)

    monkeypatch.setattr(quant_api, "quantize", spy)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=LCQATConfig())
    assert len(calls) == 1 and "lm_head" in calls[0]
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    real(plain, LCQATConfig())
    lc = {n: m for n, m in model.named_modules() if isinstance(m, LCLinear)}
    assert lc and set(lc) == {n for n, m in plain.named_modules() if isinstance(m, LCLinear)}
    assert type(model.lm_head) is nn.Linear
    for n, m in lc.items():
        assert torch.equal(m.codes, plain.get_submodule(n).codes)


def test_a_transformers_model_quantized_directly_saves_and_reloads_as_lcqat(tmp_path):
    """quantize() on a loaded transformers model (what the CLI and the demo do): the same layers
    as from_pretrained(quantization_config=...) gives, and save_pretrained writes an lcqat
    checkpoint that reloads to the same logits."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "fp")
    assert optimum_lcqat.quantize(model, LCQATConfig()) is model
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=LCQATConfig())
    lc = {n: m for n, m in model.named_modules() if isinstance(m, LCLinear)}
    assert lc and set(lc) == {n for n, m in loaded.named_modules() if isinstance(m, LCLinear)}
    for n, m in lc.items():
        assert torch.equal(m.codes, loaded.get_submodule(n).codes)
    model.save_pretrained(tmp_path / "lc")
    saved = (tmp_path / "lc" / "config.json").read_text()
    assert '"quant_method": "lcqat"' in saved
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "lc")
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
