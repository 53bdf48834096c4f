"""Storage of the non-LC tensors: ``dense_dtype`` and the int8 lm_head (``lm_head_int8``).

Tiny llama (untied lm_head) and tiny gemma (lm_head tied to the embedding): the file's tensor
bytes shrink by exactly what each choice stores less, and save -> from_pretrained gives back the
in-memory model: the int8 head bit for bit, the same logits, no missing/unexpected keys and no
warning."""

import json
import logging
import shutil
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_lcqat import Int8Linear, LCQATConfig, compact_lm_head
from optimum_lcqat.checkpoint import CheckpointError
from optimum_lcqat.dense_storage import prepare_int8_head

IDS = torch.tensor([[1, 5, 17, 33, 90, 2, 7, 11, 200, 3]])
FAMILIES = {"llama": False, "gemma": True}  # family -> lm_head tied to the input embedding


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def tensor_bytes(path) -> dict[str, tuple[str, int]]:
    """``{key: (dtype, bytes)}`` from a safetensors header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


@contextmanager
def transformers_warnings():
    """WARNING records of transformers' loggers (they do not propagate to the root logger)."""
    records = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = H(level=logging.WARNING)
    lg = logging.getLogger("transformers")
    lg.addHandler(h)
    try:
        yield records
    finally:
        lg.removeHandler(h)


def quantized(fp_dir, **cfg):
    return AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=LCQATConfig(**cfg))


def save_and_load(model, path, **load_kw):
    model.save_pretrained(path)
    with transformers_warnings() as warned:
        again, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **load_kw)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert warned == [], warned
    return again, tensor_bytes(path / "model.safetensors")


def round_dense_to_bf16_(model):
    """What a bf16 save does to the non-LC float tensors, done in memory."""
    from optimum_lcqat import LCLinear

    lc = {f"{n}." for n, m in model.named_modules() if isinstance(m, LCLinear)}
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():  # saved tensors only (not rotary inv_freq)
            if t.is_floating_point() and name.rpartition(".")[0] + "." not in lc and not name.endswith(".scale"):
                t.copy_(t.to(torch.bfloat16).to(t.dtype))


# ------------------------------------------------------------------------------- config
def test_config_fields_default_validate_and_serialise():
    cfg = LCQATConfig()
    assert cfg.dense_dtype is None and cfg.lm_head_int8 is False
    cfg = LCQATConfig(dense_dtype=torch.bfloat16, lm_head_int8=True)
    assert cfg.dense_dtype == "bfloat16"  # a torch dtype is stored as its JSON-safe name
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["dense_dtype"] == "bfloat16" and d["lm_head_int8"] is True
    back = LCQATConfig.from_dict(d)
    assert back.dense_dtype == "bfloat16" and back.lm_head_int8 is True
    # a config saved before these fields existed loads with the defaults
    old = {k: v for k, v in LCQATConfig().to_dict().items() if k not in ("dense_dtype", "lm_head_int8")}
    assert LCQATConfig.from_dict(old).dense_dtype is None
    for bad in ("bf16", "float32", "int8", 16, torch.float32):
        with pytest.raises(ValueError, match=r"invalid dense_dtype=.*'bfloat16' or 'float16'"):
            LCQATConfig(dense_dtype=bad)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"invalid lm_head_int8=.*True or False"):
            LCQATConfig(lm_head_int8=bad)


