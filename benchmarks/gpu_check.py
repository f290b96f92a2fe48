"""One prepared GPU check: pretraining speed, a gpt-small slice of the pipeline, SIGTERM and resume, in minutes.

Parts, in order of value, each started only while the time budget (`--budget_s`) leaves room for it; each part's
figures go to <out>/gpu_check.json and <out>/gpu_check.md as soon as it ends, so a killed run still leaves a
report of what finished (the libraries' own output goes to <out>/gpu_check.log):
  eager    pretraining throughput and MFU of gpt-small at seq 1024 in bf16: the library loop against a bare loop
           on the same batches (benchmarks/bench_pretrain.py's two loops); its run is the pipeline's pretraining;
  sft, reward, dpo, ppo
           the next stages from that run on the embedded task, a few dozen steps each: tokens/s, peak memory,
           loss finite and falling (PPO: the value loss);
  resume   SIGTERM during a pretraining run, then `resume=True`: the same loss curve as an uninterrupted run;
  sft_gc   the sft part again with `gradient_checkpointing=True`: its peak memory and tokens/s against sft's;
  compile  the eager part's throughput with `compile=True`.
Nothing is downloaded (HF_HUB_OFFLINE=1): the embedded corpus and task files are the data.

    python benchmarks/gpu_check.py                          # one H100/H200
    python benchmarks/gpu_check.py --tiny                   # the same code on a CPU at tiny sizes (a minute)

benchmarks/gpu_check.md says which wheels the GPU image lacks, how to bring them and how to run this there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's llmtrain: on the GPU machine it is not installed
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")

# What the check needs, module -> distribution: the GPU image's own, and the two it lacks (with what they need in
# turn: gpu_check.md lists every wheel).
IMAGE = {m: m for m in ("torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors", "numpy")}
IMAGE |= {"yaml": "pyyaml", "jinja2": "jinja2", "tqdm": "tqdm", "huggingface_hub": "huggingface_hub"}
BROUGHT = {"datasets": "datasets", "matplotlib.pyplot": "matplotlib"}  # pyplot: what runs use


def missing_packages() -> dict[str, str]:
    """Distribution -> why not, for each needed module that is absent. The image's own are only looked up
    (importing torch and peft takes seconds, and they come next anyway); the brought ones are imported, so that
    a package they need in turn, or a wheel built for another Python or platform, is named by its error."""
    missing = {}
    for module, dist in IMAGE.items():
        if importlib.util.find_spec(module) is None:
            missing[dist] = "not installed"
    for module, dist in BROUGHT.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - an ImportError, or whatever a broken install raises
            missing[dist] = f"{type(e).__name__}: {e}"
    return missing


def check_packages() -> None:
    """Exit with a message naming the missing wheels, before anything else runs."""
    missing = missing_packages()
    if not missing:
        return
    lines = "\n".join(f"  {dist}: {error}" for dist, error in missing.items())
    print(
        f"gpu_check: {len(missing)} package(s) needed here are missing:\n{lines}\n"
        "A GPU image with torch, transformers, accelerate and peft lacks datasets and matplotlib and what they need. "
        "benchmarks/gpu_check.md lists their wheels and the `pip download` command that fetches them on a machine "
        "with pip access; on this machine install them with\n"
        "  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl\n"
        "  export PYTHONPATH=/tmp/site\n"
        "and run this command again.",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    check_packages()  # before the imports below, which need the packages

import torch  # noqa: E402
from bench_pretrain import bare_loop, fresh_model, library_loop, make_config, prefetched_batches  # noqa: E402
from common import device_name  # noqa: E402

from llmtrain.config import DpoConfig, PpoConfig, RewardConfig, SftConfig  # noqa: E402
from llmtrain.errors import RunInterrupted  # noqa: E402
from llmtrain.flops import flops_per_token, non_embedding_params, peak_flops  # noqa: E402
from llmtrain.registry import headline  # noqa: E402
from llmtrain.stages import pretrain  # noqa: E402
from llmtrain.tokenizer import load_tokenizer  # noqa: E402

SEED = 1337
PARTS = ("eager", "sft", "reward", "dpo", "ppo", "resume", "sft_gc", "compile")
NEEDS = {"sft": ["pretrain"], "reward": ["sft"], "dpo": ["sft", "reward"], "ppo": ["sft", "reward"], "sft_gc": ["sft"]}
LOSS = {"pretrain": "train_loss", "sft": "train_loss", "reward": "train_loss", "dpo": "train_loss", "ppo": "value_loss"}
STAGE_OF = {"sft_gc": "sft"}  # a part that reruns a stage with another setting: the stage it runs
EXTRA = {"reward": ["train_accuracy"], "dpo": ["margin", "nll"], "ppo": ["reward_mean", "kl", "rollout_tokens_per_s"]}
BF16_ULP = 2**-8  # the relative spacing of bfloat16 numbers near 1: the resume check's tolerance in bf16
# Each stage's config class and the runs it starts from (and the defaults the check changes).
STAGE_CONFIGS = {
    "sft": (SftConfig, dict(init="pretrain", warmup_steps=5, num_samples=0)),
    "reward": (RewardConfig, dict(init="sft", warmup_steps=5)),
    "dpo": (DpoConfig, dict(init="sft", judge="reward", warmup_steps=5, num_samples=0)),
    "ppo": (PpoConfig, dict(init="sft", reward_model="reward", num_samples=0)),
    "sft_gc": (SftConfig, dict(init="pretrain", warmup_steps=5, num_samples=0, gradient_checkpointing=True)),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part runs: the pretraining shape, each stage's config fields, and seconds to reserve per part."""

    preset: str
    seq_len: int
    batch_size: int
    warmup: int  # untimed steps of the throughput runs
    steps: int  # timed steps after them
    lr: float
    resume_steps: int
    resume_batch_size: int
    sigterm_after: int  # the resume part's SIGTERM is sent once this many steps are logged
    corpus_docs: int | None  # pretrain on the embedded corpus's first documents (None: all of it)
    stages: dict[str, dict[str, Any]]
    estimate_s: dict[str, float]  # a part starts only if the budget has this much left


