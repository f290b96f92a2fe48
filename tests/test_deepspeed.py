"""The stages under DeepSpeed ZeRO-2 and ZeRO-3 (launch/deepspeed-zero*.yaml as shipped, 2 CPU processes on gloo)
give what one process gives: the stages accumulate (telling the engine where each boundary is) and clip
themselves, evaluate in step across processes, and keep their frozen models in engines of their own."""

import json

import pytest
from conftest import REPO
from test_distributed import assert_two_processes_match_one, free_port, logged
from test_ppo import assert_ppo_two_processes_match_one

pytest.importorskip("deepspeed")


def deepspeed(stage: int) -> list[str]:
    config = REPO / "launch" / f"deepspeed-zero{stage}.yaml"
    return ["accelerate", "launch", "--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no"]


def test_sft_under_zero3_matches_one_process(tmp_path, finished_run):
    # Five held-out prompts: one process answers three, the other two, and the sharded forwards stay in step.
    args = [str(REPO / "recipes" / "sft.py"), "--init", str(finished_run), "--max_rows", "200", "--max_steps", "6"]
    args += ["--log_every", "1", "--eval_every", "0", "--max_length", "64", "--task_eval_rows", "5"]
    args += ["--max_new_tokens", "6"]
    assert_two_processes_match_one(tmp_path, args, batch=4, steps=6, launch=deepspeed(3), accum=2)
    assert json.loads((tmp_path / "runs" / "two" / "llmtrain.json").read_text())["engine"] == "DEEPSPEED ZeRO-3"


def test_dpo_under_zero3_with_reference_and_judge_matches_one_process(tmp_path, sft_run, reward_run):
    args = [str(REPO / "recipes" / "dpo.py"), "--init", str(sft_run), "--max_rows", "200", "--max_steps", "4"]
    args += ["--log_every", "1", "--eval_every", "0", "--max_length", "64", "--lr", "1e-3"]
    args += ["--task_eval_rows", "5", "--max_new_tokens", "6", "--judge", str(reward_run)]
    assert_two_processes_match_one(tmp_path, args, batch=4, steps=4, launch=deepspeed(3))
    runs = tmp_path / "runs"
    assert logged(runs / "one")[4]["win_rate"] == logged(runs / "two")[4]["win_rate"]


def test_ppo_under_zero2_matches_one_process(tmp_path, sft_run):
    """Policy and critic in one engine with one optimizer. DeepSpeed clips the gradient norm of both together
    (the stage clips each apart), so clipping is off here to compare the updates themselves."""
    launch = [*deepspeed(2), "--main_process_port", str(free_port())]
    assert_ppo_two_processes_match_one(sft_run, tmp_path, launch, steps=2, extra=["--grad_clip", "0"])
    assert json.loads((tmp_path / "runs" / "two" / "llmtrain.json").read_text())["engine"] == "DEEPSPEED ZeRO-2"