# ------------------------------------------------------------------------------- sizes and round trips
@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_bf16_halves_exactly_the_non_lc_tensors(family, tiny_fp_dirs, tmp_path):
    tied = FAMILIES[family]
    model = quantized(tiny_fp_dirs[family])
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    base, base_bytes = save_and_load(model, tmp_path / "fp32")
    small_model = quantized(tiny_fp_dirs[family], dense_dtype="bfloat16")
    again, small_bytes = save_and_load(small_model, tmp_path / "bf16")

    assert set(small_bytes) == set(base_bytes)
    assert ("lm_head.weight" in base_bytes) == (not tied)  # a tied head is saved once, as the embedding
    lc = {k.rpartition(".")[0] + "." for k in base_bytes if k.endswith(".codes")}
    n_dense = 0
    for key, (dtype, nbytes) in base_bytes.items():
        if key.rpartition(".")[0] + "." in lc:
            assert small_bytes[key] == (dtype, nbytes), key  # LC layers untouched
        else:
            assert dtype == "F32" and small_bytes[key] == ("BF16", nbytes // 2), key
            n_dense += 1
    assert n_dense >= 3  # embedding, norms (and the untied head)
    saved = sum(b for _, b in base_bytes.values()) - sum(b for _, b in small_bytes.values())
    assert saved == sum(b for k, (_, b) in base_bytes.items() if k.rpartition(".")[0] + "." not in lc) // 2
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < (tmp_path / "fp32" / "model.safetensors").stat().st_size

    # bf16 tensors load into the fp32 model (transformers' cast) and give the rounded model's logits
    assert again.get_input_embeddings().weight.dtype == torch.float32
    assert (again.lm_head.weight is again.get_input_embeddings().weight) == tied
    assert torch.equal(logits(base), logits(model))
    round_dense_to_bf16_(small_model)
    assert torch.equal(logits(again), logits(small_model))
    assert again.config.quantization_config.dense_dtype == "bfloat16"


@pytest.mark.parametrize("dense_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_int8_lm_head_round_trip(family, dense_dtype, tiny_fp_dirs, tmp_path):
    tied = FAMILIES[family]
    fp_dir = tiny_fp_dirs[family]
    model = quantized(fp_dir, dense_dtype=dense_dtype, lm_head_int8=True)
    assert type(model.lm_head) is torch.nn.Linear  # the config is about storage; memory keeps the dense head
    _, plain_bytes = save_and_load(quantized(fp_dir, dense_dtype=dense_dtype), tmp_path / "plain")
    again, int8_bytes = save_and_load(model, tmp_path / "int8")

    m, n = model.lm_head.weight.shape
    assert int8_bytes["lm_head.weight_int8"] == ("I8", m * n)
    assert int8_bytes["lm_head.scale"] == ("F32", 4 * m)
    assert "lm_head.weight" not in int8_bytes
    emb = "model.embed_tokens.weight"
    assert int8_bytes[emb] == plain_bytes[emb]  # the embedding stays as it is, tied or not
    added = sum(b for _, b in int8_bytes.values()) - sum(b for _, b in plain_bytes.values())
    head_bytes = 0 if tied else plain_bytes["lm_head.weight"][1]  # a tied head had no bytes of its own
    assert added == m * n + 4 * m - head_bytes

    # the loaded head is the in-memory compact head, bit for bit, and untied from the embedding
    compact_lm_head(model)
    assert isinstance(again.lm_head, Int8Linear) and again.lm_head.bias is None
    assert again.lm_head.weight_int8.dtype == torch.int8 and again.lm_head.scale.dtype == torch.float32
    assert torch.equal(again.lm_head.weight_int8, model.lm_head.weight_int8)
    assert torch.equal(again.lm_head.scale, model.lm_head.scale)
    assert "lm_head.weight" not in again.all_tied_weights_keys
    if dense_dtype is None:
        assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    else:
        round_dense_to_bf16_(model)
    assert torch.equal(logits(again), logits(model))

    # a later tie_weights() (as resize_token_embeddings calls) does not tie the embedding into it
    again.tie_weights()
    assert not hasattr(again.lm_head, "weight") and torch.equal(logits(again), logits(model))
    # saving the loaded model again writes the same tensors
    third, third_bytes = save_and_load(again, tmp_path / "again")
    assert third_bytes == int8_bytes
    assert torch.equal(third.lm_head.weight_int8, model.lm_head.weight_int8)


def test_int8_head_loads_into_a_bf16_model_with_fp32_scale(tiny_fp_dirs, tmp_path):
    model = quantized(tiny_fp_dirs["gemma"], lm_head_int8=True, dense_dtype="bfloat16")
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    compact_lm_head(model)
    assert again.get_input_embeddings().weight.dtype == torch.bfloat16
    assert again.lm_head.scale.dtype == torch.float32 and torch.equal(again.lm_head.scale, model.lm_head.scale)
    assert torch.equal(again.lm_head.weight_int8, model.lm_head.weight_int8)
    assert torch.isfinite(logits(again)).all()


def test_compact_lm_head_in_memory_is_persisted(tiny_fp_dirs, tmp_path):
    """A head compacted after loading is saved as int8 too (it used to be lost on save)."""
    model = quantized(tiny_fp_dirs["gemma"])
    head = compact_lm_head(model)
    assert compact_lm_head(model) is head  # idempotent
    again, nbytes = save_and_load(model, tmp_path)
    assert "lm_head.weight_int8" in nbytes and isinstance(again.lm_head, Int8Linear)
    assert torch.equal(logits(again), logits(model))


# ------------------------------------------------------------------------------- errors
def _layout(m=256, n=96):
    return {"lm_head.weight_int8": ("I8", (m, n)), "lm_head.scale": ("F32", (m,))}


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda l: l.pop("lm_head.scale"), "lm_head.scale is missing"),
        (lambda l: l.update({"lm_head.scale": ("F16", (256,))}), r"lm_head.scale is F16 \[256\], expected F32 \[256\]"),
        (lambda l: l.update({"lm_head.weight_int8": ("I8", (256, 64))}), r"expected I8 \[256, 96\]"),
        (lambda l: l.update({"lm_head.weight": ("F32", (256, 96))}), "both an int8 weight and a dense weight"),
        (lambda l: l.update({"model.head2.weight_int8": ("I8", (4, 4))}), None),
    ],
)
def test_inconsistent_int8_head_layout_is_a_checkpoint_error(edit, match, tiny_fp_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"])
    layout = _layout()
    edit(layout)
    if match is None:  # an int8 tensor elsewhere than the head is ignored when the head's is there
        assert prepare_int8_head(model, layout) == "lm_head" and isinstance(model.lm_head, Int8Linear)
        return
    with pytest.raises(CheckpointError, match=match):
        prepare_int8_head(model, layout)
    other = {"model.head2.weight_int8": ("I8", (4, 4))}
    with pytest.raises(CheckpointError, match="output projection is 'lm_head'"):
        prepare_int8_head(AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"]), other)


def test_lm_head_int8_refuses_a_head_that_is_not_dense(tiny_fp_dirs, tmp_path):
    model = quantized(tiny_fp_dirs["llama"], lm_head_int8=True)
    model.set_output_embeddings(torch.nn.Identity())  # stands for any non-Linear head
    with pytest.raises(ValueError, match="lm_head_int8=True but the output projection 'lm_head' is a Identity"):
        model.save_pretrained(tmp_path)


def test_cli_quantize_flags(tiny_fp_dirs, smollm2_dir, tmp_path):
    from optimum_lcqat.cli import main

    src = tmp_path / "src"
    shutil.copytree(tiny_fp_dirs["gemma"], src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, src / f)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--dense-dtype", "bfloat16", "--lm-head-int8"]) == 0
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["dense_dtype"] == "bfloat16" and qcfg["lm_head_int8"] is True
    nbytes = tensor_bytes(out / "model.safetensors")
    assert nbytes["lm_head.weight_int8"][0] == "I8" and nbytes["model.embed_tokens.weight"][0] == "BF16"
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(src), str(tmp_path / "x"), "--dense-dtype", "float32"])
    assert exc.value.code == 2