GPU = Sizes(
    preset="gpt-small",
    seq_len=1024,
    batch_size=32,
    warmup=20,
    steps=100,
    lr=6e-4,
    resume_steps=40,
    resume_batch_size=8,
    sigterm_after=15,
    corpus_docs=None,
    stages={
        "sft": dict(packing=True, max_length=1024, batch_size=16, lr=1e-4, max_steps=30, task_eval_rows=64),
        "reward": dict(max_length=128, batch_size=32, lr=3e-5, max_steps=30),
        "dpo": dict(max_length=128, batch_size=16, lr=1e-5, max_steps=30, task_eval_rows=64),
        "ppo": dict(batch_size=64, lr=3e-6, value_lr=3e-5, max_steps=20, task_eval_rows=64, sample_every=0),
    },
    estimate_s={"eager": 45, "sft": 40, "reward": 30, "dpo": 45, "ppo": 60, "sft_gc": 45, "resume": 50, "compile": 120},
)
TINY = Sizes(
    preset="gpt-nano",
    seq_len=64,
    batch_size=8,
    warmup=10,
    steps=50,
    lr=3e-3,
    resume_steps=16,
    resume_batch_size=8,
    sigterm_after=4,
    corpus_docs=1000,  # tokenizer and token shards in a second instead of several
    stages={
        "sft": dict(packing=True, max_length=128, batch_size=8, lr=3e-3, max_steps=30, max_rows=400, task_eval_rows=8),
        "reward": dict(max_length=64, batch_size=32, lr=3e-3, max_steps=40, max_rows=400),
        # 64 pairs seen five times: a tiny model's DPO loss falls on pairs it has seen (on 320 pairs seen once it
        # fell at some seeds and data draws and not at others).
        "dpo": dict(max_length=64, batch_size=16, lr=5e-3, nll_weight=0.0, max_steps=20, max_rows=64, task_eval_rows=8),
        "ppo": dict(
            batch_size=8,
            max_new_tokens=8,
            ppo_epochs=2,
            num_mini_batches=2,
            max_steps=4,
            max_rows=64,
            task_eval_rows=8,
            sample_every=0,
        ),
    },
    estimate_s={},
)


