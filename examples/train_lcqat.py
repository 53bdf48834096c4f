"""LC-QAT training script: the same file runs on one process or under `accelerate launch`.

    # single process
    python examples/train_lcqat.py --model LCQAT_DIR --output OUT --tokens 50000
    # DDP, 2 local CPU processes over gloo (on a machine without GPUs; see examples/README.md for
    # why not `--cpu`: in accelerate 1.15 that flag starts a single process unless mpirun is used)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no examples/train_lcqat.py --model LCQAT_DIR --output OUT --tokens 50000
    # FSDP2 (on GPUs): add --fsdp (TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2})),
    # or `accelerate launch --use_fsdp --fsdp_version 2 ...`; see examples/README.md

--model is an lcqat checkpoint, or a full-precision one with --quantize (data-free LCQATConfig()).
Data: --tiny-random-data (a seeded random walk over the vocabulary, for tests) or the project's
train split (optimum_lcqat.data.split_texts("train")) packed into --seq-len windows.
The global batch (--global-batch) is split over the processes, so 1 and N processes see the
same sequences per optimizer step. Writes OUT/final (packed lcqat) and OUT/run_info.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


class RandomWalkDataset(torch.utils.data.Dataset):
    def __init__(self, n, seq_len, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        steps = torch.randint(-3, 4, (n, seq_len), generator=g)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + steps.cumsum(1)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _sharded_parameters(model) -> int:
    """How many parameters FSDP2 holds as sharded DTensors (0 without FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return 0
    return sum(isinstance(p, DTensor) for p in model.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--quantize", action="store_true", help="--model is full precision: quantize in flight (data-free)")
    p.add_argument("--output", required=True)
    p.add_argument("--tiny-random-data", action="store_true")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="token budget (sets the number of steps)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-scale", default="", help="per-category lr multipliers, e.g. scales=0.1,norm=0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kd-teacher", default=None, help="full-precision model dir: distil from it")
    p.add_argument("--kd-alpha", type=float, default=1.0)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="TrainingArguments(fsdp='full_shard', FSDP2); see README")
    p.add_argument("--cpu", action="store_true", help="train on CPU even where GPUs are present")
    p.add_argument("--resume", default=None, help="a checkpoint folder of an earlier run to resume from")
    a = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, TrainingArguments

    import optimum_lcqat  # noqa: F401  (registers lcqat)
    from optimum_lcqat import LCQATConfig
    from optimum_lcqat.nn.expert_linears import ExpertLinears
    from optimum_lcqat.training import LCQATTrainer, steps_for_token_budget

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.global_batch % world:
        raise SystemExit(f"--global-batch {a.global_batch} is not divisible by {world} processes")
    per_device = a.global_batch // world
    on_cpu = a.cpu or not torch.cuda.is_available()  # GPUs when there are any (NCCL), else CPU + gloo
    kw = {"quantization_config": LCQATConfig()} if a.quantize else {}
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw)
    if a.tiny_random_data:
        ds = RandomWalkDataset(256, a.seq_len, model.config.vocab_size, seed=a.seed)
    else:
        from transformers import AutoTokenizer

        from optimum_lcqat.data import split_texts, token_windows

        tok = AutoTokenizer.from_pretrained(a.model)
        need = (a.tokens or a.global_batch * a.seq_len * (a.max_steps or 1)) + a.seq_len
        ds = token_windows(split_texts("train"), tok, a.seq_len, max_tokens=need)
    steps = a.max_steps or steps_for_token_budget(a.tokens or a.seq_len * a.global_batch, a.seq_len, per_device, 1, world)
    args = TrainingArguments(
        output_dir=a.output, per_device_train_batch_size=per_device, max_steps=steps, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to=[], seed=a.seed, data_seed=a.seed,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500, disable_tqdm=True,
        use_cpu=on_cpu, dataloader_num_workers=0, include_num_input_tokens_seen="all",
        ddp_backend="gloo" if world > 1 and on_cpu else None,
        # a MoE expert no token of a rank's batch reached has no gradient there: DDP must look for them
        ddp_find_unused_parameters=any(isinstance(m, ExpertLinears) for m in model.modules()),
        **({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}} if a.fsdp else {}),
    )
    teacher = AutoModelForCausalLM.from_pretrained(a.kd_teacher, dtype=torch.float32) if a.kd_teacher else None
    lr_scale = {k: float(v) for k, v in (kv.split("=") for kv in a.lr_scale.split(",") if kv)}
    trainer = LCQATTrainer(model=model, args=args, train_dataset=ds, teacher_model=teacher, kd_alpha=a.kd_alpha,
                           lr_scale=lr_scale)
    backend, pids = None, [os.getpid()]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        backend = torch.distributed.get_backend()
        pids = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(pids, os.getpid())
    t0 = time.time()
    trainer.train(resume_from_checkpoint=a.resume)
    elapsed = time.time() - t0
    trainer.save_model(os.path.join(a.output, "final"))
    sharded = _sharded_parameters(trainer.model)
    if trainer.is_world_process_zero():
        info = {
            "world_size": world, "backend": backend, "pids": pids, "fsdp": bool(trainer.is_fsdp_enabled),
            "distributed_type": getattr(trainer.accelerator.distributed_type, "value", str(trainer.accelerator.distributed_type)), "sharded_parameters": sharded,
            "steps": trainer.state.global_step,
            "tokens": trainer.state.num_input_tokens_seen, "seconds": elapsed,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        }
        with open(os.path.join(a.output, "run_info.json"), "w") as f:
            json.dump(info, f, indent=1)
        print(json.dumps(info))
    # Every rank tears its process group down before the interpreter exits. Left to interpreter
    # exit, gloo's worker threads abort the process (SIGABRT, "terminate called without an active
    # exception", seen in CI after a finished, saved run). Torn down right after a collective on
    # Python tensors it can deadlock instead: the main thread, holding the GIL, joins a gloo worker
    # that waits for the GIL to free that collective's tensors (gdb, torch 2.13). So the pid gather
    # runs before training, and every rank waits in a barrier (GIL released) for rank 0's save,
    # which lets the workers finish with the last training step's collectives first.
    if distributed:
        torch.distributed.barrier()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
