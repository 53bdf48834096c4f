"""LCQATConfig: defaults, validation, serialisation, registration."""

import logging

import pytest
from transformers import AutoConfig
from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

from optimum_lcqat import FORMAT_VERSION, LCQATConfig, LCQATHfQuantizer


def test_defaults_are_valid():
    cfg = LCQATConfig()
    assert cfg.quant_method == "lcqat"
    assert (cfg.bits, cfg.vector_dim, cfg.codebook, cfg.hadamard_block_size) == (2, 4, "affine", 128)
    assert cfg.dataset is None and not cfg.uses_calibration
    assert cfg.format_version == FORMAT_VERSION


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"bits": 3}, "bits"),
        ({"vector_dim": 3}, "vector_dim"),
        ({"vector_dim": "4"}, "vector_dim"),
        ({"codebook": "lattice"}, "codebook"),
        ({"hadamard_block_size": 96}, "hadamard_block_size"),
        ({"hadamard_block_size": 0}, "hadamard_block_size"),
        ({"hadamard_block_size": True}, "hadamard_block_size"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
        ({"dataset": 42}, "dataset"),
        ({"num_samples": 0}, "num_samples"),
        ({"model_seqlen": -1}, "model_seqlen"),
        ({"init": "magic"}, "init"),
        ({"seed": 1.5}, "seed"),
        ({"format_version": FORMAT_VERSION + 1}, "format_version"),
    ],
)
def test_invalid_values_name_field_and_allowed(kwargs, field):
    with pytest.raises(ValueError, match=rf"invalid {field}=.*allowed"):
        LCQATConfig(**kwargs)


def test_ptq_without_data_is_refused():
    with pytest.raises(ValueError, match="dataset"):
        LCQATConfig(init="ptq")


def test_roundtrip_through_transformers_registry():
    cfg = LCQATConfig(codebook="scalar", hadamard_block_size="full", modules_to_not_convert=["mlp.down_proj"])
    again = AutoQuantizationConfig.from_dict(cfg.to_dict())
    assert isinstance(again, LCQATConfig) and again.to_dict() == cfg.to_dict()
    assert isinstance(AutoHfQuantizer.from_config(again), LCQATHfQuantizer)


def test_unknown_keys_warn_and_load(caplog):
    d = LCQATConfig().to_dict()
    d["future_option"] = 1
    with caplog.at_level(logging.WARNING):
        cfg = LCQATConfig.from_dict(d)
    assert "future_option" in caplog.text
    assert not hasattr(cfg, "future_option")


def test_calibration_objects_are_not_serialised():
    class Tok:
        name_or_path = "some/tokenizer"

    cfg = LCQATConfig(dataset=["a text"] * 3, tokenizer=Tok())
    d = cfg.to_dict()
    assert d["dataset"] is None and d["tokenizer"] == "some/tokenizer"
    assert cfg.to_json_string()  # JSON-serialisable


def test_reimport_registration_is_harmless():
    import importlib

    import optimum_lcqat._registration as reg
    import optimum_lcqat.quantizer as quantizer

    from transformers.quantizers import auto

    def registered():
        return auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get("lcqat"), auto.AUTO_QUANTIZER_MAPPING.get("lcqat")

    assert registered() == (LCQATConfig, LCQATHfQuantizer)
    quantizer._registered = False
    reg.register()  # second registration must not raise
    importlib.reload(importlib.import_module("optimum_lcqat"))
    # ... and leaves the method registered, to the same classes, and usable
    assert quantizer._registered and registered() == (LCQATConfig, LCQATHfQuantizer)
    cfg = AutoQuantizationConfig.from_dict({"quant_method": "lcqat", "codebook": "scalar"})
    assert type(cfg) is LCQATConfig and cfg.codebook == "scalar"
    assert type(AutoHfQuantizer.from_config(cfg)) is LCQATHfQuantizer
