"""Run a recipe under the FSDP2 or DeepSpeed launch configs on CPU processes (gloo), for the tests:
`accelerate launch --config_file launch/fsdp2.yaml ... tests/engines_on_cpu.py recipes/sft.py --flags`.
Optionally `--stop_at_step N` first: the run then behaves as if SIGTERM reached every process during step N
(checkpoint, status interrupted, exit), at a step known in advance, with the other processes slow to save.

Two things differ from a GPU node, and only these are changed here:
- Accelerate turns an FSDP launch into FSDP only on GPUs (and other accelerators); on CPU processes it falls
  back to plain data parallelism. PyTorch's FSDP2 (`fully_shard`) runs on gloo, so the CPU group is declared
  FSDP with the plugin the launch configured.
- DeepSpeed's CPU backend compiles a shared-memory all-reduce kernel with g++ on first use (about 45 s); it
  only speeds up CPU collectives, so it is skipped and gloo does the all-reduce.
"""

import os
import runpy
import signal
import sys
import time

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from llmtrain.run_dir import Run

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin()


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None


def stop_at(stop_step: int) -> None:
    """SIGTERM during `stop_step`; and the processes other than the main one write their share of checkpoints
    late, as a slow process would, so that a checkpoint renamed before every shard is written shows."""
    import accelerate.accelerator

    save_accelerator_state = accelerate.accelerator.save_accelerator_state

    def late(*args, **kwargs):  # called by save_state after its collective part
        if not PartialState().is_main_process:
            time.sleep(2)
        return save_accelerator_state(*args, **kwargs)

    accelerate.accelerator.save_accelerator_state = late
    checkpoint_after_step = Run.checkpoint_after_step

    def stopping(self, accelerator, step, total_steps, state, cfg, signum):
        signum = signal.SIGTERM if step == stop_step else signum
        return checkpoint_after_step(self, accelerator, step, total_steps, state, cfg, signum)

    Run.checkpoint_after_step = stopping


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "--stop_at_step":
        stop_at(int(args[1]))
        args = args[2:]
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
