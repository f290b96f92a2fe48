"""The loop spine on a tiny regression model: stops, logging, host syncs, NaN stop, signals, resume."""

import sys
import types
from dataclasses import replace

import pytest
import torch
from helpers import fit_line, logged

from llmtrain import loop as loop_module
from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.loop import Loop
from llmtrain.registry import read_manifest
from llmtrain.run_dir import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def host_reads(monkeypatch) -> list[int]:
    """The steps at which the loop spine or the stage read a tensor's value on the host (what makes the host wait
    for a GPU); reads inside torch's own code are not counted."""
    steps: list[int] = []

    def counted(read):
        def spy(tensor, *args):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.endswith(("llmtrain/loop.py", "tests/helpers.py")):
                steps.append(caller.f_locals["self"].step if "self" in caller.f_locals else -1)
            return read(tensor, *args)

        return spy

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    return steps


@pytest.mark.parametrize("log_every, synced", [(1, [1, 2, 3, 4, 5, 6, 7, 8]), (4, [4, 8])])
def test_the_loop_reads_the_device_once_per_logged_line_not_every_step(tmp_path, monkeypatch, log_every, synced):
    reads = host_reads(monkeypatch)
    run, _ = fit_line(tmp_path, log_every=log_every)
    assert reads == [*synced, 8]  # and once more after the steps: the weights are checked before the last is saved
    assert sorted(logged(run.path)) == synced


def test_each_line_logs_the_average_of_the_steps_since_the_line_before(tmp_path):
    every_step = [r["train_loss"] for r in logged(fit_line(tmp_path / "one", log_every=1)[0].path).values()]
    lines = logged(fit_line(tmp_path / "four", log_every=4)[0].path)
    assert lines[4]["train_loss"] == pytest.approx(sum(every_step[:4]) / 4, rel=1e-6)
    assert lines[8]["train_loss"] == pytest.approx(sum(every_step[4:]) / 4, rel=1e-6)


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


def test_a_time_budget_stops_after_the_step_that_spends_it_with_few_syncs(tmp_path, monkeypatch):
    # A clock on which every step takes exactly one second.
    steps_begun = [0]
    real_reduce = Loop.reduce

    def reduce(self, *args, **kwargs):
        steps_begun[0] += 1
        return real_reduce(self, *args, **kwargs)

    monkeypatch.setattr(Loop, "reduce", reduce)
    monkeypatch.setattr(loop_module, "time", types.SimpleNamespace(perf_counter=lambda: float(steps_begun[0])))
    reads = host_reads(monkeypatch)
    run, _ = fit_line(tmp_path, max_time_s=20.5, max_steps=100, log_every=50)
    metrics = read_manifest(run.path)["metrics"]
    assert metrics["stop_reason"] == "max_time_s" and metrics["steps"] == 21  # as when every step syncs
    assert reads == [1, 10, 15, 17, 18, 19, 20, 21, 21]  # half the steps left each time, then every step; weights
    assert sorted(logged(run.path)) == [21]  # the last step's line


def test_a_non_finite_loss_stops_the_run_at_the_next_sync_step_before_its_checkpoint(tmp_path):
    with pytest.raises(LLMTrainError, match=r"training loss became nan in steps 3-4.*Lower --lr"):
        fit_line(tmp_path, nan_loss_at=3, save_every=2)
    assert read_manifest(tmp_path / "fit")["status"] == "failed"
    assert [p.name for p in (tmp_path / "fit" / "checkpoints").glob("step-*")] == ["step-0000002"]


def test_after_a_nan_stop_the_advice_resumes_from_the_checkpoint_it_names_with_the_lower_learning_rate(tmp_path):
    with pytest.raises(LLMTrainError) as stopped:
        fit_line(tmp_path, nan_loss_at=5, save_every=2, log_every=1)  # diverged in step 5, after the step-4 save
    message = str(stopped.value)
    assert f"The last good checkpoint, of step 4, is kept in {tmp_path / 'fit' / 'checkpoints'}. Lower --lr." in message
    assert "Then resume from it: the same command plus --run_name fit and the changed options, e.g. --lr 0.1" in message
    run, _ = fit_line(tmp_path, save_every=2, log_every=1, lr=0.1)  # as written: the same command, --lr 0.1
    manifest = read_manifest(run.path)
    assert manifest["status"] == "finished" and manifest["resumed_at_steps"] == [4]
    assert manifest["resumed_changes"] == [{"step": 4, "option": "lr", "old": 0.3, "new": 0.1}]
    assert [row["lr"] for row in logged(run.path).values()] == [0.3] * 4 + [pytest.approx(0.1)] * 4


def test_a_nan_stop_before_any_checkpoint_names_none_and_says_to_start_again(tmp_path):
    with pytest.raises(LLMTrainError) as stopped:
        fit_line(tmp_path, nan_loss_at=3, log_every=1)
    message = str(stopped.value)
    assert "checkpoint, of step" not in message and "resume from it" not in message
    assert "No checkpoint had been saved yet, so nothing of this run can be resumed. Lower --lr. Then start " \
        "again: the same command with a lower --lr, e.g. --lr 0.1." in message  # fmt: skip
    run, _ = fit_line(tmp_path, lr=0.1)
    assert read_manifest(run.path)["resumed_at_steps"] == [] and read_manifest(run.path)["status"] == "finished"


