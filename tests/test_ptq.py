"""Hessian-aware PTQ initialisation: quality against data-free, determinism, errors, end to end."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from optimum_lcqat import LCQATConfig
from optimum_lcqat.calibration import CalibrationDataError, calibration_samples, load_calibration_texts
from optimum_lcqat.convert import convertible_linears, lc_layers
from optimum_lcqat.init.ptq import quantize_weight_ptq
from optimum_lcqat.quant_api import quantize_linears_data_free, quantize_model_ptq
from optimum_lcqat.tensor.hadamard import plan_rotation


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from optimum_lcqat.assets import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="module")
def texts():
    from pydoc_data.topics import topics

    all_texts = [topics[k] for k in sorted(topics)]
    return {"calib": all_texts[::2], "heldout": all_texts[1::2]}


def tiny_llama(tok, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    model = tf.LlamaForCausalLM(cfg).to(torch.float32).eval()
    # Random init leaves tiny, structureless weights; give the linears some scale.
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "layers" in n:
                m.weight.mul_(4.0)
    return model


def ptq_config(texts, tok, **kw):
    base = dict(dataset=texts, tokenizer=tok, num_samples=8, model_seqlen=64, ptq_finetune_steps=10, ptq_batch_size=4)
    base.update(kw)
    return LCQATConfig(**base)


def _names(model):
    return convertible_linears(model, LCQATConfig(), ["lm_head"])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_ptq_beats_data_free_on_heldout_output(tok, texts):
    fp = tiny_llama(tok)
    names = _names(fp)
    df, pq = copy.deepcopy(fp), copy.deepcopy(fp)
    quantize_linears_data_free(df, names, LCQATConfig())
    report = quantize_model_ptq(pq, names, ptq_config(texts["calib"], tok))
    assert set(lc_layers(pq)) == set(names)
    ids = calibration_samples(texts["heldout"], tok, 4, 64, seed=1)  # text never calibrated on
    ref = _logits(fp, ids)
    err_df = float((_logits(df, ids) - ref).pow(2).mean())
    err_pq = float((_logits(pq, ids) - ref).pow(2).mean())
    assert err_pq < 0.85 * err_df, (err_pq, err_df)
    # Block fine-tuning never makes the held-out block error worse (it reverts when it would).
    for before, after in report.block_mse.values():
        assert after <= before
    assert all(0 <= e < 1 for e in report.errors.values())


def test_e2e_finetune_lowers_heldout_loss_and_keeps_codes(tok, texts, caplog):
    """The end-to-end stage tunes scales, codebooks and norms (never codes, embeddings or LC
    biases) and lowers the loss on text it never saw."""
    fp = tiny_llama(tok)
    names = _names(fp)
    base, e2e = copy.deepcopy(fp), copy.deepcopy(fp)
    quantize_model_ptq(base, names, ptq_config(texts["calib"], tok, num_samples=16, ptq_finetune_steps=0, ptq_e2e_steps=0))
    report = quantize_model_ptq(e2e, names, ptq_config(texts["calib"], tok, num_samples=16, ptq_finetune_steps=0,
                                                       ptq_e2e_steps=12, ptq_e2e_lr=1e-2))
    before, after = report.e2e_loss
    assert after < before, report.e2e_loss
    lb, le = lc_layers(base), lc_layers(e2e)
    for n in names:
        assert torch.equal(lb[n].codes, le[n].codes), n  # codes are the block-wise PTQ's
        assert not torch.equal(lb[n].s_v, le[n].s_v), n
    assert torch.equal(base.model.embed_tokens.weight, e2e.model.embed_tokens.weight)
    assert not torch.equal(base.model.norm.weight, e2e.model.norm.weight)
    assert [p.requires_grad for p in e2e.parameters()] == [p.requires_grad for p in base.parameters()]  # restored
    ids = calibration_samples(texts["heldout"], tok, 4, 64, seed=1)  # never calibrated on

    def loss(m):
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss)

    assert loss(e2e) < loss(base), (loss(e2e), loss(base))
    with pytest.raises(ValueError, match="ptq_e2e_steps"):
        LCQATConfig(ptq_e2e_steps=-1)
    fast = LCQATConfig.fast(num_samples=16)
    assert (fast.ptq_finetune_steps, fast.ptq_e2e_steps, fast.num_samples) == (0, 16, 16)
    thorough = LCQATConfig.thorough(num_samples=16)
    assert (thorough.ptq_finetune_steps, thorough.ptq_e2e_steps, thorough.num_samples) == (24, 64, 16)
    assert LCQATConfig.thorough(ptq_e2e_steps=32).ptq_e2e_steps == 32
    # one calibration sample leaves none to hold out: the stage is skipped, with the fix named
    one = copy.deepcopy(fp)
    with caplog.at_level(logging.WARNING, logger="optimum_lcqat.init.e2e"):
        r1 = quantize_model_ptq(one, names, ptq_config(texts["calib"], tok, num_samples=1, ptq_finetune_steps=0))
    assert all(math.isnan(v) for v in r1.e2e_loss)
    assert "raise num_samples or set ptq_e2e_steps=0" in caplog.text


def test_e2e_stage_in_a_bf16_from_pretrained_keeps_dtypes(tok, texts, tmp_path):
    """transformers refuses .float() on a quantized model: the stage casts tensor by tensor to
    float32 and back, and every tensor ends in the dtype it had."""
    from transformers import AutoModelForCausalLM

    tiny_llama(tok).save_pretrained(tmp_path / "fp")
    cfg = ptq_config(texts["calib"], tok, num_samples=8, ptq_finetune_steps=0, ptq_e2e_steps=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", dtype=torch.bfloat16, quantization_config=cfg)
    report = model._lcqat_ptq_report
    assert all(math.isfinite(v) for v in report.e2e_loss), report.e2e_loss
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", dtype=torch.bfloat16)
    ref_dtypes = {n: t.dtype for n, t in ref.named_buffers()} | {n: p.dtype for n, p in ref.named_parameters()}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if n in ref_dtypes and t.is_floating_point():
            assert t.dtype == ref_dtypes[n], (n, t.dtype, ref_dtypes[n])


def test_layer_ptq_beats_data_free_on_hessian_proxy():
    # A strongly anisotropic input distribution: the Hessian-aware codes must exploit it.
    g = torch.Generator().manual_seed(0)
    m, n = 64, 128
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(2048, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = x @ torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    H = x.T @ x / x.shape[0]
    from optimum_lcqat.init.data_free import init_data_free

    pi, po = plan_rotation(n, 128), plan_rotation(m, 128)
    from optimum_lcqat.init.common import LayerSpec

    spec = LayerSpec(vector_dim=4, codebook="affine", plan_in=pi, plan_out=po, seed=0, name="l")

    def out_err(result):
        e = result.weight.dense() - w
        return float(((e @ H) * e).sum() / ((w @ H) * w).sum())

    e_df = out_err(init_data_free(w, spec))
    e_pq = out_err(quantize_weight_ptq(w, H * 2048, spec))
    assert e_pq < 0.5 * e_df, (e_pq, e_df)


def test_ptq_deterministic_under_seed(tok, texts):
    def run(seed):
        model = tiny_llama(tok)
        cfg = ptq_config(texts["calib"], tok, seed=seed, num_samples=4, model_seqlen=32, ptq_finetune_steps=3)
        quantize_model_ptq(model, _names(model), cfg)
        return {n: (l.codes.clone(), l.A.detach().clone(), l.s_v.detach().clone()) for n, l in lc_layers(model).items()}

    a, b, c = run(0), run(0), run(1)
    for n in a:
        for x, y in zip(a[n], b[n]):
            assert torch.equal(x, y), n
    assert any(not torch.equal(a[n][0], c[n][0]) for n in a)


def test_layer_chains_in_threads_give_the_one_thread_result(tok, texts, monkeypatch):
    """The layers of a block are quantized a chain (the linears sharing a Hessian) per thread
    (quant_api.PTQ_WORKERS): the same codes and parameters, bit for bit, as one chain after another,
    and with the wide-layer rule (a layer above PARALLEL_PTQ_MAX_WEIGHTS runs alone) in force."""
    import optimum_lcqat.quant_api as qa

    def run(workers, max_weights=qa.PARALLEL_PTQ_MAX_WEIGHTS):
        monkeypatch.setattr(qa, "PTQ_WORKERS", workers)
        monkeypatch.setattr(qa, "PARALLEL_PTQ_MAX_WEIGHTS", max_weights)
        model = tiny_llama(tok)
        cfg = ptq_config(texts["calib"], tok, num_samples=4, model_seqlen=32, ptq_finetune_steps=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # two workers whatever this machine's default
        try:
            quantize_model_ptq(model, _names(model), cfg)
        finally:
            torch.set_num_threads(threads)
        return {k: v.clone() for k, v in model.state_dict().items()}

    one, two = run(1), run(2)
    ref = tiny_llama(tok)
    widest = max(ref.get_submodule(n).weight.numel() for n in _names(ref))
    mixed = run(2, max_weights=widest - 1)  # the widest chains alone first, the rest in threads
    assert one.keys() == two.keys() == mixed.keys()
    for k in one:
        assert torch.equal(one[k], two[k]) and torch.equal(one[k], mixed[k]), k


def test_calibration_errors(tok, tmp_path):
    model = tiny_llama(tok)
    names = _names(model)
    with pytest.raises(ValueError, match="empty"):
        quantize_model_ptq(model, names, ptq_config([], tok))
    with pytest.raises(ValueError, match="empty"):
        quantize_model_ptq(model, names, ptq_config(["   ", "\n"], tok))
    with pytest.raises(ValueError, match=r"num_samples=8 x model_seqlen=64 needs 512 tokens"):
        quantize_model_ptq(model, names, ptq_config(["a short text"] * 3, tok))
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration_texts(str(tmp_path / "missing.jsonl"))
    assert not lc_layers(model)  # nothing was half-converted
    f = tmp_path / "calib.jsonl"
    f.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_calibration_texts(str(f)) == ["one", "two"]
    with pytest.raises(ValueError, match="ptq_damp"):
        LCQATConfig(ptq_damp=0)
    with pytest.raises(ValueError, match="ptq_finetune_steps"):
        LCQATConfig(ptq_finetune_steps=-1)


def test_from_pretrained_ptq_end_to_end(tok, texts, tmp_path):
    from transformers import AutoModelForCausalLM

    fp_dir = tmp_path / "fp"
    tiny_llama(tok).save_pretrained(fp_dir)
    tok.save_pretrained(fp_dir)  # tokenizer=None: taken from the model's name_or_path
    cfg = ptq_config(texts["calib"], None, ptq_finetune_steps=4)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cfg, dtype=torch.float32)
    assert len(lc_layers(model)) == 14
    assert model.model.embed_tokens.weight is model.lm_head.weight  # tied, not converted
    ids = calibration_samples(texts["heldout"], tok, 2, 32, seed=0)
    before = _logits(model, ids)
    out = tmp_path / "q"
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert len(lc_layers(reloaded)) == 14
    assert torch.equal(_logits(reloaded, ids), before)  # the in-memory model is the saved one


def test_e2e_memory_savers_train_the_same_parameters(tok, texts):
    """The end-to-end stage's chunked loss and per-block checkpointing (the default) compute the same
    losses and steps as the model's own loss with every activation kept (ptq_options), up to fp32
    summation order; unknown ptq_options are refused with the allowed keys."""
    fp = tiny_llama(tok)
    names = _names(fp)
    runs = {}
    for savers in (True, False):
        m = copy.deepcopy(fp)
        cfg = ptq_config(texts["calib"], tok, num_samples=16, ptq_finetune_steps=0, ptq_e2e_steps=6, ptq_e2e_lr=1e-2,
                         ptq_options={"e2e_memory_savers": savers})
        runs[savers] = (quantize_model_ptq(m, names, cfg).e2e_loss, lc_layers(m))
    (loss_s, layers_s), (loss_p, layers_p) = runs[True], runs[False]
    assert loss_s == pytest.approx(loss_p, rel=1e-4)
    for n in names:
        torch.testing.assert_close(layers_s[n].s_v, layers_p[n].s_v, rtol=1e-3, atol=1e-5, msg=n)
    with pytest.raises(ValueError, match="e2e_memory_savers"):
        LCQATConfig(ptq_options={"e2e_memory_saver": False})
