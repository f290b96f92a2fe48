"""benchmarks/gpu_check.py: its code path at tiny sizes on a CPU, and its message when wheels are missing."""

import json
import math
import subprocess
import sys

import pytest
from helpers import REPO, env_for

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_tiny_run_reports_every_part_with_finite_figures(tmp_path):
    out = tmp_path / "report"
    # Every part but compile, which is the eager part's code with compile=True and takes ~20 s more on a CPU.
    parts = "eager,sft,reward,dpo,ppo,resume,sft_gc"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--parts", parts]
    result = subprocess.run(cmd, env=env_for(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    header, parts = report["header"], report["parts"]
    assert header["device"] == "cpu" and "--tiny" in header["command"]
    assert {"torch", "transformers", "datasets"} <= set(header["versions"])
    ran = ["eager", *STAGES, "resume", "sft_gc"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(ran, "ok")

    eager = parts["eager"]
    for side in ("library_loop", "bare_loop"):
        assert finite(eager[side]["tokens_per_s"], eager[side]["ms_per_step"], eager[side]["peak_memory_mib"])
        assert eager[side]["tokens_per_s"] > 0 and eager[side]["mfu"] is None  # no peak FLOP/s for a CPU
    assert finite(eager["ratio_loop_over_bare"], eager["flops_per_token"]) and eager["compile"] is False
    for stage in STAGES:
        p = parts[stage]
        assert finite(p["tokens_per_s"], p["peak_memory_mib"], p["seconds"], p["loss_first"], p["loss_last"]), stage
        assert p["tokens_per_s"] > 0 and p["loss_finite"] and p["loss_falling"], (stage, p)
    assert parts["pretrain"]["steps"] == eager["warmup_steps"] + eager["timed_steps"]
    assert parts["ppo"]["loss_key"] == "value_loss" and "reward_mean" in parts["ppo"]["first_last"]

    resume = parts["resume"]
    stopped = resume["sigterm_at_step"]
    assert 1 <= stopped < resume["steps"] and resume["resumed_at_steps"] == [stopped]
    assert resume["same_curve"] and resume["max_rel_diff"] <= 1e-5  # fp32 on a CPU: the same numbers

    markdown = (out / "gpu_check.md").read_text()
    assert markdown in result.stdout  # printed at the end
    assert "| eager |" in markdown and f"`{header['command']}`" in markdown
    for stage in STAGES:
        assert f"| {stage} | {parts[stage]['steps']} |" in markdown
    assert "## SIGTERM and resume" in markdown and "same curve." in markdown
    assert f"| sft_gc | {parts['sft']['steps']} |" in markdown and "Gradient checkpointing (sft_gc" in markdown
    assert "Resuming interrupted from step" in (out / "gpu_check.log").read_text()


def test_missing_wheels_are_named_before_anything_runs(tmp_path):
    # `import dill` fails as it would on an image without the wheel; datasets, which needs it, fails with it.
    code = "import runpy, sys; sys.modules['dill'] = None; runpy.run_path(sys.argv[1], run_name='__main__')"
    out = tmp_path / "report"
    cmd = [sys.executable, "-c", code, str(SCRIPT), "--tiny", "--out", str(out)]
    result = subprocess.run(cmd, env=env_for(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "package(s) needed here are missing:\n" in result.stderr
    assert "\n  datasets: ModuleNotFoundError: import of dill halted" in result.stderr
    assert "benchmarks/gpu_check.md" in result.stderr and "--no-index --no-deps --target /tmp/site" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
