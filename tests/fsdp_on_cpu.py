"""Run a recipe under FSDP on CPU processes (gloo), for the tests: `accelerate launch --config_file
launch/fsdp2.yaml ... tests/fsdp_on_cpu.py recipes/sft.py --flags`.

Accelerate turns an FSDP launch into FSDP only on GPUs (and other accelerators); on CPU processes it
falls back to plain data parallelism. PyTorch's FSDP2 (`fully_shard`) itself runs on gloo, so this
lifts that one gate: the CPU group is declared FSDP with the plugin the launch configured, and the recipe
then runs unchanged, its parameters sharded per decoder layer.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin()


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    recipe = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(recipe, run_name="__main__")
