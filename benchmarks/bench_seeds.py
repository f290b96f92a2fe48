"""The seeds table: `recipes/pipeline.py --seeds 0,1,2 --control` on the embedded default, with the machine, the
threads and the library versions that made it.

Runs the pipeline in a child process (this checkout's code: its folder goes first on PYTHONPATH), with its runs and
cache in a temporary folder that is removed at the end (`--runs_dir` keeps the runs), and reports the pipeline's seeds
table (`<runs_dir>/<name>-seeds.md`, `llmtrain.seeds`): each stage's test headline as mean ± std over the seeds, and
each gain over the stage's parent and over the same-seed "more SFT" control as a paired difference over (test item,
seed) pairs with a 95 % bootstrap interval. Beside it: the pipeline command, its wall time, the machine, the threads
per process and the versions. `--one_thread` runs seed 0 again with one thread per process and says, stage by stage,
whether its test headline is the same (a sum split over threads adds in another order, so figures can move).

Writes JSON and Markdown, by default `benchmarks/results/bench_seeds-<device>.json` and `.md` (`--out` to change).

    python benchmarks/bench_seeds.py                  # seeds 0,1,2 and the control on the embedded default
    python benchmarks/bench_seeds.py --one_thread     # and seed 0 again on one thread
    python benchmarks/bench_seeds.py --config recipe.yaml --seeds 0,1 --out /tmp/seeds.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from common import device_name, write_report

REPO = Path(__file__).resolve().parents[1]
PIPELINE = "recipes/pipeline.py"
VERSIONS = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "peft", "numpy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--no_control", action="store_true", help="leave out the more-SFT control")
    p.add_argument("--config", type=Path, default=None, help="pipeline recipe (default: the embedded default)")
    p.add_argument("--name", default="pipeline", help="prefix of the run names")
    p.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS in the pipeline (default: unset, the cores shared)"
    )
    p.add_argument("--one_thread", action="store_true", help="run seed 0 again with one thread and compare")
    p.add_argument("--runs_dir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="the JSON report; the Markdown goes beside it")
    p.add_argument("--verbose", action="store_true", help="show the pipeline's own output")
    return p.parse_args(argv)


def pipeline_command(args: argparse.Namespace, seeds: str, runs_dir: Path) -> list[str]:
    """The pipeline command a person would type, run from the repository's root."""
    cmd = ["python", PIPELINE, "--seeds", seeds]
    if not args.no_control:
        cmd.append("--control")
    if args.name != "pipeline":
        cmd += ["--name", args.name]
    if args.config:
        cmd += ["--config", str(args.config.resolve())]
    return [*cmd, "--runs_dir", str(runs_dir)]


def shown(cmd: list[str], threads: int | None, keep_runs_dir: bool) -> str:
    """The command as the report states it: the threads it ran with, and no temporary folder (it says nothing)."""
    words = cmd if keep_runs_dir else cmd[: cmd.index("--runs_dir")]
    return ("" if threads is None else f"OMP_NUM_THREADS={threads} ") + shlex.join(words)


def duration(seconds: float) -> str:
    """Seconds as a person reads them: `12 min 5 s`."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def child_env(cache: Path, threads: int | None) -> dict[str, str]:
    """The pipeline's environment: this checkout's code, a private cache, and the threads asked for."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", LLMTRAIN_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.pop("LLMTRAIN_RUNS_DIR", None)
    if threads is None:
        env.pop("OMP_NUM_THREADS", None)
    else:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def threads_per_process(env: dict[str, str]) -> int:
    """The CPU threads each stage of the pipeline uses under `env` (one process; `llmtrain.runtime.cpu_threads`)."""
    from llmtrain.runtime import cpu_threads

    return cpu_threads(None, env, usable_cores(), 1)


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_pipeline(cmd: list[str], env: dict[str, str], log: Path, verbose: bool) -> float:
    """Run the pipeline to the end and return its wall time; its output goes to `log` (and the screen if verbose)."""
    print(f"running: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, *cmd[1:]], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, stderr=subprocess.STDOUT
        )
        for line in proc.stdout:
            fh.write(line)
            if verbose:
                print(line, end="", flush=True)
    if proc.wait() != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"the pipeline failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    return time.perf_counter() - t0


