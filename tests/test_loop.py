"""The loop spine on a tiny regression model: stops, logging, NaN stop, signals, resume."""

import pytest
import torch
from helpers import fit_line, logged

from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.registry import read_manifest
from llmtrain.run_dir import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_loop_trains_to_max_steps_and_logs_lr_and_timing_every_log_every(tmp_path):
    run, _ = fit_line(tmp_path)
    rows = list(logged(run.path).values())
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] / 2
    for row in rows:
        assert row["lr"] == pytest.approx(0.3)
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0
    manifest = read_manifest(run.path)
    assert manifest["status"] == "finished"
    assert manifest["metrics"]["steps"] == 8 and manifest["metrics"]["stop_reason"] == "max_steps"
    assert manifest["metrics"]["train_loss"] == rows[-1]["train_loss"]


def test_a_time_budget_stops_the_loop_and_names_the_reason(tmp_path):
    run, _ = fit_line(tmp_path, max_time_s=1e-9, max_steps=1000)
    metrics = read_manifest(run.path)["metrics"]
    assert metrics["stop_reason"] == "max_time_s" and metrics["steps"] == 1


def test_a_non_finite_loss_stops_the_run_with_advice_and_marks_it_failed(tmp_path):
    with pytest.raises(LLMTrainError, match=r"training loss became nan at step 4.*Lower --lr"):
        fit_line(tmp_path, nan_loss_at=4)
    assert read_manifest(tmp_path / "fit")["status"] == "failed"


def test_a_signal_saves_a_checkpoint_and_resume_ends_on_the_same_weights(tmp_path):
    _, whole = fit_line(tmp_path / "whole")
    with pytest.raises(RunInterrupted, match="SIGTERM at step 3"):
        fit_line(tmp_path / "cut", stop_at=3)
    assert read_manifest(tmp_path / "cut" / "fit")["status"] == "interrupted"
    run, resumed = fit_line(tmp_path / "cut", resume=True)
    assert sorted(logged(run.path)) == [2, 4, 6, 8]
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)


def test_a_signal_after_the_last_step_leaves_a_run_that_resumes_straight_to_the_final_save(tmp_path):
    _, whole = fit_line(tmp_path / "whole")
    with pytest.raises(RunInterrupted, match="SIGTERM at step 8"):
        fit_line(tmp_path / "cut", stop_in_final=True)
    cut = tmp_path / "cut" / "fit"
    assert read_manifest(cut)["status"] == "interrupted"
    assert [p.name for p in (cut / "checkpoints").glob("step-*")] == ["step-0000008"]
    assert not (cut / "weights.pt").exists()
    run, resumed = fit_line(tmp_path / "cut", resume=True)
    manifest = read_manifest(run.path)
    assert manifest["status"] == "finished" and manifest["resumed_at_steps"] == [8]
    assert sorted(logged(run.path)) == [2, 4, 6, 8] and not (cut / "checkpoints").exists()
    assert torch.equal(torch.load(cut / "weights.pt")["weight"], whole.weight)
    assert torch.equal(resumed.weight, whole.weight)


def test_nan_gradients_stop_the_run_before_the_step_is_saved(tmp_path):
    with pytest.raises(LLMTrainError, match=r"gradients were not finite.*at step 5.*last good checkpoint"):
        fit_line(tmp_path, nan_grads_at=(5,), save_every=1)
    run = tmp_path / "fit"
    assert read_manifest(run)["status"] == "failed"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000003", "step-0000004"]


def test_nan_gradients_are_skipped_and_counted_when_asked_and_stop_past_the_allowance(tmp_path):
    run, model = fit_line(tmp_path / "skip", nan_grads_at=(3, 6), skip_nonfinite_steps=2)
    assert read_manifest(run.path)["metrics"]["skipped_steps"] == 2
    assert torch.isfinite(model.weight).all()
    with pytest.raises(LLMTrainError, match="gradients were not finite.*2 such steps, more than"):
        fit_line(tmp_path / "stop", nan_grads_at=(3, 6), skip_nonfinite_steps=1)


def test_weights_that_are_not_finite_are_never_saved(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(Run, "save_checkpoint", lambda self, *args: saved.append(args))
    with pytest.raises(LLMTrainError, match="weights are not finite.*after step 1.*not saved"):
        fit_line(tmp_path, lr=float("inf"), save_every=1)
    assert saved == []


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(tmp_path, capsys, damage):
    _, whole = fit_line(tmp_path / "whole")
    with pytest.raises(RunInterrupted):
        fit_line(tmp_path / "cut", stop_at=5, save_every=2)  # leaves step 4 and step 5 (the signal's)
    weights = tmp_path / "cut" / "fit" / "checkpoints" / "step-0000005" / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    capsys.readouterr()
    run, resumed = fit_line(tmp_path / "cut", resume=True, save_every=2)
    out = capsys.readouterr().out
    assert "Skipping checkpoint step-0000005" in out and "model.safetensors" in out
    assert "Resuming fit from step 4" in out
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)
