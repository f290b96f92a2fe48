import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, TINY_FLAGS, env_for

from llmtrain.cli import main


def test_runs_lists_each_run_with_its_stage_status_and_headline_metric(finished_run, capsys):
    assert main(["runs", "--runs_dir", str(finished_run.parent)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "stage", "status"]
    row = next(line for line in out if line.startswith("tiny "))
    assert row.split()[1:3] == ["pretrain", "finished"] and "test_bpb=" in row  # the test set's figure


def test_generate_continues_the_prompt_from_a_run(finished_run, capsys):
    code = main(
        [
            "generate",
            "tiny",
            "--prompt",
            "What is 12 + 30?",
            "--max_new_tokens",
            "6",
            "--greedy",
            "--runs_dir",
            str(finished_run.parent),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("What is 12 + 30?") and len(out.strip()) > len("What is 12 + 30?")


def test_user_errors_print_one_message_and_no_traceback(tmp_path, capsys):
    assert main(["pretrain", "--max_step", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown config key 'max_step'") and "Traceback" not in err
    assert main(["generate", "no-such-run", "--runs_dir", str(tmp_path)]) == 2
    assert "model no-such-run: there is no run of that name" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_runs_the_recipe_end_to_end(tmp_path, small_corpus):
    cmd = [
        "accelerate",
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "recipes" / "pretrain.py"),
        "--data",
        str(small_corpus),
        "--max_steps",
        "20",
        "--run_name",
        "launched",
        *TINY_FLAGS,
    ]
    result = subprocess.run(cmd, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Finished launched" in result.stdout and "samples:" in result.stdout
    manifest = json.loads((tmp_path / "runs" / "launched" / "llmtrain.json").read_text())
    assert manifest["status"] == "finished" and manifest["metrics"]["steps"] == 20


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, small_corpus):
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "pretrain.py"),
        "--data",
        str(small_corpus),
        "--max_steps",
        "100000",
        "--log_every",
        "1",
        "--run_name",
        "preempted",
        *TINY_FLAGS,
    ]
    proc = subprocess.Popen(cmd, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "preempted" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Stopped by SIGTERM" in err and "Traceback" not in err
    checkpoints = list((tmp_path / "runs" / "preempted" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    assert json.loads((tmp_path / "runs" / "preempted" / "llmtrain.json").read_text())["status"] == "interrupted"


def test_tokenizer_command_trains_and_saves_a_loadable_tokenizer(tmp_path, small_corpus, capsys):
    from transformers import AutoTokenizer

    assert main(["tokenizer", "--data", str(small_corpus), "--vocab_size", "300", "--out", str(tmp_path / "t")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert len(tokenizer) == 300 and tokenizer.decode(tokenizer("What is 12 + 30?").input_ids) == "What is 12 + 30?"
