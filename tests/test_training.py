"""LC-QAT training with the real HF Trainer on a tiny Llama: codes flip, checkpoints are packed
lcqat checkpoints, resume is exact, NaN stops the run, distillation, LoRA, torch.compile,
and real 2-process `accelerate launch` runs (DDP, and FSDP2, over gloo)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import lc_names, make_tiny_model, run_process_group
from safetensors import safe_open

from optimum_lcqat import LCLinear, LCQATConfig

transformers = pytest.importorskip("transformers")
from transformers import TrainerCallback, AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from optimum_lcqat.training import (  # noqa: E402
    TRAINING_STATE_NAME,
    LCQATCallback,
    LCQATTrainer,
    NonFiniteTrainingError,
)

SEQ = 32
VOCAB = 256
REPO = Path(__file__).resolve().parents[1]


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length sequences from a seeded random walk over the vocabulary (learnable structure)."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        steps = torch.randint(-3, 4, (n, SEQ), generator=g)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (start + steps.cumsum(1)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp_llama")
    make_tiny_model("llama").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def lc_dir(tmp_path_factory, fp_dir):
    d = tmp_path_factory.mktemp("lc_llama")
    m = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=LCQATConfig(), dtype=torch.float32)
    m.save_pretrained(d)
    return d


def load_lc(lc_dir):
    return AutoModelForCausalLM.from_pretrained(lc_dir, dtype=torch.float32)


def targs(out, **kw):
    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=3e-2, max_steps=6,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        seed=0, data_seed=0, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def codes_of(model):
    """Packed codes per LC layer, keyed by the layer's name in the bare model (peft wrapping removed)."""
    return {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): m.codes.clone()
        for n, m in model.named_modules()
        if isinstance(m, LCLinear)
    }


def test_plain_trainer_callback_trains_flips_and_saves_packed(lc_dir, tmp_path):
    model = load_lc(lc_dir)
    start = codes_of(model)
    cb = LCQATCallback(max_tokens=5 * 4 * SEQ)
    trainer = Trainer(model=model, args=targs(tmp_path / "run", save_strategy="steps", save_steps=2),
                      train_dataset=TokenDataset(), callbacks=[cb])
    # deterministic selection: LC params and norms train, embeddings do not
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".latent") for n in names) and any("norm" in n for n in names)
    assert not any("embed_tokens" in n for n in names)
    from optimum_lcqat._heap import heap_holders

    held, ckpt = [], []
    class HeapProbe(TrainerCallback):  # after LCQATCallback's on_train_begin: the heap is held while training
        def on_step_end(self, args, state, control, **kwargs):
            held.append(heap_holders())
            ckpt.append(model.is_activation_checkpointing and model.forward.__name__ == "forward" and "forward" in vars(model))

    trainer.add_callback(HeapProbe())
    result = trainer.train()
    # the retained training heap was held during the steps and is given back at the end (_heap)
    assert held and min(held) >= 1 and heap_holders() == 0 and not cb._heap_held
    # activation checkpointing and the chunked loss were in place for the steps, and are gone after
    assert ckpt and all(ckpt) and not model.is_activation_checkpointing and "forward" not in vars(model)
    # token budget: 5 steps of 4 x 32 tokens, then stop
    assert trainer.state.global_step == 5 and cb.tokens_trained == 5 * 4 * SEQ
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    logged = [h for h in trainer.state.log_history if "lcqat/flip_share" in h]
    assert len(logged) == 5 and all(h["lcqat/bits_per_weight"] > 2.0 for h in logged)
    assert sum(r["flipped"] for r in cb.history) > 0, "no code flipped"
    # back to inference mode, codes changed, latents gone
    assert all(m.latent is None for m in model.modules() if isinstance(m, LCLinear))
    end = codes_of(model)
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert result.global_step == 5
    # every checkpoint is a packed lcqat checkpoint (+ the training-state file)
    ck = tmp_path / "run" / "checkpoint-4"
    assert (ck / TRAINING_STATE_NAME).is_file()
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any(k.endswith(".latent") for k in keys)
        code_keys = [k for k in keys if k.endswith(".codes")]
        assert code_keys and all(f.get_tensor(k).dtype == torch.uint8 for k in code_keys)
        assert f.get_tensor(code_keys[0].replace(".codes", ".A")).dtype == torch.float16
    assert json.loads((ck / "config.json").read_text())["quantization_config"]["quant_method"] == "lcqat"
    reloaded = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    assert lc_names(reloaded) == lc_names(model)
    # final save: packed, and reloads to the same function as the in-memory model
    out = tmp_path / "final"
    model.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = TokenDataset(2, seed=5).ids
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_max_flip_share_caps_code_changes_per_step(lc_dir, tmp_path):
    model = load_lc(lc_dir)
    share = 2e-3
    cb = LCQATCallback(max_flip_share=share)
    caps = sum(int(share * m.in_features * m.out_features) for m in model.modules() if isinstance(m, LCLinear))
    Trainer(model=model, args=targs(tmp_path / "cap", learning_rate=1e-1), train_dataset=TokenDataset(),
            callbacks=[cb]).train()
    assert all(r["flipped"] <= caps for r in cb.history), [r["flipped"] for r in cb.history]
    assert sum(r["held_back"] for r in cb.history) > 0, "the cap never engaged: the test would prove nothing"
    assert sum(r["flipped"] for r in cb.history) > 0
    with pytest.raises(ValueError, match="max_flip_share"):
        LCQATCallback(max_flip_share=2.0)


