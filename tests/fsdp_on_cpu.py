"""Run examples/train_lcqat.py under FSDP2 on CPU processes (gloo), for the tests.

The one fake: Accelerate 1.15 applies an FSDP plugin only to GPU-like distributed types; with
``use_cpu`` it picks MULTI_CPU and drops the plugin (plain DDP). This wrapper sets the
distributed type back to FSDP right after the Trainer has built its Accelerator, as Accelerate
itself would on GPUs (``AcceleratorState.__init__``: ``distributed_type = FSDP``, mirrored into
``PartialState``). Everything after that is the real path: Accelerate's ``fsdp2_prepare_model``
calls ``fully_shard`` on the decoder layers and the root, the Trainer gathers full state dicts
with ``get_model_state_dict`` and writes FSDP checkpoints, and gloo carries the collectives.

    accelerate launch --multi_gpu --num_processes 2 tests/fsdp_on_cpu.py <train_lcqat.py args> --fsdp
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 tests/fsdp_on_cpu.py <train_lcqat.py args>
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

from optimum_lcqat.training import LCQATTrainer

_create = LCQATTrainer.create_accelerator_and_postprocess


def _create_with_fsdp_on_cpu(self):
    _create(self)
    state = self.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise SystemExit(f"fsdp_on_cpu: expected MULTI_CPU, got {state.distributed_type}")
    if self.args.fsdp_plugin_args is not None:  # TrainingArguments(fsdp=...), as the Trainer builds it
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
    elif parse_flag_from_env("ACCELERATE_USE_FSDP"):  # `accelerate launch --use_fsdp`
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    else:
        raise SystemExit("fsdp_on_cpu: neither TrainingArguments(fsdp=...) nor accelerate launch --use_fsdp")
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    self.is_fsdp_enabled = True


LCQATTrainer.create_accelerator_and_postprocess = _create_with_fsdp_on_cpu

if __name__ == "__main__":
    script = Path(__file__).resolve().parents[1] / "examples" / "train_lcqat.py"
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
