"""N processes give what one process gives, under every engine the launch configs offer: 2 CPU processes
(gloo) with batch B against 1 process with batch 2B, in losses and final weights (to float tolerance).

DDP (`LAUNCH_TWO`) runs the recipes as users do. FSDP2 and DeepSpeed use launch/fsdp2.yaml and
launch/deepspeed-zero*.yaml as shipped, through tests/engines_on_cpu.py (see there for the two things it
changes on CPUs). Each stage's one-process reference is run once per module and shared by its engines.
"""

import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from helpers import REPO, TINY_FLAGS, env_for, logged, manifest
from safetensors.torch import load_file

from llmtrain.config import SftConfig
from llmtrain.errors import LLMTrainError
from llmtrain.lora import add_lora

LAUNCH_TWO = [
    "accelerate",
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
ON_CPU = str(REPO / "tests" / "engines_on_cpu.py")
CONFIGS = {"zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3", "fsdp2": "fsdp2"}
ENGINE_NAMES = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED ZeRO-2", "zero3": "DEEPSPEED ZeRO-3", "fsdp2": "FSDP"}
PPO_KEYS = ("reward_mean", "kl", "policy_loss", "value_loss", "entropy", "explained_variance")


def free_port() -> int:
    """A port of its own, so that another 2-process job on the machine (a second test run) cannot meet this one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(engine: str, stop_at_step: int | None = None) -> list[str]:
    """The command that starts 2 processes under `engine`, up to the recipe."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    if engine == "ddp":
        command = [*LAUNCH_TWO]
    else:
        config = REPO / "launch" / f"{CONFIGS[engine]}.yaml"
        command = ["accelerate", "launch", "--config_file", str(config), "--num_processes", "2"]
        command += ["--mixed_precision", "no"]
    command += ["--main_process_port", str(free_port())]
    if engine != "ddp" or stop_at_step:
        command += [ON_CPU] + (["--stop_at_step", str(stop_at_step)] if stop_at_step else [])
    return command


def run(command: list[str], tmp_path: Path, returncode: int = 0) -> None:
    env = env_for(tmp_path) | {"PYTHONPATH": str(REPO / "tests")}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == returncode, out.stderr[-3000:]


def one_process(tmp_path: Path, args: list[str], batch: int) -> Path:
    run([sys.executable, *args, "--batch_size", str(batch), "--run_name", "one"], tmp_path)
    return tmp_path / "runs" / "one"


def two_processes(tmp_path: Path, engine: str, args: list[str], batch: int) -> Path:
    run([*launch_two(engine), *args, "--batch_size", str(batch), "--run_name", "two"], tmp_path)
    two = tmp_path / "runs" / "two"
    assert manifest(two)["world_size"] == 2 and manifest(two)["engine"] == ENGINE_NAMES[engine]
    return two


def assert_same_run(one: Path, two: Path, steps: int, keys=("train_loss",), every: int = 1) -> None:
    a, b = logged(one), logged(two)
    assert sorted(a) == sorted(b)
    for step in range(every, steps + 1, every):
        for key in keys:
            assert a[step][key] == pytest.approx(b[step][key], abs=1e-4), (step, key)
    for key in ("val_loss", "task_accuracy", "win_rate"):
        if key in a[steps]:
            assert a[steps][key] == pytest.approx(b[steps][key], abs=1e-4), key
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- pretraining and the reward model (DDP)


@pytest.mark.slow
def test_pretraining_with_two_processes_matches_one_process(tmp_path, small_corpus):
    # DDP only: ZeRO-3 builds a new model already partitioned, a different (valid) random init.
    # Lines every 3 steps: the sums of the steps between are added up on each process and summed at the line.
    args = [str(REPO / "recipes" / "pretrain.py"), "--data", str(small_corpus), "--max_steps", "12"]
    args += ["--log_every", "3", *TINY_FLAGS]
    assert_same_run(one_process(tmp_path, args, 8), two_processes(tmp_path, "ddp", args, 4), 12, every=3)


@pytest.mark.slow
def test_reward_model_with_two_processes_matches_one_process(tmp_path, sft_run):
    args = [str(REPO / "recipes" / "reward.py"), "--init", str(sft_run), "--max_rows", "200", "--max_steps", "6"]
    args += ["--log_every", "1", "--eval_every", "0", "--max_length", "64", "--lr", "3e-3"]
    assert_same_run(one_process(tmp_path, args, 8), two_processes(tmp_path, "ddp", args, 4), 6)


# ---------------------------------------------------------------- SFT: every engine, and resuming elsewhere


@pytest.fixture(scope="module")
def sft_args(finished_run) -> list[str]:
    # Batches in 2 micro-steps (the accumulation boundary under every engine); five held-out prompts, so
    # one process answers three and the other two while sharded forwards stay in step.
    args = [str(REPO / "recipes" / "sft.py"), "--init", str(finished_run), "--max_rows", "200", "--max_steps", "8"]
    args += ["--log_every", "1", "--eval_every", "0", "--max_length", "64", "--grad_accum", "2"]
    return args + ["--task_eval_rows", "5", "--max_new_tokens", "6", "--num_samples", "0"]


@pytest.fixture(scope="module")
def sft_one(tmp_path_factory, sft_args) -> Path:
    return one_process(tmp_path_factory.mktemp("sft-one"), sft_args, 4)


@pytest.mark.slow
def test_sft_under_zero3_with_gradient_checkpointing_matches_one_process_without(tmp_path, sft_args, sft_one):
    # Gradient checkpointing recomputes the same numbers: the curve is the one-process run's.
    two = two_processes(tmp_path, "zero3", [*sft_args, "--gradient_checkpointing", "true"], 2)
    assert manifest(two)["config"]["gradient_checkpointing"] is True
    assert_same_run(sft_one, two, 8)


@pytest.mark.slow
def test_sft_under_fsdp2_through_a_sharded_checkpoint_matches_one_process(tmp_path, sft_args, sft_one):
    """Stopped after step 4 (every process writes its shard of the checkpoint) and resumed on 2 processes, with
    gradient checkpointing (the curve is the one-process run's without it)."""
    sft_args = [*sft_args, "--gradient_checkpointing", "true"]
    stopped = [*launch_two("fsdp2", stop_at_step=4), *sft_args, "--batch_size", "2", "--run_name", "two"]
    run(stopped, tmp_path, returncode=1)  # the launcher's exit code when its processes stop on SIGTERM
    checkpoint = tmp_path / "runs" / "two" / "checkpoints" / "step-0000004"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # a shard from each process, then the rename
        assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    two = two_processes(tmp_path, "fsdp2", sft_args, 2)  # same name: resume
    assert manifest(two)["resumed_at_steps"] == [4]
    assert_same_run(sft_one, two, 8)


@pytest.mark.slow
def test_sft_stopped_on_two_processes_resumes_on_one_on_the_same_curve(tmp_path, sft_args, sft_one):
    """DDP checkpoints hold whole weights and optimizer state: stopped after step 4 on 2 processes (batch B
    each), the run resumes on 1 process (batch 2B) and ends where the one-process run ends."""
    stopped = [*launch_two("ddp", stop_at_step=4), *sft_args, "--batch_size", "2", "--run_name", "moved"]
    run(stopped, tmp_path, returncode=1)  # the launcher's exit code when its processes stop on SIGTERM
    assert manifest(tmp_path / "runs" / "moved")["status"] == "interrupted"
    run([sys.executable, *sft_args, "--batch_size", "4", "--run_name", "moved"], tmp_path)  # same name: resume
    moved = tmp_path / "runs" / "moved"
    assert manifest(moved)["resumed_at_steps"] == [4] and manifest(moved)["world_size"] == 1
    assert_same_run(sft_one, moved, 8)


# ---------------------------------------------------------------- DPO and PPO


@pytest.fixture(scope="module")
def dpo_args(sft_run, reward_run) -> list[str]:
    args = [str(REPO / "recipes" / "dpo.py"), "--init", str(sft_run), "--max_rows", "200", "--max_steps", "4"]
    args += ["--log_every", "1", "--eval_every", "0", "--max_length", "64", "--lr", "1e-3"]
    return args + ["--task_eval_rows", "5", "--max_new_tokens", "6", "--judge", str(reward_run)]


@pytest.fixture(scope="module")
def dpo_one(tmp_path_factory, dpo_args) -> Path:
    return one_process(tmp_path_factory.mktemp("dpo-one"), dpo_args, 8)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_dpo_with_reference_and_judge_on_two_processes_matches_one_process(tmp_path, dpo_args, dpo_one, engine):
    # Under ZeRO-3 the reference and the judge run in engines of their own.
    assert_same_run(dpo_one, two_processes(tmp_path, engine, dpo_args, 4), 4)


@pytest.fixture(scope="module")
def ppo_args(sft_run) -> list[str]:
    # One minibatch per PPO epoch, so that both runs see the same minibatches.
    args = [str(REPO / "recipes" / "ppo.py"), "--init", str(sft_run), "--reward_fn", "helpers:short_answer_reward"]
    args += ["--max_steps", "3", "--task", "none", "--max_length", "64", "--max_new_tokens", "8"]
    return args + ["--task_eval_rows", "8", "--ppo_epochs", "2", "--num_mini_batches", "1", "--value_lr", "1e-3"]


@pytest.fixture(scope="module")
def ppo_one(tmp_path_factory, ppo_args) -> Path:
    return one_process(tmp_path_factory.mktemp("ppo-one"), ppo_args + ["--lr", "3e-4"], 8)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_ppo_on_two_processes_matches_one_process(tmp_path, ppo_args, ppo_one, engine):
    """Rollouts sharded across processes, whitening and losses over the global batch. Under FSDP2 the policy
    generates alone inside the sharded actor-critic, whose tied embeddings must stay tied, and its layers are
    checkpointed."""
    # Under FSDP2 with gradient checkpointing too (the update runs in training mode for it): the same curve.
    checkpointing = ["--gradient_checkpointing", "true"] if engine == "fsdp2" else []
    two = two_processes(tmp_path, engine, ppo_args + ["--lr", "3e-4", *checkpointing], 4)
    assert_same_run(ppo_one, two, 3, PPO_KEYS)


def test_lora_is_refused_where_parameters_are_sharded():
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(deepspeed_plugin=None))
    zero3_plugin = SimpleNamespace(zero_stage=3)
    zero3 = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=zero3_plugin)
    )
    for accelerator in (fsdp, zero3):
        with pytest.raises(LLMTrainError, match=r"--lora is not supported with FSDP or DeepSpeed ZeRO-3.*ddp.yaml"):
            add_lora(None, SftConfig(lora=True), "CAUSAL_LM", accelerator)
