"""The stages under FSDP2 (launch/fsdp2.yaml as shipped) on 2 CPU processes give what one process gives:
parameters sharded per decoder layer, generation and evaluation in step across processes, the finished
run gathered into one normal checkpoint. Accelerate only enables FSDP on GPUs, so the recipes run through
tests/fsdp_on_cpu.py, which lifts that gate and nothing else (PyTorch's FSDP2 runs on gloo)."""

import json
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from conftest import REPO
from test_distributed import assert_two_processes_match_one, free_port
from test_ppo import assert_ppo_two_processes_match_one

from llmtrain.config import SftConfig
from llmtrain.errors import LLMTrainError
from llmtrain.lora import add_lora

FSDP2 = [
    "accelerate",
    "launch",
    "--config_file",
    str(REPO / "launch" / "fsdp2.yaml"),
    "--num_processes",
    "2",
    "--mixed_precision",
    "no",
]
ON_CPU = REPO / "tests" / "fsdp_on_cpu.py"


def fsdp(tmp_path, args: list[str], batch: int, steps: int, accum: int = 1) -> None:
    """Run `args` (a recipe and its flags) as one process and as 2 FSDP2 processes, and compare."""
    assert_two_processes_match_one(tmp_path, [str(ON_CPU), *args], batch, steps, launch=FSDP2, accum=accum)
    assert json.loads((tmp_path / "runs" / "two" / "llmtrain.json").read_text())["engine"] == "FSDP"


def test_sft_under_fsdp2_matches_one_process(tmp_path, finished_run):
    # Five held-out prompts: one process answers three, the other two, and the sharded forwards stay in step.
    args = [str(REPO / "recipes" / "sft.py"), "--init", str(finished_run), "--max_rows", "200", "--max_steps", "6"]
    args += ["--log_every", "1", "--eval_every", "0", "--max_length", "64", "--task_eval_rows", "5"]
    args += ["--max_new_tokens", "6"]
    fsdp(tmp_path, args, batch=4, steps=6, accum=2)


def test_ppo_under_fsdp2_matches_one_process(tmp_path, sft_run):
    """The policy generates alone inside the sharded actor-critic (its root unit gathered around the call),
    and the tied embeddings stay tied: the same curve and weights as one process, clipping included."""
    launch = [*FSDP2, "--main_process_port", str(free_port())]
    assert_ppo_two_processes_match_one(sft_run, tmp_path, launch, steps=2, script=[str(ON_CPU)])
    assert json.loads((tmp_path / "runs" / "two" / "llmtrain.json").read_text())["engine"] == "FSDP"


def test_lora_is_refused_where_parameters_are_sharded():
    fsdp_run = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(deepspeed_plugin=None))
    zero3 = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)),
    )
    for accelerator in (fsdp_run, zero3):
        with pytest.raises(LLMTrainError, match=r"--lora is not supported with FSDP or DeepSpeed ZeRO-3.*ddp.yaml"):
            add_lora(None, SftConfig(lora=True), "CAUSAL_LM", accelerator)
