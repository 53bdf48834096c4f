"""Bad checkpoints fail loudly with errors that say what is wrong; nothing loads as garbage."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_lcqat import LCQATConfig
from optimum_lcqat.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def saved(tiny_fp_dirs, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"], quantization_config=LCQATConfig())
    out = tmp_path_factory.mktemp("lc_llama")
    model.save_pretrained(out)
    return out


def copy(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    return dst


def rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt", "lcqat_format_version": "1"})


def test_truncated_file(saved, tmp_path):
    d = copy(saved, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(d)


def test_garbage_header(saved, tmp_path):
    d = copy(saved, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupted|header"):
        AutoModelForCausalLM.from_pretrained(d)


def test_codes_wrong_dtype(saved, tmp_path):
    d = copy(saved, tmp_path)
    rewrite(d, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.codes", t["model.layers.0.mlp.up_proj.codes"].to(torch.int32)))
    with pytest.raises(CheckpointError, match="up_proj.codes has dtype I32.*uint8"):
        AutoModelForCausalLM.from_pretrained(d)


def test_codes_wrong_shape(saved, tmp_path):
    d = copy(saved, tmp_path)
    rewrite(d, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.codes", t["model.layers.0.mlp.up_proj.codes"][:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match=r"up_proj.codes has shape \[192, 23\], expected \[192, 24\]"):
        AutoModelForCausalLM.from_pretrained(d)


def test_missing_tensor(saved, tmp_path):
    d = copy(saved, tmp_path)
    rewrite(d, lambda t: t.pop("model.layers.1.self_attn.q_proj.s_v"))
    with pytest.raises(CheckpointError, match="q_proj.s_v is missing"):
        AutoModelForCausalLM.from_pretrained(d)


def test_config_does_not_match_tensors(saved, tmp_path):
    d = copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["vector_dim"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vector_dim does not match"):
        AutoModelForCausalLM.from_pretrained(d)


def test_nan_parameters(saved, tmp_path):
    d = copy(saved, tmp_path)

    def poison(t):
        t["model.layers.0.self_attn.k_proj.A"][0, 0] = float("nan")

    rewrite(d, poison)
    with pytest.raises(CheckpointError, match="k_proj.A holds NaN"):
        AutoModelForCausalLM.from_pretrained(d)


def test_lcqat_config_with_dense_weights(tiny_fp_dirs, tmp_path):
    d = tmp_path / "fake"
    shutil.copytree(tiny_fp_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = LCQATConfig().to_dict()
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no packed codes"):
        AutoModelForCausalLM.from_pretrained(d)


def test_newer_format_version_is_refused(saved, tmp_path):
    d = copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="newer optimum-lcqat"):
        AutoModelForCausalLM.from_pretrained(d)