def test_run_too_short_to_move_any_code_says_so(lc_dir, tmp_path, caplog):
    # Latents start half a code from the nearest bin edge and Adam moves them ~lr a step: at
    # lr 1e-4 no code of this model can change for hundreds of steps. The run still trains (scales,
    # codebook, norms), and the callback says up front why the flip share will stay 0.
    model = load_lc(lc_dir)
    cb = LCQATCallback()
    trainer = Trainer(model=model, args=targs(tmp_path / "run", learning_rate=1e-4, max_steps=2),
                      train_dataset=TokenDataset(), callbacks=[cb])
    alpha = max(m.alpha for m in model.modules() if isinstance(m, LCLinear))
    first = cb.earliest_code_change_step(1e-4)
    assert first == math.ceil(0.5 / (alpha * 1e-4)) and first > 2
    assert cb.earliest_code_change_step(1e-4 * 1000) <= 2  # what lr_scale={"latent": 1000} would allow
    with caplog.at_level("WARNING", logger="optimum_lcqat.training.callback"):
        trainer.train()
    assert any("codes can hardly change in this run" in r.getMessage() for r in caplog.records)
    assert sum(r["flipped"] for r in cb.history) == 0
    # a run that can move codes (lr 3e-2, 6 steps, as in the test above) gets no such warning
    caplog.clear()
    model2 = load_lc(lc_dir)
    with caplog.at_level("WARNING", logger="optimum_lcqat.training.callback"):
        Trainer(model=model2, args=targs(tmp_path / "run2", max_steps=6), train_dataset=TokenDataset(),
                callbacks=[LCQATCallback()]).train()
    assert not any("codes can hardly change" in r.getMessage() for r in caplog.records)


def test_resume_is_exact(lc_dir, tmp_path):
    import shutil

    def run(out, resume=None, max_steps=6):
        model = load_lc(lc_dir)
        tr = LCQATTrainer(model=model, args=targs(out, save_strategy="steps", save_steps=3, max_steps=max_steps),
                          train_dataset=TokenDataset())
        tr.train(resume_from_checkpoint=resume)
        return model, tr

    # uninterrupted run: 6 steps, writing checkpoint-3 on the way
    full, _ = run(tmp_path / "a")
    # the interrupted run: a new process-like start (fresh model and trainer) from checkpoint-3
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed, tr_c = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-3"))
    assert tr_c.lcqat.resumed_exactly is True and tr_c.state.global_step == 6
    ca, cc = codes_of(full), codes_of(resumed)
    assert sum(int((ca[k] != codes_of(load_lc(lc_dir))[k]).sum()) for k in ca) > 0, "no code flipped"
    assert all(torch.equal(ca[k], cc[k]) for k in ca), "resumed run reached different codes"
    sa, sc = full.state_dict(), resumed.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sc[k], rtol=0, atol=0)
    # without the training-state file, resume still runs but is flagged as not exact
    (tmp_path / "c").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "c" / "checkpoint-3")
    os.remove(tmp_path / "c" / "checkpoint-3" / TRAINING_STATE_NAME)
    _, tr_d = run(tmp_path / "c", resume=True, max_steps=4)
    assert tr_d.lcqat.resumed_exactly is False and tr_d.state.global_step == 4


