"""What a checkpoint means is pinned: format version 2 records each layer's rotation plans, and
version-1 checkpoints (tests/data, made by the version-1 code, see tests/data/make_v1.py) still load
with identical logits."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_lcqat import FORMAT_VERSION, LCQATConfig
from optimum_lcqat.checkpoint import CheckpointError
from optimum_lcqat.nn import lc_layers
from optimum_lcqat.tensor.hadamard import plan_rotation

DATA = Path(__file__).parent / "data"
V1 = {"block128": 128, "full": "full"}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tag", sorted(V1))
def test_version_1_checkpoint_loads_with_identical_logits_and_resaves_as_version_2(tag, tmp_path):
    src = DATA / f"lcqat_v1_{tag}"
    assert json.loads((src / "config.json").read_text())["quantization_config"]["format_version"] == 1
    expected = load_file(str(src / "expected_logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    layers = lc_layers(model)
    assert len(layers) == 14
    for layer in layers.values():  # no record: the plans version-1 code chose for the config
        assert layer.plan_in == plan_rotation(layer.in_features, V1[tag])
        assert layer.plan_out == plan_rotation(layer.out_features, V1[tag])
    # The same logits up to fp32 rounding: a wrong rotation plan moves them by O(1); the kernels'
    # summation order (changed with the batched CPU GEMM, 2026-12-01: ~7e-7 relative) is not
    # what the format pins.
    got = logits(model, expected["input_ids"])
    assert float((got - expected["logits"]).abs().max()) <= 1e-5 * float(expected["logits"].abs().max())

    model.save_pretrained(tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_config"]["format_version"] == FORMAT_VERSION
    with safe_open(str(tmp_path / "v2" / "model.safetensors"), "pt") as f:
        assert f.metadata()["lcqat_format_version"] == str(FORMAT_VERSION)
        for name, layer in layers.items():
            assert f.get_tensor(f"{name}.rotation").tolist() == [list(layer.plan_in.record()), list(layer.plan_out.record())]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "v2", dtype=torch.float32)
    assert torch.equal(logits(again, expected["input_ids"]), got)  # resaved as v2: bit for bit the same model


def test_recorded_plans_win_over_the_config(tmp_path):
    # A version-2 checkpoint whose config names another block size still loads with the plans its
    # layers were quantized with: the record, not what the installed code would choose.
    src = DATA / "lcqat_v1_full"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = load_file(str(src / "expected_logits.safetensors"))["input_ids"]
    ref = logits(model, ids)
    model.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["hadamard_block_size"] = 16
    cfg_file.write_text(json.dumps(cfg))
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(layer.plan_in.left == 12 for layer in lc_layers(again).values())
    assert torch.equal(logits(again, ids), ref)


def _rewrite(path: Path, edit, metadata=None):
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata or meta)


def test_corrupted_rotation_record_and_format_version_are_refused(tmp_path):
    src = DATA / "lcqat_v1_block128"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(tmp_path / "ok")
    name = next(iter(lc_layers(model)))

    bad = tmp_path / "bad_record"
    shutil.copytree(tmp_path / "ok", bad)
    _rewrite(bad / "model.safetensors", lambda t: t.__setitem__(f"{name}.rotation", torch.tensor([[1, 7], [1, 32]], dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=rf"{name}.rotation: rotation record \(left=1, right=7\) does not describe dimension 96"):
        AutoModelForCausalLM.from_pretrained(bad)

    wrong_dtype = tmp_path / "bad_dtype"
    shutil.copytree(tmp_path / "ok", wrong_dtype)
    _rewrite(wrong_dtype / "model.safetensors", lambda t: t.__setitem__(f"{name}.rotation", t[f"{name}.rotation"].float()))
    with pytest.raises(CheckpointError, match="rotation has dtype F32; rotation records are int32"):
        AutoModelForCausalLM.from_pretrained(wrong_dtype)

    version = tmp_path / "bad_version"
    shutil.copytree(tmp_path / "ok", version)
    _rewrite(version / "model.safetensors", lambda t: None, metadata={"format": "pt", "lcqat_format_version": "two"})
    with pytest.raises(CheckpointError, match="lcqat_format_version='two' is not a whole number"):
        AutoModelForCausalLM.from_pretrained(version)


def test_format_2_checkpoint_missing_a_rotation_record_is_refused(tmp_path):
    # Version 1 wrote no records (its layers get recomputed plans, see above); from version 2 on
    # every layer has one, so a version-2 file without one is damaged and must not load with
    # plans the installed code recomputes (they can differ from the ones the layer was quantized with).
    model = AutoModelForCausalLM.from_pretrained(DATA / "lcqat_v1_block128", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ok")
    names = list(lc_layers(model))
    name = names[len(names) // 2]  # not the first layer: the check is per layer
    with safe_open(str(tmp_path / "ok" / "model.safetensors"), "pt") as f:
        assert f.metadata()["lcqat_format_version"] == "2"
    bad = tmp_path / "no_record"
    shutil.copytree(tmp_path / "ok", bad)
    _rewrite(bad / "model.safetensors", lambda t: t.pop(f"{name}.rotation"))
    with pytest.raises(CheckpointError, match=rf"{name}\.rotation is missing from a format-2 checkpoint") as err:
        AutoModelForCausalLM.from_pretrained(bad, dtype=torch.float32)
    assert f"layer {name} " in str(err.value) and "re-save" in str(err.value) and "re-quantize" in str(err.value)
    # The same file declaring version 1 (what version-1 code wrote) loads, with recomputed plans.
    _rewrite(bad / "model.safetensors", lambda t: None, metadata={"format": "pt", "lcqat_format_version": "1"})
    cfg_file = bad / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["format_version"] = 1
    cfg_file.write_text(json.dumps(cfg))
    again = AutoModelForCausalLM.from_pretrained(bad, dtype=torch.float32)
    assert lc_layers(again)[name].plan_in == plan_rotation(lc_layers(again)[name].in_features, 128)


def test_config_refuses_a_format_it_does_not_know():
    with pytest.raises(ValueError, match="format_version"):
        LCQATConfig(format_version=FORMAT_VERSION + 1)
    assert LCQATConfig(format_version=1).format_version == 1
