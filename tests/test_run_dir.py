"""The run folder: --overwrite replaces a finished run only once the new one has finished, a run is locked while a
process trains in it, and a stage that fails before training leaves no folder behind."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_FLAGS, env_for, fit_line, logged, tiny_config

from llmtrain.config import SftConfig
from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.registry import list_runs, read_manifest
from llmtrain.run_dir import Run
from llmtrain.runtime import make_accelerator
from llmtrain.stages import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def entries(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir())


def open_fit(runs: Path, **overrides) -> Run:
    cfg = SftConfig(**{"runs_dir": str(runs), "run_name": "fit", **overrides})
    return Run.open(cfg, "sft", "linear", make_accelerator(cfg))


# ---------------------------------------------------------------- --overwrite


def test_an_overwrite_with_bad_data_leaves_the_finished_run_byte_identical(tmp_path, small_corpus):
    cfg = tiny_config(tmp_path, small_corpus, max_steps=3, eval_every=0, num_samples=0, run_name="done")
    pretrain.run(cfg)
    before = files(tmp_path / "done")
    cfg.overwrite, cfg.data = True, str(tmp_path / "typo.txt")
    with pytest.raises(LLMTrainError, match="typo.txt does not exist"):
        pretrain.run(cfg)
    assert files(tmp_path / "done") == before
    assert entries(tmp_path) == ["done"]  # no temporary folder, and the lock went with the failed run


def test_an_overwrite_replaces_the_run_when_it_finishes_and_leaves_no_temporary_folder(
    tmp_path, small_corpus, monkeypatch
):
    cfg = tiny_config(tmp_path, small_corpus, max_steps=3, eval_every=0, num_samples=0, run_name="done")
    pretrain.run(cfg)
    before = files(tmp_path / "done")
    during = []
    original = pretrain.TokenWindows.random_batch

    def look_at_the_old_run(self, *args, **kwargs):
        during.append(files(tmp_path / "done") == before)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pretrain.TokenWindows, "random_batch", look_at_the_old_run)
    cfg.overwrite, cfg.seed, cfg.max_steps = True, 7, 4
    assert pretrain.run(cfg) == tmp_path / "done"
    assert during == [True] * 4  # the old run stayed whole while the new one trained
    after = files(tmp_path / "done")
    assert after["model.safetensors"] != before["model.safetensors"]
    assert entries(tmp_path) == ["done"]  # no .overwrite, .replaced or lock left
    manifest = read_manifest(tmp_path / "done")
    assert manifest["name"] == "done" and manifest["status"] == "finished" and manifest["config"]["seed"] == 7
    assert sorted({json.loads(line)["step"] for line in after["metrics.jsonl"].decode().splitlines()}) == [1, 2, 3, 4]
    assert not any(b".overwrite" in data for data in after.values())  # no file names the temporary folder


def test_an_overwrite_that_fails_in_training_leaves_the_finished_run_untouched_and_is_not_listed(tmp_path):
    fit_line(tmp_path)
    before = files(tmp_path / "fit")
    with pytest.raises(LLMTrainError, match="not finite|became"):
        fit_line(tmp_path, lr=1e30, overwrite=True)  # its gradients or weights become NaN
    assert files(tmp_path / "fit") == before
    assert read_manifest(tmp_path / ".overwrite" / "fit")["status"] == "failed"
    assert [(Path(m["_dir"]).name, m["status"]) for m in list_runs(tmp_path)] == [("fit", "finished")]
    assert entries(tmp_path) == [".overwrite", "fit"]  # and the lock is released


def test_an_interrupted_overwrite_is_resumed_by_the_same_command_and_replaces_the_run_at_its_finish(tmp_path):
    fit_line(tmp_path, lr=0.1)
    before = files(tmp_path / "fit")
    _, whole = fit_line(tmp_path / "whole")
    with pytest.raises(RunInterrupted, match=r"SIGTERM at step 4; checkpoint saved in .*\.overwrite/fit"):
        fit_line(tmp_path, stop_at=3, overwrite=True)
    assert files(tmp_path / "fit") == before

    run, resumed = fit_line(tmp_path, overwrite=True)  # the same command
    assert run.path == tmp_path / "fit" and entries(tmp_path) == ["fit", "whole"]
    manifest = read_manifest(run.path)
    assert manifest["name"] == "fit" and manifest["resumed_at_steps"] == [4] and manifest["config"]["lr"] == 0.3
    assert [json.loads(line)["step"] for line in (run.path / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)
    assert torch.equal(torch.load(run.path / "weights.pt")["weight"], whole.weight)


def test_a_swap_cut_short_between_its_renames_is_completed_by_the_next_start(tmp_path, monkeypatch):
    fit_line(tmp_path, lr=0.1)
    real_rename = Path.rename

    def killed_before_the_second_rename(self, target):
        if self.name == "fit" and self.parent.name == ".overwrite":  # the finished replacement's own rename
            raise OSError("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_second_rename)
    with pytest.raises(OSError, match="killed"):
        fit_line(tmp_path, overwrite=True)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not (tmp_path / "fit").exists() and (tmp_path / ".replaced" / "fit").is_dir()

    with pytest.raises(LLMTrainError, match="is finished; it will not be overwritten"):
        open_fit(tmp_path)
    assert read_manifest(tmp_path / "fit")["config"]["lr"] == 0.3  # the finished replacement took its place
    assert entries(tmp_path) == ["fit"]


# ---------------------------------------------------------------- parents


def a_model(folder: Path, fill: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(fill * (3 << 20))  # large enough to be sampled, not read whole
    return folder


def test_a_resumed_run_refuses_a_parent_that_moved_or_changed_on_disk(tmp_path):
    first, second = a_model(tmp_path / "sft-a", b"a"), a_model(tmp_path / "sft-b", b"b")
    with pytest.raises(RunInterrupted):
        fit_line(tmp_path, stop_at=3, parent=first)
    assert read_manifest(tmp_path / "fit")["parent_models"]["init"]["path"] == str(first)

    with pytest.raises(LLMTrainError, match=r"started from init .*sft-a.*now names .*sft-b.*--init .*sft-a"):
        fit_line(tmp_path, resume=True, parent=second)  # as `--init latest` after a newer run appeared
    weights = first / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: 2 << 20] + b"c" + original[(2 << 20) + 1 :])  # one byte, same size
    with pytest.raises(LLMTrainError, match=r"sft-a, changed on disk since the run started"):
        fit_line(tmp_path, resume=True, parent=first)
    weights.write_bytes(original)
    run, _ = fit_line(tmp_path, resume=True, parent=first)
    assert read_manifest(run.path)["status"] == "finished"


def test_a_resumed_run_refuses_a_hub_parent_that_moved_to_a_new_revision(tmp_path):
    snapshots = tmp_path / "hub" / "models--org--tiny-lm" / "snapshots"
    first, newer = a_model(snapshots / ("a" * 40), b"a"), a_model(snapshots / ("b" * 40), b"b")
    with pytest.raises(RunInterrupted):
        fit_line(tmp_path, stop_at=3, parent=first)
    assert read_manifest(tmp_path / "fit")["parent_models"]["init"]["revision"] == "a" * 40

    moved = rf"at Hub revision a{{12}}, but .* is now revision b{{12}} .*--init {first} "
    with pytest.raises(LLMTrainError, match=moved):
        fit_line(tmp_path, resume=True, parent=newer)  # the Hub's main moved on between the start and the resume
    run, _ = fit_line(tmp_path, resume=True, parent=first)  # the revision it started with, as the message says
    assert read_manifest(run.path)["status"] == "finished"


# ---------------------------------------------------------------- resuming with other options


def test_a_resume_with_a_new_learning_rate_trains_with_it_from_the_resumed_step_and_records_it(tmp_path, capsys):
    with pytest.raises(RunInterrupted, match="SIGTERM at step 4"):
        fit_line(tmp_path, stop_at=4, log_every=1)
    run, _ = fit_line(tmp_path, lr=0.1, max_steps=10, log_every=1)  # the same command with --lr and --max_steps
    assert "Resuming fit from step 4 (step-0000004). Changed since that checkpoint, from this step on: --lr 0.1 " \
        "(was 0.3), --max_steps 10 (was 8)." in capsys.readouterr().out  # fmt: skip
    lrs = {step: row["lr"] for step, row in logged(run.path).items()}
    assert lrs == {**dict.fromkeys(range(1, 5), 0.3), **dict.fromkeys(range(5, 11), pytest.approx(0.1))}
    manifest = read_manifest(run.path)
    assert manifest["resumed_at_steps"] == [4] and manifest["config"]["lr"] == 0.1
    assert manifest["resumed_changes"] == [
        {"step": 4, "option": "lr", "old": 0.3, "new": 0.1},
        {"step": 4, "option": "max_steps", "old": 8, "new": 10},
    ]


def test_a_resume_after_a_later_failure_replaces_the_changes_recorded_past_its_checkpoint(tmp_path):
    with pytest.raises(RunInterrupted):
        fit_line(tmp_path, stop_at=3, save_every=2)
    with pytest.raises(LLMTrainError):
        fit_line(tmp_path, lr=0.1, save_every=2, nan_loss_at=7)  # resumed at 4 with lr 0.1, saved 6, failed at 7
    assert read_manifest(tmp_path / "fit")["resumed_changes"] == [{"step": 4, "option": "lr", "old": 0.3, "new": 0.1}]
    run, _ = fit_line(tmp_path, lr=0.05, save_every=2)
    manifest = read_manifest(run.path)
    assert manifest["resumed_at_steps"] == [4, 6] and manifest["status"] == "finished"
    assert manifest["resumed_changes"] == [
        {"step": 4, "option": "lr", "old": 0.3, "new": 0.1},
        {"step": 6, "option": "lr", "old": 0.1, "new": 0.05},  # compared with what step 6 was trained with
    ]


def test_a_resume_that_changes_the_data_order_or_the_model_is_refused_naming_each_change(tmp_path):
    with pytest.raises(RunInterrupted):
        fit_line(tmp_path, stop_at=3)
    checkpoint = files(tmp_path / "fit" / "checkpoints")
    with pytest.raises(LLMTrainError) as refused:
        fit_line(tmp_path, batch_size=8, seed=7, lora=True, lr=0.1)
    message = str(refused.value)
    assert "Run 'fit' cannot resume from its checkpoint at step 4 with other values of options that shape" in message
    for change in ("--seed 7 (the checkpoint's: 1337)", "--lora true (the checkpoint's: false)",
                   "--batch_size 8 x 1 process (the checkpoint's: 32 x 1 process)"):  # fmt: skip
        assert change in message
    assert "--lr" not in message and "--overwrite true" in message and "a new --run_name" in message
    assert files(tmp_path / "fit" / "checkpoints") == checkpoint and read_manifest(tmp_path / "fit")["config"]["seed"]
    assert entries(tmp_path) == ["fit"]  # the lock was released

    run, _ = fit_line(tmp_path, batch_size=8, seed=7, overwrite=True)  # the fix the message gives: start afresh
    manifest = read_manifest(run.path)
    assert manifest["resumed_at_steps"] == [] and manifest["config"]["seed"] == 7 and manifest["status"] == "finished"


def test_a_per_process_batch_may_change_where_the_batch_of_all_processes_stays_the_same(tmp_path):
    from llmtrain.run_dir import resume_changes

    with pytest.raises(RunInterrupted):
        fit_line(tmp_path, stop_at=3, batch_size=2)
    checkpoint = tmp_path / "fit" / "checkpoints" / "step-0000004"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["config"]["batch_size"] == 2 and state["world_size"] == 1
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))  # as if on 2 processes
    one_process = SftConfig(**{**state["config"], "batch_size": 4})
    assert resume_changes(one_process, checkpoint, tmp_path / "fit", world=1) == [
        {"step": 4, "option": "batch_size", "old": 2, "new": 4}
    ]
    with pytest.raises(LLMTrainError, match=r"--batch_size 3 x 1 process \(the checkpoint's: 2 x 2 processes\)"):
        resume_changes(replace(one_process, batch_size=3), checkpoint, tmp_path / "fit", world=1)


def test_resume_with_every_checkpoint_gone_says_so_before_it_starts_from_step_0(tmp_path, capsys):
    with pytest.raises(RunInterrupted):
        fit_line(tmp_path, stop_at=3)
    shutil.rmtree(tmp_path / "fit" / "checkpoints")
    capsys.readouterr()
    run, _ = fit_line(tmp_path, resume=True)
    out = capsys.readouterr().out
    said = "--resume: run 'fit' has no checkpoint to resume from (none was saved before it stopped, or every one is " \
        "damaged), so nothing is resumed: it starts again from step 0."  # fmt: skip
    assert said in out and out.index(said) < out.index("run fit: a linear fit")  # before training
    assert "Resuming" not in out and read_manifest(run.path)["resumed_at_steps"] == []
    assert sorted(logged(run.path)) == [2, 4, 6, 8]


# ---------------------------------------------------------------- the lock


def test_a_second_start_on_a_run_in_use_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from llmtrain.run_dir import RunLock; "
         "lock = RunLock.acquire(__import__('pathlib').Path(sys.argv[1])); print('locked', flush=True); "
         "sys.stdin.read()", str(tmp_path / "fit")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env_for(tmp_path), cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LLMTrainError) as refused:
            open_fit(tmp_path)
        message = str(refused.value)
        assert f"process {holder.pid} on host {socket.gethostname()} has held its lock since 20" in message
        assert "another --run_name" in message and f"delete {tmp_path / '.fit.lock'}" in message
        assert entries(tmp_path) == [".fit.lock"]
    finally:
        holder.communicate("", timeout=60)  # the holder ends normally: its lock goes with it
    assert entries(tmp_path) == []
    open_fit(tmp_path)


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    started = "2025-01-01T00:00:00"
    lock = {"pid": dead.pid, "host": socket.gethostname(), "started": started, "time": time.time() - 5}
    (tmp_path / ".fit.lock").write_text(json.dumps(lock))
    run, _ = fit_line(tmp_path)
    assert read_manifest(run.path)["status"] == "finished"
    out = capsys.readouterr().out
    assert f"Taking over the lock of run 'fit': process {dead.pid} on {lock['host']}, which took it at {started}" in out


def test_the_lock_is_released_when_a_run_finishes_fails_or_is_interrupted(tmp_path):
    fit_line(tmp_path / "finishes")
    assert entries(tmp_path / "finishes") == ["fit"]
    with pytest.raises(LLMTrainError):
        fit_line(tmp_path / "fails", lr=1e30)
    assert entries(tmp_path / "fails") == ["fit"]
    with pytest.raises(RunInterrupted):
        fit_line(tmp_path / "interrupted", stop_at=2)
    assert entries(tmp_path / "interrupted") == ["fit"]
    fit_line(tmp_path / "interrupted")  # and it resumes


def test_new_runs_opened_together_get_different_names(tmp_path):
    cfg = SftConfig(runs_dir=str(tmp_path))
    first, second = (Run.open(cfg, "sft", "linear", make_accelerator(cfg)) for _ in range(2))
    assert first.name != second.name and first.name.startswith("sft-linear-")


def test_a_run_name_with_a_leading_dot_is_refused(tmp_path):
    with pytest.raises(LLMTrainError, match="names starting with '.' are kept for llmtrain"):
        open_fit(tmp_path / "runs", run_name=".overwrite")


@pytest.mark.parametrize("name", ["../escaped", "team/exp1", "/absolute/run"])
def test_a_run_name_outside_the_runs_folder_is_refused_before_anything_is_created(tmp_path, name):
    cfg = SftConfig(runs_dir=str(tmp_path / "runs"))
    cfg.run_name = name  # set after the config was made: the run folder checks it again
    with pytest.raises(LLMTrainError, match="is not a run name: a run is one folder inside --runs_dir"):
        Run.open(cfg, "sft", "linear", make_accelerator(cfg))
    assert entries(tmp_path) == []  # no runs folder, no lock, nothing beside it


# ---------------------------------------------------------------- no empty folders


def test_a_stage_that_fails_on_bad_data_leaves_no_run_folder_and_a_retry_in_the_same_process_runs(
    tmp_path, small_corpus
):
    for name in ("named", None):
        with pytest.raises(LLMTrainError, match="does not exist"):
            pretrain.run(tiny_config(tmp_path, tmp_path / "typo.txt", run_name=name))
    assert entries(tmp_path) == []
    cfg = tiny_config(tmp_path, small_corpus, max_steps=2, eval_every=0, num_samples=0, run_name="named")
    assert read_manifest(pretrain.run(cfg))["status"] == "finished"


@pytest.mark.slow
def test_a_failed_start_of_a_recipe_leaves_nothing_and_a_second_process_on_a_running_run_is_refused(
    tmp_path, small_corpus
):
    def recipe(*args: str):
        cmd = [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--run_name", "r", *TINY_FLAGS, *args]
        return subprocess.Popen(cmd, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    _, err = recipe("--data", str(tmp_path / "typo.txt")).communicate(timeout=300)
    assert "typo.txt does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or entries(tmp_path / "runs") == []

    first = recipe("--data", str(small_corpus), "--max_steps", "100000", "--log_every", "1")
    metrics = tmp_path / "runs" / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not metrics.exists():
        time.sleep(0.2)
    second = recipe("--data", str(small_corpus), "--max_steps", "100000")
    _, err = second.communicate(timeout=300)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 2 and f"process {first.pid} on host" in err and "Traceback" not in err
    assert first.returncode == 128 + signal.SIGTERM and entries(tmp_path / "runs") == ["r"]