def test_resume_never_takes_another_checkpoints_training_state(lc_dir, tmp_path, caplog):
    # The Trainer resumes from checkpoint-2 (codes, optimizer, scheduler of step 2). The training
    # state of another step (checkpoint-4's, the newest in output_dir) must not be loaded, and the
    # resume must not be reported as exact.
    import shutil

    def trainer(out, max_steps=4, **kw):
        return Trainer(model=load_lc(lc_dir), train_dataset=TokenDataset(),
                   args=targs(out, save_strategy="steps", save_steps=2, max_steps=max_steps), **kw)

    trainer(tmp_path / "a", callbacks=[LCQATCallback()]).train()
    a2, a4 = tmp_path / "a" / "checkpoint-2", tmp_path / "a" / "checkpoint-4"
    with safe_open(str(a4 / TRAINING_STATE_NAME), "pt") as f:
        assert f.metadata()["global_step"] == "4"  # each training-state file records its step

    # a plain Trainer resuming from a folder outside output_dir, whose newest checkpoint is another step's
    (tmp_path / "b").mkdir()
    shutil.copytree(a4, tmp_path / "b" / "checkpoint-4")
    cb = LCQATCallback()
    tr = trainer(tmp_path / "b", max_steps=3, callbacks=[cb])
    with caplog.at_level("WARNING", logger="optimum_lcqat.training.callback"):
        tr.train(resume_from_checkpoint=str(a2))
    assert tr.state.global_step == 3 and cb.resumed_exactly is False
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "resume at step 2 is NOT exact" in msg and "checkpoint-2" in msg and "LCQATTrainer" in msg

    # the folder resumed from holds a training-state file of another step: not loaded either
    (tmp_path / "c").mkdir()
    shutil.copytree(a2, tmp_path / "c" / "checkpoint-2")
    shutil.copy(a4 / TRAINING_STATE_NAME, tmp_path / "c" / "checkpoint-2" / TRAINING_STATE_NAME)
    caplog.clear()
    c2 = str(tmp_path / "c" / "checkpoint-2")
    cb = LCQATCallback(resume_from_checkpoint=c2)  # what LCQATTrainer.train(resume_from_checkpoint=...) sets
    tr = trainer(tmp_path / "c", max_steps=3, callbacks=[cb])
    with caplog.at_level("WARNING", logger="optimum_lcqat.training.callback"):
        tr.train(resume_from_checkpoint=c2)
    assert tr.state.global_step == 3 and cb.resumed_exactly is False
    assert any("was saved at step 4, not at step 2" in r.getMessage() for r in caplog.records)


def test_training_state_for_another_model_is_refused_with_what_differs(lc_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from optimum_lcqat.training.state import load_training_state, save_training_state

    model = load_lc(lc_dir)
    LCQATCallback().prepare(model)
    save_training_state(model, str(tmp_path))
    path = tmp_path / TRAINING_STATE_NAME
    sd = load_file(path)
    assert load_training_state(model, str(tmp_path))  # its own file loads
    key = next(k for k in sd if k.endswith(".latent"))
    save_file({**sd, "model.extra.latent": sd[key].clone()}, path)
    with pytest.raises(ValueError, match="1 unexpected"):
        load_training_state(model, str(tmp_path))
    save_file({**sd, key: sd[key][:-1].clone()}, path)
    with pytest.raises(ValueError, match=f"{key} has shape"):
        load_training_state(model, str(tmp_path))


def test_nan_stops_run_and_keeps_last_good_checkpoint(lc_dir, tmp_path):
    model = load_lc(lc_dir)
    out = tmp_path / "nan"
    trainer = Trainer(model=model, args=targs(out, save_strategy="steps", save_steps=2, max_steps=8),
                      train_dataset=TokenDataset(), callbacks=[LCQATCallback()])
    state = {"calls": 0}

    def poison(module, args, output):  # from the 4th forward on, the hidden states turn NaN
        state["calls"] += 1
        if state["calls"] >= 4:
            return output * float("nan")
        return output

    model.model.layers[0].mlp.register_forward_hook(poison)
    with pytest.raises(NonFiniteTrainingError, match="non-finite gradient at step 4"):
        trainer.train()
    ck = out / "checkpoint-2"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    good = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in good.parameters())
    # LCQATTrainer checks the loss itself, before backward
    model2 = load_lc(lc_dir)
    model2.model.layers[0].mlp.register_forward_hook(lambda m, a, o: o * float("inf"))
    tr2 = LCQATTrainer(model=model2, args=targs(tmp_path / "nan2"), train_dataset=TokenDataset())
    with pytest.raises(NonFiniteTrainingError, match="the loss is nan"):
        tr2.train()