def read_seeds_report(runs_dir: Path, name: str) -> tuple[dict[str, Any], str]:
    """The numbers and the table the pipeline wrote (`<name>-seeds.json` and the table of `<name>-seeds.md`)."""
    numbers = json.loads((runs_dir / f"{name}-seeds.json").read_text())
    table = (runs_dir / f"{name}-seeds.md").read_text().split("\n\n", 1)[1].strip()
    return numbers, table


def seed_zero(numbers: dict[str, Any]) -> dict[str, float | None]:
    """Each stage's test headline at seed 0."""
    return {s["stage"]: s["values"].get("0") for s in numbers["stages"]}


def versions() -> dict[str, str]:
    """Python's version and each library's that decides the figures (`absent` for one not installed)."""
    import importlib

    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = "absent"
    return found


def one_thread_check(args: argparse.Namespace, base: dict[str, Any], root: Path, cache: Path) -> dict[str, Any]:
    """Seed 0 again with one thread per process, each stage's test headline beside the main run's."""
    runs = ((args.runs_dir or root) / "one-thread").resolve()
    cmd = pipeline_command(args, "0", runs)
    seconds = run_pipeline(cmd, child_env(cache, 1), root / "pipeline-one-thread.log", args.verbose)
    numbers, _ = read_seeds_report(runs, args.name)
    ours, theirs = seed_zero(base), seed_zero(numbers)
    stages = {stage: {"threads": ours[stage], "one_thread": theirs.get(stage)} for stage in ours}
    for row in stages.values():
        row["same"] = row["threads"] == row["one_thread"]
    return {"command": shown(cmd, 1, args.runs_dir is not None), "seconds": seconds, "stages": stages}


def markdown(report: dict[str, Any]) -> str:
    """The report as the README states it: what made it, then the table."""
    m = report["machine"]
    lines = [
        f"# The seeds table ({report['date'][:10]})",
        "",
        f"- command: `{report['command']}` ({duration(report['seconds'])}), made by `{report['benchmark_command']}`",
        f"- machine: {m['device_name']}, {m['usable_cores']} usable cores; {report['threads']} thread(s) per process",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        report["table"],
    ]
    check = report.get("one_thread")
    if check:
        lines += ["", f"Seed 0 again with one thread (`{check['command']}`, {duration(check['seconds'])}):", ""]
        lines += ["| stage | seed 0, threads as above | seed 0, one thread | same |", "|---|---|---|---|"]
        for stage, row in check["stages"].items():
            figures = [f"{v:.4f}" if v is not None else "-" for v in (row["threads"], row["one_thread"])]
            lines.append(f"| {stage} | {figures[0]} | {figures[1]} | {'yes' if row['same'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench_seeds-") as tmp:
        root = Path(tmp)
        runs = (args.runs_dir or root / "runs").resolve()
        cmd = pipeline_command(args, args.seeds, runs)
        env = child_env(root / "cache", args.threads)
        seconds = run_pipeline(cmd, env, root / "pipeline.log", args.verbose)
        numbers, table = read_seeds_report(runs, args.name)
        report: dict[str, Any] = {
            "benchmark": "bench_seeds",
            "date": datetime.now().isoformat(timespec="seconds"),
            "command": shown(cmd, args.threads, args.runs_dir is not None),
            "benchmark_command": shlex.join(["python", "benchmarks/bench_seeds.py", *(argv or sys.argv[1:])]),
            "seconds": seconds,
            "machine": {
                "device": device,
                "device_name": device_name(device),
                "cpu_count": os.cpu_count(),
                "usable_cores": usable_cores(),
            },
            "threads": threads_per_process(env),
            "versions": versions(),
            "seeds_report": numbers,
            "table": table,
        }
        if args.one_thread:
            report["one_thread"] = one_thread_check(args, numbers, root, root / "cache")
    text = markdown(report)
    print("\n" + text)
    out = write_report(report, args.out, f"bench_seeds-{device}")
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
