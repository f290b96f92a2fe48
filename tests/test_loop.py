"""The loop spine on a tiny regression model: stops, logging, NaN stop, signals, resume."""

import json
import os
import signal

import pytest
import torch

from llmtrain.config import SftConfig
from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.loop import Loop, prepare
from llmtrain.registry import read_manifest
from llmtrain.run_dir import Run
from llmtrain.runtime import make_accelerator

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.linspace(-1, 1, 32)[:, None]
Y = 3 * X - 0.5


def train(tmp_path, stop_at: int | None = None, lr_scale: float = 1.0, **overrides) -> tuple[Run, torch.nn.Linear]:
    """Fit y = 3x - 0.5 with the spine, as a stage would; SIGTERM to this process after step `stop_at`."""
    values = dict(runs_dir=str(tmp_path), run_name="fit", max_steps=8, lr=0.3 * lr_scale, warmup_steps=0)
    cfg = SftConfig(**{**values, "log_every": 2, "save_every": 0, "schedule": "constant", **overrides})
    accelerator = make_accelerator(cfg)
    run = Run.open(cfg, "sft", "linear", accelerator)
    torch.manual_seed(0)
    model, optimizer, _ = prepare(accelerator, cfg, torch.nn.Linear(1, 1))
    loop = Loop.begin(cfg, accelerator, run, model, optimizer, cfg.max_steps)
    loop.start("a linear fit")
    with loop.training():
        for _ in loop.steps():
            loss = torch.nn.functional.mse_loss(model(X), Y)
            loss.backward()
            loop.optimizer_step()
            if loop.step + 1 == stop_at:  # as if a scheduler stopped the job during this step
                os.kill(os.getpid(), signal.SIGTERM)
            (loss_sum,) = loop.reduce(loss.detach()[None], tokens=len(X))
            loop.log({"train_loss": loss_sum})
            loop.checkpoint()
    loop.finish({}, {"loss": ["train_loss"]}, "fitted")
    return run, model


def logged(run: Run) -> list[dict]:
    return [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]


def test_the_loop_trains_to_max_steps_and_logs_lr_and_timing_every_log_every(tmp_path):
    run, _ = train(tmp_path)
    rows = logged(run)
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
    run, _ = train(tmp_path, max_time_s=1e-9, max_steps=1000)
    metrics = read_manifest(run.path)["metrics"]
    assert metrics["stop_reason"] == "max_time_s" and metrics["steps"] == 1


def test_a_non_finite_loss_stops_the_run_with_advice_and_marks_it_failed(tmp_path):
    with pytest.raises(LLMTrainError, match=r"training loss became (nan|inf) at step \d.*Lower --lr"):
        train(tmp_path, lr_scale=1e30)
    assert read_manifest(tmp_path / "fit")["status"] == "failed"


def test_a_signal_saves_a_checkpoint_and_resume_ends_on_the_same_weights(tmp_path):
    _, whole = train(tmp_path / "whole")
    with pytest.raises(RunInterrupted, match="SIGTERM at step 3"):
        train(tmp_path / "cut", stop_at=3)
    assert read_manifest(tmp_path / "cut" / "fit")["status"] == "interrupted"
    run, resumed = train(tmp_path / "cut", resume=True)
    assert [r["step"] for r in logged(run)] == [2, 4, 6, 8]
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)