class CharTokenizer:
    """One token per character (ids 1..255), EOS 0: enough of a tokenizer for the data path."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 255 for c in text]}


def test_token_windows_and_the_qat_recipe_built_on_them(lc_dir):
    from optimum_lcqat.data import token_windows
    from optimum_lcqat.training.recipes import run_qat

    tok = CharTokenizer()
    texts = ["abcd" * 20, "wxyz" * 20]
    stream = tok(texts[0])["input_ids"] + [0] + tok(texts[1])["input_ids"] + [0]
    ds = token_windows(texts, tok, seqlen=SEQ, max_tokens=100)
    assert len(ds) == 100 // SEQ  # at most 100 tokens, the short tail dropped
    for i in range(len(ds)):
        assert ds[i]["input_ids"].tolist() == stream[i * SEQ:(i + 1) * SEQ]
        assert torch.equal(ds[i]["labels"], ds[i]["input_ids"])
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(["ab"], tok, SEQ)

    model = load_lc(lc_dir)
    report = run_qat(model, tok, texts * 4, tokens=2 * 4 * SEQ, seqlen=SEQ, batch_size=4, lr=3e-2)
    assert report["steps"] == 2 and report["tokens"] == 2 * 4 * SEQ and math.isfinite(report["final_loss"])
    assert not model.training and all(m.latent is None for m in model.modules() if isinstance(m, LCLinear))


def _fp16_loss_scaling(trainer, init_scale):
    # accelerate gives fp16 loss scaling (a GradScaler in the AcceleratedOptimizer) only on
    # accelerators, never on the CPU. The same machinery runs here with a real
    # torch.amp.GradScaler("cpu") handed to the Trainer's accelerator before train() prepares the
    # optimizer: accelerator.backward scales the loss, AcceleratedOptimizer.step lets the scaler
    # skip overflowing steps and lower the scale. (No fp16 autocast: the CPU run stays float32,
    # and a huge initial scale makes the scaled gradients overflow the way fp16 ones do.)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return trainer.accelerator.scaler


def test_fp16_loss_scaler_overflow_skips_are_not_a_divergence(lc_dir, tmp_path):
    model = load_lc(lc_dir)
    cb = LCQATCallback()
    # no clipping: it would unscale nothing here (no native fp16) and zero the overflowed gradients
    tr = Trainer(model=model, args=targs(tmp_path / "fp16", max_steps=10, max_grad_norm=0.0),
                 train_dataset=TokenDataset(), callbacks=[cb])
    init = 2.0**70
    scaler = _fp16_loss_scaling(tr, init)
    tr.train()
    assert tr.state.global_step == 10
    # the scaler skipped the first steps (halving its scale each time) and then trained
    halvings = round(math.log2(init / scaler.get_scale()))
    assert 1 <= halvings < 10, halvings
    assert cb.skipped_steps == halvings
    assert sum(r["flipped"] for r in cb.history) > 0, "no step after the skipped ones trained"

    # a loss that stays NaN is still a divergence: lowering the scale cannot help, and the run stops
    model2 = load_lc(lc_dir)
    model2.model.layers[0].mlp.register_forward_hook(lambda m, a, o: o * float("nan"))
    tr2 = LCQATTrainer(model=model2, args=targs(tmp_path / "fp16nan", max_grad_norm=0.0),
                       train_dataset=TokenDataset(), callbacks=[LCQATCallback(max_skipped_steps=2)])
    _fp16_loss_scaling(tr2, 2.0**16)
    # LCQATTrainer's own loss check leaves a skipped step to the scaler; the callback counts them
    with pytest.raises(NonFiniteTrainingError, match="in 3 optimizer steps in a row .* under fp16 loss scaling"):
        tr2.train()
    assert tr2.state.global_step == 2


def test_distillation_and_param_groups(tmp_path):
    # a teacher with peaked outputs (a random tiny model is near-uniform), and a student
    # quantized in flight from it
    fp = make_tiny_model("llama")
    with torch.no_grad():
        for p in fp.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    fp.save_pretrained(tmp_path / "fp")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=LCQATConfig(), dtype=torch.float32)
    ds = TokenDataset()
    x = ds.ids[:8]

    from optimum_lcqat.training import distillation_loss

    def kl_to_teacher():
        with torch.no_grad():
            return float(distillation_loss(model(x).logits, teacher(x).logits))

    model.eval()
    before = kl_to_teacher()
    tr = LCQATTrainer(model=model, args=targs(tmp_path / "kd", max_steps=12, learning_rate=3e-3),
                      train_dataset=ds, teacher_model=teacher, kd_alpha=0.9, kd_temperature=1.0,
                      lr_scale={"latent": 1.0, "scales": 0.02, "codebook": 0.02, "norm": 0.05})
    tr.train()
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert set(groups) == {"latent", "scales", "codebook", "norm"}
    assert groups["norm"]["initial_lr"] == pytest.approx(0.05 * tr.args.learning_rate)
    # (the latents at the base lr: at 3x (DEFAULT_LR_SCALE) and lr 3e-3 this tiny model's codes flip
    # so much in 12 steps that the KL rose, 0.112 -> 0.124)
    assert groups["latent"]["initial_lr"] == pytest.approx(tr.args.learning_rate)
    assert all(g["weight_decay"] == 0.0 for g in groups.values())
    model.eval()
    after = kl_to_teacher()
    assert after < before, (before, after)
    assert float(distillation_loss(teacher(x).logits, teacher(x).logits)) == pytest.approx(0.0, abs=1e-6)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_balanced_scales_and_decay_on_every_category(lc_dir, tmp_path):
    """balance_scales rescales s_u/s_v once before training without changing the model's output;
    decay_categories puts the Trainer's weight decay on the named groups only."""
    model = load_lc(lc_dir)
    ds = TokenDataset()
    x = ds.ids[:4]
    model.eval()
    with torch.no_grad():
        before = model(x).logits
    cb = LCQATCallback(balance_scales=True, decay_categories=["latent", "scales", "codebook"])
    tr = LCQATTrainer(model=model, args=targs(tmp_path / "b", max_steps=1, learning_rate=1e-9, weight_decay=0.1),
                      train_dataset=ds, callbacks=[cb])
    layers = [m for m in model.modules() if isinstance(m, LCLinear)]
    for m in layers:  # balanced already (prepare runs at Trainer init), same function
        ru, rv = (float(p.detach().pow(2).mean().sqrt()) for p in (m.s_u, m.s_v))
        assert ru == pytest.approx(rv, rel=1e-4)
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x).logits, before) < 1e-4
    tr.train()
    groups = {g["name"]: g["weight_decay"] for g in tr.optimizer.param_groups}
    assert groups == {"latent": 0.1, "scales": 0.1, "codebook": 0.1, "norm": 0.0}
    # DEFAULT_LR_SCALE: every LC category, the latents included, at 3x the base learning rate
    lrs = {g["name"]: g["initial_lr"] for g in tr.optimizer.param_groups}
    assert lrs["latent"] == lrs["scales"] == lrs["codebook"] == lrs["norm"] == pytest.approx(3 * tr.args.learning_rate)
    assert LCQATCallback(lr_scale={"norm": 1.0}).lr_scale == {"latent": 3.0, "scales": 3.0, "codebook": 3.0, "bias": 3.0,
                                                             "norm": 1.0}
    with pytest.raises(ValueError, match="decay_categories: unknown categories.*'scale'"):
        LCQATCallback(decay_categories=["scale"])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_peft_lora_on_frozen_lcqat_model(lc_dir, tmp_path):
    from optimum_lcqat.training.peft import LCLoraLinear, get_lcqat_lora_model, load_lcqat_lora

    model = load_lc(lc_dir)
    codes = codes_of(model)
    peft_model = get_lcqat_lora_model(model, r=4, lora_alpha=8)
    wrapped = [m for m in peft_model.modules() if isinstance(m, LCLoraLinear)]
    assert len(wrapped) == len(codes)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    tr = Trainer(model=peft_model, args=targs(tmp_path / "lora", learning_rate=1e-2), train_dataset=TokenDataset())
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert all(torch.equal(codes[k], v) for k, v in codes_of(model).items()), "LoRA changed the frozen codes"
    adir = tmp_path / "adapter"
    peft_model.save_pretrained(adir)
    assert (adir / "adapter_model.safetensors").is_file()
    x = TokenDataset(2, seed=7).ids
    peft_model.eval()
    with torch.no_grad():
        ref = peft_model(x).logits
    loaded = load_lcqat_lora(load_lc(lc_dir), adir)
    with torch.no_grad():
        got = loaded(x).logits
        base = load_lc(lc_dir)(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4), "the adapters have no effect"


