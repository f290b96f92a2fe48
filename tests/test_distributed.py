import json
import subprocess
import sys

import torch
from conftest import REPO
from safetensors.torch import load_file
from test_cli import TINY_FLAGS, env_for


def losses(run_dir) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path, small_corpus):
    common = [
        str(REPO / "recipes" / "pretrain.py"),
        "--data",
        str(small_corpus),
        "--max_steps",
        "12",
        "--log_every",
        "1",
        *TINY_FLAGS,
    ]
    env = env_for(tmp_path)
    one = subprocess.run(
        [sys.executable, *common, "--batch_size", "8", "--run_name", "one"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [
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
    two = subprocess.run(
        [*launch, *common, "--batch_size", "4", "--run_name", "two"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 processes" in two.stdout  # two real processes, not two lone copies

    runs = tmp_path / "runs"
    a, b = losses(runs / "one"), losses(runs / "two")
    for step in range(1, 13):
        assert abs(a[step]["train_loss"] - b[step]["train_loss"]) < 1e-4, step
    assert abs(a[12]["val_loss"] - b[12]["val_loss"]) < 1e-4
    wa, wb = load_file(runs / "one" / "model.safetensors"), load_file(runs / "two" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-4)


def test_sft_with_two_processes_matches_one_process(tmp_path, finished_run):
    common = [
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
    env = env_for(tmp_path)
    one = subprocess.run(
        [sys.executable, *common, "--batch_size", "8", "--run_name", "one"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [
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
    two = subprocess.run(
        [*launch, *common, "--batch_size", "4", "--run_name", "two"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    runs = tmp_path / "runs"
    a, b = losses(runs / "one"), losses(runs / "two")
    for step in range(1, 9):
        assert abs(a[step]["train_loss"] - b[step]["train_loss"]) < 1e-4, step
    assert abs(a[8]["val_loss"] - b[8]["val_loss"]) < 1e-4
    wa, wb = load_file(runs / "one" / "model.safetensors"), load_file(runs / "two" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-4)
