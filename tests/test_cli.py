import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, TINY_FLAGS, env_for, manifest

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


@pytest.mark.parametrize("command", ["pretrain", "sft", "ppo", "prepare"])
def test_help_after_a_stage_prints_its_options_and_exits_cleanly(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out, err = capsys.readouterr()
    assert "--lr LR" in out and "--run_name RUN_NAME" in out and "Unknown config key" not in err


def runs_in_order(tmp_path, *runs):
    """A runs folder holding copies of `runs`, created one after the other in the order given."""
    folder = tmp_path / "runs"
    for i, run in enumerate(runs):
        shutil.copytree(run, folder / run.name)
        record = manifest(folder / run.name) | {"created": f"2030-01-0{i + 1}T00:00:00"}
        (folder / run.name / "llmtrain.json").write_text(json.dumps(record))
    return folder


def test_latest_names_the_newest_language_model_run_and_for_score_the_newest_reward_run(
    tmp_path, finished_run, sft_run, reward_run, capsys
):
    runs = str(runs_in_order(tmp_path, finished_run, sft_run, reward_run))
    assert main(["generate", "latest", "--prompt", "What is 1 + 2?", "--max_new_tokens", "3", "--runs_dir", runs]) == 0
    assert "latest: run sft-tiny (sft, 2030-01-02T00:00:00)" in capsys.readouterr().err  # not the newer reward run
    assert main(["eval", "latest", "--max_rows", "4", "--max_new_tokens", "4", "--runs_dir", runs]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["run"] == "sft-tiny" and {"val_loss", "task_accuracy"} <= result.keys()
    assert main(["score", "latest", "--prompt", "What is 1 + 2?", "--response", "1 + 2 = 3", "--runs_dir", runs]) == 0
    out, err = capsys.readouterr()
    assert "latest: run rm-tiny (reward" in err and float(out)
    assert main(["chat", "latest", "--runs_dir", str(tmp_path / "none")]) == 2
    assert "`llmtrain chat latest`: there is no finished pretrain, sft, dpo or ppo run in" in capsys.readouterr().err


def test_a_reward_model_is_refused_by_generate_and_chat_and_evaluated_as_one_by_eval(reward_run, capsys):
    runs = str(reward_run.parent)
    for command in (["generate", "rm-tiny", "--prompt", "What is 1 + 2?"], ["chat", "rm-tiny"]):
        assert main([*command, "--runs_dir", runs]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: 'rm-tiny' is a reward model: it scores an answer, it does not write one, so "
                              f"`llmtrain {command[0]}` cannot use it") and "llmtrain score rm-tiny" in err  # fmt: skip
    assert main(["eval", "rm-tiny", "--runs_dir", runs]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["evaluated_as"] == "reward model" and result["pairs"] == 400 and "task_accuracy" not in result
    assert result["reward_accuracy"] == pytest.approx(manifest(reward_run)["metrics"]["reward_accuracy"], abs=0.01)