def test_torch_compile_training_step(lc_dir, tmp_path):
    # The Trainer compiles the model itself (torch_compile=True). aot_eager exercises dynamo's
    # graph capture and AOT autograd through the DGE autograd.Function and the Hadamard
    # rotations without a C++ toolchain (inductor's speed for training is not measured here).
    model = load_lc(lc_dir)
    cb = LCQATCallback()
    tr = Trainer(model=model, args=targs(tmp_path / "compile", torch_compile=True,
                                        torch_compile_backend="aot_eager", max_steps=2),
                 train_dataset=TokenDataset(), callbacks=[cb])
    tr.train()
    assert hasattr(tr.model_wrapped, "_orig_mod") or hasattr(tr.accelerator.unwrap_model(tr.model_wrapped, keep_torch_compile=True), "_orig_mod")
    assert sum(r["flipped"] for r in cb.history) > 0
    # a model compiled *before* the Trainer is refused by transformers' own check, with its message
    m2 = torch.compile(load_lc(lc_dir), backend="aot_eager")
    with pytest.raises(ValueError, match="torch.compile"):
        Trainer(model=m2, args=targs(tmp_path / "c2"), train_dataset=TokenDataset(), callbacks=[LCQATCallback()])


TRAIN_SCRIPT = REPO / "examples" / "train_lcqat.py"
# latent=1: at lr 1e-2 the default 3x (DEFAULT_LR_SCALE, chosen at 1e-4) flips so many borderline codes
# that the processes' different gradient summation orders decided ~1% of them (1948 of 165888)
TRAIN_ARGS = ["--cpu", "--tiny-random-data", "--seq-len", str(SEQ), "--max-steps", "8", "--lr", "1e-2",
              "--lr-scale", "latent=1,scales=0.1,codebook=0.1,norm=0.1", "--global-batch", "4", "--seed", "0"]