class BudgetSpent(Exception):
    """The time budget ran out during a part."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes on a CPU: the same code path, in seconds")
    p.add_argument("--out", type=Path, default=None, help="report folder (default benchmarks/results/gpu_check-<date>)")
    p.add_argument("--budget_s", type=float, default=330.0, help="seconds for all parts together")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, in the order to run: {','.join(PARTS)}")
    args = p.parse_args()
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}; the parts are {', '.join(PARTS)}")
    args.out = args.out or REPO / "benchmarks" / "results" / f"gpu_check-{datetime.now():%Y-%m-%d}"
    return args


# ---------------------------------------------------------------- figures read back from a run


def logged_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as one merged row per step, in step order."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return [rows[s] for s in sorted(rows)]


def stage_figures(run_dir: Path, stage: str) -> dict[str, Any]:
    """Tokens/s over the logged windows after the first (it holds the start-up), and the loss curve's checks."""
    rows = logged_rows(run_dir)
    windows, previous = [], 0
    for row in rows:
        if "tokens_per_s" in row:
            seconds = row["ms_per_step"] / 1000 * (row["step"] - previous)
            windows.append((row["tokens_per_s"] * seconds, seconds))
            previous = row["step"]
    timed = windows[1:] or windows
    losses = [row[LOSS[stage]] for row in rows if LOSS[stage] in row]
    k = max(1, len(losses) // 3)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    extra = {key: [v[0], v[-1]] for key in EXTRA.get(stage, []) if (v := [r[key] for r in rows if key in r])}
    manifest = json.loads((run_dir / "llmtrain.json").read_text())
    return {
        "steps": manifest["metrics"]["steps"],
        "tokens_per_s": sum(t for t, _ in timed) / sum(s for _, s in timed),
        "loss_key": LOSS[stage],
        "loss_first": first,  # mean of the first third of the logged values, to see past a single noisy step
        "loss_last": last,
        "loss_finite": all(math.isfinite(v) for v in losses),
        "loss_falling": last < first,
        "first_last": extra,
        "headline": headline(manifest),
    }


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset; on a CPU the process's peak RSS (it only grows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fresh_start(device: torch.device) -> None:
    """On a GPU, free the previous part's memory and start its peak count afresh."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- the parts


def pretrain_config(args: argparse.Namespace, sz: Sizes, work: Path, max_steps: int, **fields):
    """bench_pretrain's config (no evaluation, samples or checkpoints inside the steps) on the check's corpus."""
    cfg = make_config(args, work, sz.preset, max_steps)
    return dataclasses.replace(cfg, data=corpus(sz, work), lr=sz.lr, warmup_steps=sz.warmup, **fields)


def corpus(sz: Sizes, work: Path) -> str:
    if sz.corpus_docs is None:
        return "default"
    path = work / "corpus.txt"
    if not path.is_file():
        docs = (REPO / "data" / "corpus.txt").read_text().split("\n\n")[: sz.corpus_docs]
        path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def bench_args(sz: Sizes, device: torch.device, batch_size: int, compiled: bool = False) -> argparse.Namespace:
    """The arguments bench_pretrain's config and loops read."""
    return argparse.Namespace(
        device=device.type,
        threads=torch.get_num_threads(),
        verbose=True,  # the library's output goes to the log
        warmup=sz.warmup,
        steps=sz.steps,
        batch_size=batch_size,
        seq_len=sz.seq_len,
        compile=compiled,
        seed=SEED,
    )


def throughput(sz: Sizes, work: Path, device: torch.device, compiled: bool) -> dict[str, Any]:
    """bench_pretrain's library loop (A) and bare loop (B), one run each, eager or compiled."""
    args = bench_args(sz, device, sz.batch_size, compiled)
    name = "pretrain-compiled" if compiled else "pretrain"
    cfg = pretrain_config(args, sz, work, sz.warmup + sz.steps, run_name=name)
    fresh_start(device)
    t0 = time.perf_counter()
    loop = library_loop(cfg, args, device)
    run_seconds = time.perf_counter() - t0
    run_dir = Path(cfg.runs_dir) / name
    tokenizer = load_tokenizer(run_dir)
    batches = prefetched_batches(run_dir, sz.seq_len, sz.batch_size, SEED, cfg.max_steps, device)
    fresh_start(device)
    bare = bare_loop(lambda: fresh_model(sz.preset, tokenizer, sz.seq_len, SEED), cfg, batches, args)
    del batches
    with torch.device("meta"):  # only its shape counts here
        model = fresh_model(sz.preset, tokenizer, sz.seq_len, SEED)
    flops = flops_per_token(
        non_embedding_params(model), model.config.num_hidden_layers, model.config.hidden_size, sz.seq_len
    )
    peak = peak_flops(device)
    sides = {}
    for side, r in (("library_loop", loop), ("bare_loop", bare)):
        sides[side] = {
            "tokens_per_s": r["tokens_per_s"],
            "ms_per_step": 1000 * sz.batch_size * sz.seq_len / r["tokens_per_s"],
            "mfu": flops * r["tokens_per_s"] / peak if peak else None,
            "peak_memory_mib": r["peak_mib"],
        }
    sides["library_loop"]["data_wait_frac"] = loop["data_wait_frac"]
    result = {
        "model": sz.preset,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "batch_size": sz.batch_size,
        "seq_len": sz.seq_len,
        "warmup_steps": sz.warmup,
        "timed_steps": sz.steps,
        "compile": compiled,
        "precision": "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32",
        "flops_per_token": flops,
        "peak_flops": peak,
        **sides,
        "ratio_loop_over_bare": loop["tokens_per_s"] / bare["tokens_per_s"],
    }
    if not compiled:  # the eager run is also the pipeline's pretraining stage
        stage = stage_figures(run_dir, "pretrain") | {"peak_memory_mib": loop["peak_mib"], "seconds": run_seconds}
        result["stage"] = stage
    return result


def stage_config(stage: str, sz: Sizes, work: Path):
    """The stage's config on the embedded task, from the runs before it: no evaluation, samples or checkpoints
    inside the steps, every step logged."""
    kind, links = STAGE_CONFIGS[stage]
    return kind(
        runs_dir=str(work / "runs"),
        cache_dir=str(work / "cache"),
        run_name=stage,
        seed=SEED,
        eval_every=0,
        save_every=0,
        log_every=1,
        **links,
        **sz.stages[STAGE_OF.get(stage, stage)],
    )


def train_stage(stage: str, sz: Sizes, work: Path, device: torch.device) -> dict[str, Any]:
    base = STAGE_OF.get(stage, stage)
    module = importlib.import_module(f"llmtrain.stages.{base}")
    cfg = stage_config(stage, sz, work)
    fresh_start(device)
    t0 = time.perf_counter()
    run_dir = module.run(cfg)
    seconds = time.perf_counter() - t0
    return stage_figures(run_dir, base) | {"peak_memory_mib": peak_memory_mib(device), "seconds": seconds}


@contextlib.contextmanager
def sigterm_after(metrics: Path, steps: int):
    """SIGTERM to this process, from another thread, once `metrics` has `steps` lines: a preemption mid-run."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            if metrics.is_file() and metrics.read_text().count("\n") >= steps:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # one landing after the run's own handler is harmless
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGTERM, previous)


def resume(sz: Sizes, work: Path, device: torch.device) -> dict[str, Any]:
    """The loss curve of a run stopped by SIGTERM and resumed against the same run uninterrupted."""
    args = bench_args(sz, device, sz.resume_batch_size)
    cfg = pretrain_config(args, sz, work, sz.resume_steps, log_every=1, run_name="uninterrupted")
    fresh_start(device)
    t0 = time.perf_counter()
    reference = pretrain.run(cfg)
    cfg = dataclasses.replace(cfg, run_name="interrupted")
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    try:
        with sigterm_after(run_dir / "metrics.jsonl", sz.sigterm_after):
            pretrain.run(cfg)
        raise RuntimeError(f"the run finished its {sz.resume_steps} steps before SIGTERM reached it")
    except RunInterrupted as stopped:
        stopped_at = stopped.step
    pretrain.run(dataclasses.replace(cfg, resume=True))
    a = {r["step"]: r["train_loss"] for r in logged_rows(reference) if "train_loss" in r}
    b = {r["step"]: r["train_loss"] for r in logged_rows(run_dir) if "train_loss" in r}
    if sorted(b) != sorted(a):
        raise RuntimeError(f"the resumed run logged steps {sorted(b)}, the uninterrupted one {sorted(a)}")
    rel = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    tolerance = BF16_ULP if device.type == "cuda" else 1e-5  # bf16 autocast on a GPU; fp32 on a CPU
    return {
        "steps": sz.resume_steps,
        "sigterm_at_step": stopped_at,
        "resumed_at_steps": json.loads((run_dir / "llmtrain.json").read_text())["resumed_at_steps"],
        "max_abs_diff": max(abs(a[s] - b[s]) for s in a),
        "max_rel_diff": rel,
        "tolerance_rel": tolerance,
        "same_curve": rel <= tolerance,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------- the report


def header(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import accelerate
    import datasets
    import peft
    import pyarrow
    import transformers

    versions = {m.__name__: m.__version__ for m in (torch, transformers, accelerate, peft, datasets, pyarrow)}
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "device": device.type,
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "versions": versions,
        "tiny": args.tiny,
        "budget_s": args.budget_s,
    }


def write_report(out: Path, report: dict[str, Any]) -> str:
    """gpu_check.json and gpu_check.md, both rewritten whole; returns the Markdown."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    return text


def markdown(report: dict[str, Any]) -> str:
    h, parts = report["header"], report["parts"]
    versions = ", ".join(f"{k} {v}" for k, v in h["versions"].items())
    cuda = f" (CUDA {h['cuda']})" if h["cuda"] and h["device"] == "cuda" else ""
    lines = [
        "# llmtrain GPU check" + (" (--tiny, on a CPU)" if h["tiny"] else ""),
        "",
        f"- device: {h['device_name']}{cuda}; python {h['python']}, {versions}",
        f"- command: `{h['command']}`" + (f" with PYTHONPATH={h['pythonpath']}" if h["pythonpath"] else ""),
        f"- {h['date']}; {report.get('elapsed_s', 0):.0f} s of a {h['budget_s']:.0f} s budget",
    ]
    speed = [parts[name] for name in ("eager", "compile") if parts.get(name, {}).get("status") == "ok"]
    if speed:
        r = speed[0]
        lines += [
            "",
            f"## Pretraining throughput: {r['model']} ({r['architecture']}, {r['parameters'] / 1e6:.1f}M parameters, "
            f"vocabulary {r['vocab_size']}), batch {r['batch_size']} x seq {r['seq_len']}, {r['precision']}",
            "",
            f"{r['timed_steps']} timed steps after {r['warmup_steps']}; library loop = `llmtrain.stages.pretrain.run`, "
            "bare loop = forward, loss, backward, clip, AdamW on the same batches (benchmarks/bench_pretrain.py).",
            "",
            "| | library tokens/s | bare tokens/s | loop / bare | library MFU | bare MFU | peak memory MiB (library) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in speed:
            lib, bare = r["library_loop"], r["bare_loop"]
            lines.append(
                f"| {'compiled' if r['compile'] else 'eager'} | {lib['tokens_per_s']:,.0f}"
                f" | {bare['tokens_per_s']:,.0f} | {r['ratio_loop_over_bare']:.3f} | {_pct(lib['mfu'])}"
                f" | {_pct(bare['mfu'])} | {lib['peak_memory_mib']:,.0f} |"
            )
    stages = [
        s
        for s in ("pretrain", "sft", "reward", "dpo", "ppo", "sft_gc")
        if parts.get(s, {}).get("status") in ("ok", "check failed")
    ]
    if stages:
        memory = "peak memory MiB" + (" (process RSS)" if h["device"] == "cpu" else "")
        lines += [
            "",
            "## Pipeline slice on the embedded data",
            "",
            f"| stage | steps | tokens/s | {memory} | loss: first -> last third | finite | falling | s | headline |",
            "|---|---:|---:|---:|---|---|---|---:|---|",
        ]
        for s in stages:
            r = parts[s]
            lines.append(
                f"| {s} | {r['steps']} | {r['tokens_per_s']:,.0f} | {r['peak_memory_mib']:,.0f} | {r['loss_key']} "
                f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} | {_yes(r['loss_finite'])} | {_yes(r['loss_falling'])}"
                f" | {r['seconds']:.1f} | {r['headline']} |"
            )
        extra = [
            f"{s}: " + ", ".join(f"{k} {v[0]:.4g} -> {v[1]:.4g}" for k, v in parts[s]["first_last"].items())
            for s in stages
            if parts[s]["first_last"]
        ]
        if extra:
            lines += ["", "First and last logged values: " + "; ".join(extra) + "."]
        if "sft" in stages and "sft_gc" in stages:
            plain, gc = parts["sft"], parts["sft_gc"]
            lines += [
                "",
                f"Gradient checkpointing (sft_gc = sft with `gradient_checkpointing=True`): peak memory "
                f"{plain['peak_memory_mib']:,.0f} -> {gc['peak_memory_mib']:,.0f} MiB, tokens/s "
                f"{plain['tokens_per_s']:,.0f} -> {gc['tokens_per_s']:,.0f} "
                f"({gc['tokens_per_s'] / plain['tokens_per_s']:.2f}x).",
            ]
    r = parts.get("resume", {})
    if r.get("status") in ("ok", "check failed"):
        lines += [
            "",
            "## SIGTERM and resume",
            "",
            f"A {r['steps']}-step pretraining run got SIGTERM and stopped with a checkpoint at step "
            f"{r['sigterm_at_step']}; `resume=True` continued it from step {r['resumed_at_steps'][-1]}. "
            f"Largest difference from the uninterrupted run's training loss: {r['max_abs_diff']:.3g}, relative "
            f"{r['max_rel_diff']:.2g} (tolerance {r['tolerance_rel']:.2g}): "
            + ("same curve." if r["same_curve"] else "NOT THE SAME CURVE."),
        ]
    other = [(name, p) for name, p in parts.items() if p["status"] not in ("ok",)]
    if other:
        lines += ["", "## Not run, failed or off target", ""]
        lines += [f"- {name}: {p['status']}: {p.get('reason', '')}" for name, p in other]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def verdict(name: str, result: dict[str, Any]) -> tuple[str, str]:
    """ok, or "check failed" with what failed."""
    failed = [k for k in ("loss_finite", "loss_falling", "same_curve") if result.get(k) is False]
    return ("check failed", ", ".join(failed)) if failed else ("ok", "")


# ---------------------------------------------------------------- main


def run_parts(args: argparse.Namespace, sz: Sizes, work: Path, device: torch.device, report: dict, console) -> None:
    """Each part in turn, or skipped (a run it needs failed, or too little time left); the report after each."""
    deadline = time.monotonic() + args.budget_s
    status = report["parts"]
    running = [False]

    def over_budget(*_: Any) -> None:
        if running[0]:  # between parts the next one is skipped instead
            raise BudgetSpent(f"the {args.budget_s:.0f} s budget ran out")

    signal.signal(signal.SIGALRM, over_budget)
    signal.setitimer(signal.ITIMER_REAL, args.budget_s)
    try:
        for name in args.parts:
            left, needed = deadline - time.monotonic(), sz.estimate_s.get(name, 0)
            missing = [n for n in NEEDS.get(name, []) if status.get(n, {}).get("status") != "ok"]
            if missing:
                status[name] = {"status": "skipped", "reason": f"needs a finished {', '.join(missing)} run"}
            elif left <= 0:
                status[name] = {"status": "skipped", "reason": "the budget is spent"}
            elif left < needed:
                status[name] = {
                    "status": "skipped",
                    "reason": f"{left:.0f} s of the budget left, {needed:.0f} s needed",
                }
            else:
                running[0] = True
                status[name] = run_part(name, sz, work, device)
                running[0] = False
                if name == "eager" and "stage" in status[name]:  # its run is the pipeline's pretraining
                    stage = status[name].pop("stage")
                    status["pretrain"] = stage | dict(zip(("status", "reason"), verdict("pretrain", stage)))
            report["elapsed_s"] = args.budget_s - (deadline - time.monotonic())
            write_report(args.out, report)
            print(f"gpu_check: {name}: {status[name]['status']} {status[name]['reason']}", file=console, flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_part(name: str, sz: Sizes, work: Path, device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        if name in ("eager", "compile"):
            result = throughput(sz, work, device, compiled=name == "compile")
        elif name == "resume":
            result = resume(sz, work, device)
        else:
            result = train_stage(name, sz, work, device)
    except BudgetSpent as e:
        return {"status": "stopped", "reason": str(e), "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - one part's failure is a finding; the others still run
        traceback.print_exc()  # into the log
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:600], "seconds": time.perf_counter() - t0}
    result.setdefault("seconds", time.perf_counter() - t0)
    result["status"], result["reason"] = verdict(name, result)
    return result


def main() -> int:
    args = parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here. On a CPU, run the same code at tiny sizes with --tiny.")
    if args.tiny:
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the library's Accelerator would otherwise take a GPU
        # Inductor's C++ build takes over a minute on a CPU; Dynamo's graph capture alone runs the compile path.
        torch.compile = functools.partial(torch.compile, backend="eager")
    device = torch.device("cpu" if args.tiny else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"header": header(args, device), "parts": {}}
    write_report(args.out, report)
    console = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp, open(args.out / "gpu_check.log", "w") as log:
        work = Path(tmp)
        os.environ["LLMTRAIN_CACHE"] = str(work / "cache")
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)  # everything the libraries print, subprocesses too, goes to the log
        os.dup2(log.fileno(), 2)
        try:
            run_parts(args, TINY if args.tiny else GPU, work, device, report, console)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    text = write_report(args.out, report)
    print(text, file=console, flush=True)
    print(f"gpu_check: wrote {args.out}/gpu_check.{{json,md,log}}", file=console, flush=True)
    return 0 if all(p["status"] in ("ok", "skipped", "stopped") for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
