"""DPO cost of the three reference strategies, side by side: time per step and peak memory.

`llmtrain.stages.dpo.run` keeps its reference in one of three ways: a frozen copy of the model in memory
(`copy`, the default), log-probs of every pair computed once before training (`precompute`, `--precompute_ref`),
or the policy's own base weights with the LoRA adapter switched off (`lora`, `--lora`). Each is run in a fresh
child process (so each peak is its own) on the same model, pairs and seed, and the script prints per mode:
ms/step (what the loop logs to metrics.jsonl, averaged over the steps after the warm-up), the one-off
reference pass before the first step (held-out pairs, plus every training pair with precompute), trainable
parameters, and peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the child's highest RSS, sampled every
20 ms during the run, minus its RSS before the run). The model to tune comes from a short
pretraining run (which also trains the tokenizer); data, cache and runs live in a temporary folder that is
removed at the end.

    python benchmarks/bench_dpo.py                               # gpt-micro, default pairs, batch 16, 2 threads
    python benchmarks/bench_dpo.py --preset gpt-mini --steps 40
    python benchmarks/bench_dpo.py --device cuda --preset gpt-small --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from datetime import datetime
from pathlib import Path

import torch
import transformers
from common import device_name, quiet, write_report

MODES = {"copy": {}, "precompute": {"precompute_ref": True}, "lora": {"lora": True}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt-micro")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child")
    p.add_argument("--pairs", type=int, default=2000, help="training pairs of the default data")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    p.add_argument("--pretrain_steps", type=int, default=20, help="steps of the run that makes the model to tune")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=2, metavar=("MODE", "TMP"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_model(args: argparse.Namespace, tmp: Path) -> Path:
    """A short pretraining run of the preset on the default corpus: the model DPO tunes."""
    from llmtrain.config import PretrainConfig
    from llmtrain.stages import pretrain

    cfg = PretrainConfig(
        runs_dir=str(tmp / "runs"),
        cache_dir=str(tmp / "cache"),
        run_name="base",
        preset=args.preset,
        max_steps=args.pretrain_steps,
        eval_every=0,
        num_samples=0,
        save_every=0,
        mixed_precision="auto" if args.device == "cuda" else "no",
    )
    with quiet():
        return pretrain.run(cfg)


def child(args: argparse.Namespace, mode: str, tmp: Path) -> dict:
    """One DPO run in this (fresh) process; returns its timings and peak memory."""
    from llmtrain.config import DpoConfig
    from llmtrain.stages import dpo

    torch.set_num_threads(args.threads)
    cfg = DpoConfig(
        runs_dir=str(tmp / "runs"),
        cache_dir=str(tmp / "cache"),
        run_name=f"dpo-{mode}",
        seed=args.seed,
        init="base",
        max_rows=args.pairs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=args.warmup + args.steps,
        warmup_steps=args.warmup,
        log_every=args.warmup if args.steps % args.warmup == 0 else 1,
        eval_every=0,
        save_every=0,
        task="none",
        judge="none",
        mixed_precision="auto" if args.device == "cuda" else "no",
        **MODES[mode],
    )
    # On a CPU the process's own runtime (Python, torch, libraries) dominates its RSS, and its max RSS is often
    # set while importing; what the run adds is the highest RSS sampled during the run minus the RSS before it.
    before, sampler = rss_mib(), RssSampler()
    with quiet(), sampler:
        path = dpo.run(cfg)
    manifest = json.loads((path / "llmtrain.json").read_text())
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "ms_per_step" in r and r["step"] > args.warmup]
    steps = [r["step"] for r in timed]
    # Each logged window covers the steps since the previous log line; weight each window by its length.
    widths = [b - a for a, b in zip([args.warmup, *steps], steps)]
    ms = sum(r["ms_per_step"] * w for r, w in zip(timed, widths)) / sum(widths)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = sampler.peak - before
    return {
        "ms_per_step": ms,
        "reference_pass_s": manifest["reference_pass_s"],
        "pairs": manifest["data"]["rows"] - manifest["data"]["dropped"],
        "trainable_parameters": manifest["model"].get("trainable_parameters"),
        "peak_memory_mib": peak,
        "peak_memory_kind": "torch.cuda.max_memory_allocated"
        if args.device == "cuda"
        else "RSS added by the run (sampled every 20 ms)",
    }


def rss_mib() -> float:
    """This process's resident memory now (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Samples rss_mib() on a thread while the `with` block runs; `peak` is the highest sample."""

    def __init__(self, every_s: float = 0.02):
        self.every_s, self.peak, self._stop = every_s, 0.0, threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        mode, tmp = args.child
        print(json.dumps(child(args, mode, Path(tmp))))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_dpo-") as tmp:
        make_model(args, Path(tmp))
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a]
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--child", mode, tmp],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"the {mode} run failed:\n{out.stderr[-3000:]}")
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, dict]) -> None:
    head = f"{'':28}" + "".join(f"{m:>14}" for m in results)
    lines = [
        f"bench_dpo: {args.preset}, {results['copy']['pairs']:,} pairs, batch {args.batch_size} pairs, "
        f"max_length {args.max_length}, {args.steps} timed steps after {args.warmup} warm-up",
        f"device: {args.device} ({device_name(args.device)}, {os.cpu_count()} CPUs, {args.threads} threads), "
        f"torch {torch.__version__}, transformers {transformers.__version__}",
        head,
        f"{'  ms/step':28}" + "".join(f"{r['ms_per_step']:>14.1f}" for r in results.values()),
        f"{'  reference pass (s)':28}" + "".join(f"{r['reference_pass_s']:>14.1f}" for r in results.values()),
        f"{'  peak memory (MiB)':28}" + "".join(f"{r['peak_memory_mib']:>14.0f}" for r in results.values()),
        f"{'  trainable parameters':28}" + "".join(f"{r['trainable_parameters']:>14,}" for r in results.values()),
        f"peak memory is the {results['copy']['peak_memory_kind']} of each mode's own process",
    ]
    print("\n".join(lines))
    record = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": device_name(args.device),
        "threads": args.threads,
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items() if k != "child"},
        "results": results,
    }
    write_report(record, args.out, f"bench_dpo-{args.preset}-{args.device}")


if __name__ == "__main__":
    main()