# accelerate 1.15: `--cpu` routes to its simple launcher, which starts ONE process (multi-CPU
# there needs mpirun and a hostfile). Two real local processes come from its torchrun path
# (`--multi_gpu`), which on a machine without GPUs runs on CPU over gloo: the script's
# TrainingArguments(use_cpu=True) makes Accelerate pick MULTI_CPU/gloo. run_info.json proves it.
# Each launch passes --main_process_port 0 (accelerate binds port 0 for a free one) and torchrun
# --standalone (its rendezvous store picks one): no fixed port, so concurrent runs cannot collide.
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _train_env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd):
    r = run_process_group(cmd, 300, env=_train_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def single_run(lc_dir, tmp_path_factory):
    """The reference: the training script in one process."""
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, "-P", str(TRAIN_SCRIPT), "--model", str(lc_dir), *TRAIN_ARGS, "--output", str(out)])
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["sharded_parameters"] == 0
    return out


def assert_same_training(reference, other, lc_dir, exact=False):
    """``other`` (a run folder) trained the same model as ``reference``: codes, parameters, logits."""
    from optimum_lcqat.tensor.packing import unpack_codes

    a = AutoModelForCausalLM.from_pretrained(reference / "final", dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(other / "final", dtype=torch.float32)
    ca, cb = codes_of(a), codes_of(b)
    diff = sum(int((unpack_codes(ca[k]) != unpack_codes(cb[k])).sum()) for k in ca)
    total = sum(unpack_codes(v).numel() for v in ca.values())
    assert diff / total < 1e-3, f"{diff}/{total} codes differ from {reference.name}"
    changed = sum(int((unpack_codes(ca[k]) != unpack_codes(v)).sum()) for k, v in codes_of(load_lc(lc_dir)).items())
    assert changed > 10 * max(diff, 1), "training flipped too few codes for the comparison to mean anything"
    ia = json.loads((reference / "run_info.json").read_text())
    ib = json.loads((other / "run_info.json").read_text())
    assert ia["tokens"] == ib["tokens"]
    torch.testing.assert_close(torch.tensor(ib["losses"]), torch.tensor(ia["losses"]), rtol=1e-4, atol=1e-4)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        elif sa[k].is_floating_point():
            torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=1e-4, atol=1e-4)
    x = TokenDataset(2, seed=9).ids
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, rtol=1e-4, atol=1e-4)


