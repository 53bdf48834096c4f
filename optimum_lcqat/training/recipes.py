"""A ready QAT recipe for the CLI and the demo: ``run_qat(model, tokenizer, texts, tokens)``.

Packs the texts into windows of ``seqlen`` tokens, trains the LC model in place with
:class:`LCQATTrainer` (AdamW, 2 warmup steps then a constant learning rate, per-category learning
rates) for a token budget, and returns what happened. Checkpoints are not kept (a temporary output dir).

Why a constant rate: measured on SmolLM2-135M from the default PTQ (benchmarks/results/ablation.md,
row qat_cosine against the `default` row's long run, same batches), cosine decay after 10% warmup
reached 19.35 / 17.04 / 16.56 held-out perplexity at 50K / 200K / 400K tokens, the constant rate
18.49 / 16.26 / 15.22: QAT's gains come from the continuous parameters at a small rate, and
decaying it stops them early.
"""

from __future__ import annotations

import tempfile
import time

import torch

from ..data import token_windows


def run_qat(
    model,
    tokenizer,
    texts: list[str],
    tokens: int,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 4,
    lr: float = 1e-4,
    teacher_model=None,
    kd_alpha: float = 1.0,
) -> dict:
    """Train ``model`` (with LC layers) for ``tokens`` tokens of ``texts``; returns a report."""
    from transformers import TrainingArguments

    from .callback import LCQATCallback, steps_for_token_budget
    from .trainer import LCQATTrainer

    if tokens <= 0:
        raise ValueError(f"run_qat: tokens must be positive, got {tokens}")
    steps = max(1, steps_for_token_budget(tokens, seqlen, batch_size))
    data = token_windows(texts, tokenizer, seqlen, max_tokens=steps * batch_size * seqlen + seqlen)
    cb = LCQATCallback()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="lcqat-qat-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=min(2, steps - 1),
            weight_decay=0.0,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            disable_tqdm=False,
        )
        trainer = LCQATTrainer(
            model=model, args=args, train_dataset=data, callbacks=[cb],
            teacher_model=teacher_model, kd_alpha=kd_alpha if teacher_model is not None else 0.0,
        )
        result = trainer.train()
    model.eval()
    seconds = time.time() - t0
    trained = steps * batch_size * seqlen
    return {
        "steps": steps,
        "tokens": trained,
        "seconds": seconds,
        "tokens_per_s": trained / seconds,
        "final_loss": float(result.training_loss),
        "flipped_codes_share": cb.code_change_share(model),
        "distillation": teacher_model is not None,
    }