def test_a_signal_is_acted_on_at_the_next_sync_step_and_resume_ends_on_the_same_weights_and_lines(tmp_path):
    whole_run, whole = fit_line(tmp_path / "whole")
    with pytest.raises(RunInterrupted, match="SIGTERM at step 4"):  # sent during step 3; lines every 2 steps
        fit_line(tmp_path / "cut", stop_at=3)
    assert read_manifest(tmp_path / "cut" / "fit")["status"] == "interrupted"
    run, resumed = fit_line(tmp_path / "cut", resume=True)
    assert logged(run.path).keys() == logged(whole_run.path).keys() == {2, 4, 6, 8}
    losses = [[row["train_loss"] for row in logged(r.path).values()] for r in (run, whole_run)]
    assert losses[0] == losses[1]
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


@pytest.mark.parametrize("every, found, kept", [(1, "at step 5", [3, 4]), (4, "in steps 5-8", [4])])
def test_nan_gradients_stop_the_run_at_the_next_sync_step_before_anything_is_saved(tmp_path, every, found, kept):
    with pytest.raises(LLMTrainError, match=rf"gradients were not finite.*{found}.*last good checkpoint"):
        fit_line(tmp_path, nan_grads_at=(5,), save_every=every, log_every=every, max_steps=12)
    run = tmp_path / "fit"
    assert read_manifest(run)["status"] == "failed"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [f"step-{k:07d}" for k in kept]


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
        fit_line(tmp_path / "cut", stop_at=5, save_every=2)  # leaves step 4 and step 6 (the signal's, sent in 5)
    weights = tmp_path / "cut" / "fit" / "checkpoints" / "step-0000006" / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    capsys.readouterr()
    run, resumed = fit_line(tmp_path / "cut", resume=True, save_every=2)
    out = capsys.readouterr().out
    assert "Skipping checkpoint step-0000006" in out and "model.safetensors" in out
    assert "Resuming fit from step 4" in out
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)


def test_under_fp16_the_loss_scaler_skips_overflowing_steps_and_the_run_goes_on(tmp_path, monkeypatch):
    """On a GPU, fp16 gives the accelerator a GradScaler: its first steps often overflow, and it skips them and
    lowers its scale. The same here with the CPU's GradScaler."""
    import llmtrain.runtime

    make, scalers = llmtrain.runtime.make_accelerator, []

    def with_a_loss_scaler(cfg):
        accelerator = make(replace(cfg, mixed_precision="fp16"))
        accelerator.native_amp = True  # what fp16 on a GPU sets up, with a GradScaler
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        scalers.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(llmtrain.runtime, "make_accelerator", with_a_loss_scaler)
    run, model = fit_line(tmp_path, nan_grads_at=(3, 6))
    assert read_manifest(run.path)["status"] == "finished" and torch.isfinite(model.weight).all()
    assert scalers[0].get_scale() < 1.0  # it saw the two overflows, skipped those steps and lowered its scale


# ---------------------------------------------------------------- evaluations: best step, early stopping, fit

VAL = {2: 1.0, 4: 0.5, 6: 0.8, 8: 0.9}  # best at step 4, then worse twice: the last step's weights are not the best


def test_keep_best_saves_the_weights_of_the_best_evaluation_not_the_last_step(tmp_path):
    weights: dict[int, float] = {}
    run, model = fit_line(tmp_path, val_losses=VAL, weights_at=weights, keep_best="val_loss")
    m = read_manifest(run.path)
    assert m["best"] == {"step": 4, "metric": "val_loss", "value": 0.5} and m["metrics"]["steps"] == 8
    saved = torch.load(run.path / "weights.pt")["weight"].item()
    assert saved == weights[4] != weights[8]
    assert not (run.path / "checkpoints").exists()  # the best checkpoint goes with the others


def test_without_keep_best_the_last_steps_weights_are_kept(tmp_path):
    weights: dict[int, float] = {}
    run, _ = fit_line(tmp_path, val_losses=VAL, weights_at=weights)
    assert torch.load(run.path / "weights.pt")["weight"].item() == weights[8]
    assert "best" not in read_manifest(run.path)


def test_the_best_evaluation_survives_a_resume(tmp_path):
    weights: dict[int, float] = {}
    with pytest.raises(RunInterrupted):
        fit_line(tmp_path, stop_at=5, val_losses=VAL, weights_at=weights, keep_best="val_loss")
    run, _ = fit_line(tmp_path, val_losses=VAL, weights_at=weights, keep_best="val_loss", resume=True)
    assert read_manifest(run.path)["best"]["step"] == 4
    assert torch.load(run.path / "weights.pt")["weight"].item() == weights[4]


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path, capsys):
    val = {2: 1.0, 4: 0.9, 6: 0.95, 8: 0.97, 10: 0.5, 20: 0.4}
    run, _ = fit_line(tmp_path, val_losses=val, max_steps=20, early_stopping_patience=2)
    metrics = read_manifest(run.path)["metrics"]
    assert metrics["stop_reason"] == "early_stopping" and metrics["steps"] == 8
    assert "no better than 0.9 (step 4) for 2 evaluations: stopping early" in capsys.readouterr().out


def test_the_fit_verdict_is_recorded_and_said_last(tmp_path, capsys):
    run, _ = fit_line(tmp_path, val_losses=VAL)
    fit = read_manifest(run.path)["fit"]
    assert fit["verdict"] == "overfitting" and fit["best_step"] == 4  # the line's training loss kept falling
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("fit: OVERFITTING: val_loss was best at step 4")
    rows = logged(run.path)
    assert rows[4]["val_loss"] == 0.5 and rows[4]["trainset_loss"] > rows[8]["trainset_loss"]


def test_keep_best_naming_a_metric_the_evaluations_do_not_measure_is_refused(tmp_path):
    with pytest.raises(LLMTrainError, match=r"--keep_best task_accuracy: this sft run's evaluations measure val_loss"):
        fit_line(tmp_path, val_losses=VAL, keep_best="task_accuracy")