def test_accelerate_two_process_ddp_matches_single_process(lc_dir, single_run, tmp_path):
    out = tmp_path / "ddp"
    _run([*LAUNCH_2, "--main_process_port", "0", str(TRAIN_SCRIPT), "--model", str(lc_dir), *TRAIN_ARGS,
          "--output", str(out)])
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo" and len(set(info["pids"])) == 2
    assert info["distributed_type"] == "MULTI_CPU" and info["sharded_parameters"] == 0
    assert_same_training(single_run, out, lc_dir)


def test_fsdp2_two_processes_match_single_process_and_resume_exactly(lc_dir, single_run, tmp_path):
    # Real processes and the real FSDP2 path (fully_shard, gathered state dicts, FSDP checkpoints);
    # tests/fsdp_on_cpu.py only overrides Accelerate's device-type decision (FSDP is applied to
    # GPU-like types only), see its docstring.
    wrapper = str(REPO / "tests" / "fsdp_on_cpu.py")
    out = tmp_path / "fsdp"
    _run([*LAUNCH_2, "--main_process_port", "0", wrapper, "--model", str(lc_dir), *TRAIN_ARGS, "--fsdp",
          "--save-steps", "4", "--output", str(out)])
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo" and len(set(info["pids"])) == 2
    assert info["fsdp"] and info["distributed_type"] == "FSDP"
    # every trainable and frozen parameter of the model is a sharded DTensor
    assert info["sharded_parameters"] == len(list(load_lc(lc_dir).parameters()))
    assert_same_training(single_run, out, lc_dir)
    # the mid-run checkpoint is a valid packed lcqat checkpoint plus the exact-resume file
    ckpt = out / "checkpoint-4"
    assert (ckpt / TRAINING_STATE_NAME).is_file()
    mid = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert len(lc_names(mid)) == len(lc_names(load_lc(lc_dir)))
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert not any(k.endswith(".latent") for k in f.keys())
    # resumed from step 4 under FSDP2: the same model as the uninterrupted run, bit for bit
    # (through the other route: accelerate's own FSDP flags, whose default state dict type,
    # SHARDED_STATE_DICT, would save no model file; LCQATTrainer switches it and says so)
    resumed = tmp_path / "fsdp_resumed"
    launch_fsdp = [*LAUNCH_2[:3], "--use_fsdp", "--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "false",
                   *LAUNCH_2[4:]]
    res = _run([*launch_fsdp, "--main_process_port", "0", wrapper, "--model", str(lc_dir), *TRAIN_ARGS,
                "--resume", str(ckpt), "--output", str(resumed)])
    assert "SHARDED_STATE_DICT -> FULL_STATE_DICT" in res.stderr
    assert json.loads((resumed / "run_info.json").read_text())["distributed_type"] == "FSDP"
    assert_same_training(out, resumed, lc_dir, exact=True)


_SHARDED_CODES_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from optimum_lcqat.nn.lc_linear import LCLinear, round_latent as _round_latent
from optimum_lcqat.training.fsdp import row_sharded
dist.init_process_group("gloo")
torch.manual_seed(0)
for m in (43, 48, 1):  # uneven shards (22 + 21 rows), even, and one rank with no row
    layer = LCLinear(64, m, bias=False)
    layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, dtype=torch.uint8))
    layer.enable_training()
    with torch.no_grad():
        layer.latent.add_(torch.randn_like(layer.latent) * 0.02)
    expected = _round_latent(layer.latent, layer.alpha).clone()
    fully_shard(layer, mesh=init_device_mesh("cpu", (2,)))
    assert row_sharded(layer.latent), layer.latent.placements
    assert torch.equal(layer.hard_codes(), expected), m
    assert torch.equal(layer.hard_codes(), _round_latent(layer.latent.full_tensor(), layer.alpha)), m
