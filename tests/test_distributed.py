import json
import socket
import subprocess
import sys

import torch
from conftest import REPO
from safetensors.torch import load_file
from test_cli import TINY_FLAGS, env_for

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


def free_port() -> int:
    """A port of its own, so that another 2-process job on the machine (a second test run) cannot meet this one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged(run_dir) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def assert_two_processes_match_one(
    tmp_path, args: list[str], batch: int, steps: int, launch: list[str] = LAUNCH_TWO, accum: int = 1
) -> None:
    """1 process with batch 2B and 2 processes (gloo, or another `launch`) with batch B, each batch taken in
    `accum` micro-steps: same losses and the same final weights."""
    env = env_for(tmp_path)
    one = subprocess.run(
        [sys.executable, *args, "--batch_size", str(2 * batch // accum), "--grad_accum", str(accum)]
        + ["--run_name", "one"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [*launch, "--main_process_port", str(free_port()), *args, "--batch_size", str(batch // accum)]
        + ["--grad_accum", str(accum), "--run_name", "two"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    runs = tmp_path / "runs"
    a, b = logged(runs / "one"), logged(runs / "two")
    assert json.loads((runs / "two" / "llmtrain.json").read_text())["world_size"] == 2  # two real processes
    for step in range(1, steps + 1):
        assert abs(a[step]["train_loss"] - b[step]["train_loss"]) < 1e-4, step
    assert abs(a[steps]["val_loss"] - b[steps]["val_loss"]) < 1e-4
    wa, wb = load_file(runs / "one" / "model.safetensors"), load_file(runs / "two" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-4)


def test_pretraining_with_two_processes_matches_one_process(tmp_path, small_corpus):
    args = [
        str(REPO / "recipes" / "pretrain.py"),
        "--data",
        str(small_corpus),
        "--max_steps",
        "12",
        "--log_every",
        "1",
        *TINY_FLAGS,
    ]
    assert_two_processes_match_one(tmp_path, args, batch=4, steps=12)


def test_sft_with_two_processes_matches_one_process(tmp_path, finished_run):
    args = [
        str(REPO / "recipes" / "sft.py"),
        "--init",
        str(finished_run),
        "--max_rows",
        "200",
        "--max_steps",
        "8",
        "--log_every",
        "1",
        "--task",
        "none",
        "--eval_every",
        "0",
        "--max_length",
        "64",
        "--num_samples",
        "0",
    ]
    assert_two_processes_match_one(tmp_path, args, batch=4, steps=8)


def test_reward_model_with_two_processes_matches_one_process(tmp_path, sft_run):
    args = [str(REPO / "recipes" / "reward.py"), "--init", str(sft_run), "--max_rows", "200", "--max_steps", "6"]
    args += ["--log_every", "1", "--eval_every", "0", "--max_length", "64", "--lr", "3e-3"]
    assert_two_processes_match_one(tmp_path, args, batch=4, steps=6)


def test_dpo_with_two_processes_matches_one_process(tmp_path, sft_run):
    args = [str(REPO / "recipes" / "dpo.py"), "--init", str(sft_run), "--max_rows", "200", "--max_steps", "6"]
    args += ["--log_every", "1", "--eval_every", "0", "--max_length", "64", "--lr", "1e-3"]
    args += ["--task", "none", "--judge", "none"]
    assert_two_processes_match_one(tmp_path, args, batch=4, steps=6)