print("ok", dist.get_rank())
"""


def test_codes_ofrow_sharded_latents_gather_packed_and_exact(tmp_path):
    # FSDP2 shards latents by rows; hard_codes packs each rank's rows and gathers 2-bit bytes
    script = tmp_path / "sharded_codes.py"
    script.write_text(_SHARDED_CODES_SCRIPT)
    res = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                str(script)])
    assert res.stdout.count("ok") == 2


def test_fsdp_settings_lcqat_cannot_train_under_are_named(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from optimum_lcqat.training.trainer import fsdp_plugin_problems

    # accelerate's plugin writes its settings into os.environ (FSDP_CPU_RAM_EFFICIENT_LOADING, ...),
    # where later Accelerators would read them: give this test its own copy
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert fsdp_plugin_problems(FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=False)) == []
    fp32_params = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.bfloat16)
    assert fsdp_plugin_problems(FullyShardedDataParallelPlugin(
        fsdp_version=2, cpu_ram_efficient_loading=False, mixed_precision_policy=fp32_params)) == []
    bad = fsdp_plugin_problems(FullyShardedDataParallelPlugin(
        fsdp_version=2, cpu_ram_efficient_loading=True, cpu_offload=True,
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)))
    assert len(bad) == 3
    assert any("--mixed_precision no" in b for b in bad)
    assert any("fsdp_cpu_ram_efficient_loading false" in b for b in bad)
    assert any("fsdp_offload_params off" in b for b in bad)


def test_fsdp1_zero3_and_plain_trainer_under_fsdp2_are_refused_with_reason(lc_dir, tmp_path, monkeypatch):
    from optimum_lcqat.training.callback import FSDP1_UNSUPPORTED, FSDP2_NEEDS_LCQAT_TRAINER

    # accelerate's launcher (`--use_fsdp`) sets these; its default FSDP version is 1
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(NotImplementedError) as exc:
        Trainer(model=load_lc(lc_dir), args=targs(tmp_path / "f1"), train_dataset=TokenDataset(),
                callbacks=[LCQATCallback()])
    assert str(exc.value) == FSDP1_UNSUPPORTED
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(NotImplementedError) as exc:
        Trainer(model=load_lc(lc_dir), args=targs(tmp_path / "f2"), train_dataset=TokenDataset(),
                callbacks=[LCQATCallback()])
    assert str(exc.value) == FSDP2_NEEDS_LCQAT_TRAINER
    # LCQATTrainer takes FSDP2 (on this CPU machine Accelerate then runs without sharding)
    LCQATTrainer(model=load_lc(lc_dir), args=targs(tmp_path / "f3"), train_dataset=TokenDataset())
    # DeepSpeed ZeRO-3 (flat parameter partitions) is refused too; deepspeed is not installed
    # here, so transformers' own switch is what the test turns on
    import optimum_lcqat.training.callback as cbmod
    from optimum_lcqat.training.callback import ZERO3_UNSUPPORTED

    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setattr("transformers.integrations.deepspeed.is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(NotImplementedError) as exc:
        LCQATTrainer(model=load_lc(lc_dir), args=targs(tmp_path / "z3"), train_dataset=TokenDataset())
    assert str(exc.value) == ZERO3_UNSUPPORTED and cbmod._deepspeed_zero3()
    monkeypatch.undo()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    # the per-step cap on code changes ranks whole latents: not under FSDP yet
    with pytest.raises(NotImplementedError, match="max_flip_share"):
        LCQATTrainer(model=load_lc(lc_dir), args=targs(tmp_path / "f4"), train_dataset=TokenDataset(),
                     callbacks=[LCQATCallback(max_flip_share=1e-3)])


def test_lcqat_trainer_takes_the_optimizer_training_arguments_name(lc_dir, tmp_path):
    """TrainingArguments(optim=...) reaches LCQATTrainer's parameter groups: torchao's 8-bit Adam keeps
    its two states in 8 bits (about 2 bytes a latent weight instead of 8), and the run still trains."""
    pytest.importorskip("torchao")
    from torchao.optim import AdamW8bit

    model = load_lc(lc_dir)
    ds = TokenDataset()
    tr = LCQATTrainer(model=model, args=targs(tmp_path / "a8", optim="adamw_torch_8bit", max_steps=8, learning_rate=3e-3),
                      train_dataset=ds)
    tr.train()
    assert isinstance(tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer, AdamW8bit)
    assert {g["name"] for g in tr.optimizer.param_groups} >= {"latent", "scales", "codebook"}
    # the biggest latent's states: 8-bit codes (+ a scale per block), not two fp32 copies
    latent = max((p for g in tr.optimizer.param_groups if g["name"] == "latent" for p in g["params"]), key=torch.numel)
    state = tr.optimizer.state[latent]
    nbytes = sum(t.codes.nbytes + t.scale.nbytes for k, t in state.items() if k in ("exp_avg", "exp_avg_sq"))
    assert nbytes < 2.2 * latent.numel(), (nbytes, latent.numel())
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("bad", [-1, float("nan"), "192", True, None])
def test_a_bad_checkpoint_keep_budget_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="checkpoint_keep_mib must be >= 0"):
        LCQATCallback(checkpoint_keep_mib=bad)
