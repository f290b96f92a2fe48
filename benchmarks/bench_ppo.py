"""PPO throughput: rollout tokens/s, time per PPO step split into generation / scoring / training, and peak
memory, for full copies (policy, reference, critic, reward model each its own weights) against LoRA (the
reference is the policy with its adapter disabled, and the critic trains adapters only), side by side.

The models: a short pretraining run of `--preset` (which also trains the project's tokenizer) is the policy,
and the same weights with a fresh one-score head, saved as a sequence-classification checkpoint, are the
reward model (its scores are meaningless, but it costs what a real one costs). The prompts are the embedded
task's. Each measurement runs `llmtrain.stages.ppo.run` for `--warmup + --steps` steps in a fresh child
process (so that its peak memory is its own), alternating full/LoRA `--repeats` times; the medians of the
per-step timings the loop logs to metrics.jsonl, after the warm-up, are reported. Both learning rates are 0:
every update is computed and applied as usual, but the weights stay put, so both modes sample the same
responses at every step and do the same work (a model that learned would change its response lengths).

    python benchmarks/bench_ppo.py                          # gpt-micro, 64 prompts x 32 new tokens, 1 thread
    python benchmarks/bench_ppo.py --preset gpt-mini --threads 2
    python benchmarks/bench_ppo.py --device cuda --preset gpt-small --batch_size 64 --max_new_tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from common import device_name, quiet, write_report

MODES = ("full", "lora")
TIMINGS = ("time_generate_s", "time_score_s", "time_train_s", "rollout_tokens_per_s", "response_length")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt-micro")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per process on a CPU")
    p.add_argument("--batch_size", type=int, default=64, help="prompts per PPO step")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--num_mini_batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed PPO steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--pretrain_steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=2, metavar=("MODE", "WORKDIR"), help=argparse.SUPPRESS)
    return p.parse_args()


def make_models(args: argparse.Namespace, work: Path) -> None:
    """The policy (a short pretraining run) and a reward model of the same weights with a fresh score head."""
    from transformers import AutoModelForSequenceClassification

    from llmtrain.config import PretrainConfig
    from llmtrain.stages import pretrain
    from llmtrain.tokenizer import load_tokenizer, save_tokenizer

    with quiet():
        policy = pretrain.run(
            PretrainConfig(
                runs_dir=str(work / "runs"),
                run_name="policy",
                seed=args.seed,
                preset=args.preset,
                seq_len=256,
                batch_size=8,
                max_steps=args.pretrain_steps,
                warmup_steps=min(5, args.pretrain_steps),
                mixed_precision="auto" if args.device == "cuda" else "no",
                eval_every=0,
                eval_batches=1,
                num_samples=1,
                sample_tokens=1,
                save_every=0,
            )
        )
        tokenizer = load_tokenizer(policy)
        scorer = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    scorer.config.pad_token_id = tokenizer.pad_token_id
    scorer.save_pretrained(work / "reward", safe_serialization=True)
    save_tokenizer(tokenizer, work / "reward")


def child(args: argparse.Namespace, mode: str, work: Path, name: str) -> dict[str, Any]:
    """One PPO run in this (fresh) process: the loop's per-step timings after the warm-up, and peak memory."""
    import transformers

    from llmtrain.config import PpoConfig
    from llmtrain.stages import ppo

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    cfg = PpoConfig(
        runs_dir=str(work / "runs"),
        run_name=name,
        seed=args.seed,
        init=str(work / "runs" / "policy"),
        reward_model=str(work / "reward"),
        value_model="reward",
        lr=0.0,
        value_lr=0.0,
        lora=mode == "lora",
        lora_r=args.lora_r,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_length=64 + args.max_new_tokens,
        ppo_epochs=args.ppo_epochs,
        num_mini_batches=args.num_mini_batches,
        max_steps=args.warmup + args.steps,
        mixed_precision="auto" if args.device == "cuda" else "no",
        task="none",
        task_eval_rows=0,
        sample_every=0,
        save_every=0,
    )
    rss_before = _status_mib("VmRSS")
    with quiet():
        path = ppo.run(cfg)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
    timed = [r for r in rows if "time_train_s" in r and r["step"] > args.warmup]
    result = {k: statistics.median(r[k] for r in timed) for k in TIMINGS}
    result["step_s"] = statistics.median(r["time_generate_s"] + r["time_score_s"] + r["time_train_s"] for r in timed)
    result["trainable_parameters"] = json.loads((path / "llmtrain.json").read_text())["model"]["trainable_parameters"]
    if args.device == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        # Python, torch and the libraries dominate a CPU process's memory: count what the run adds to it.
        result["peak_memory_mib"] = _status_mib("VmHWM") - rss_before
        result["peak_memory_kind"] = "peak RSS added by the run"
    return result


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB. VmHWM belongs to the address space, so it starts
    afresh in a new program; ru_maxrss would carry over the peak of the parent that started this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: peak memory on a CPU is measured on Linux only")


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the library's Accelerator would otherwise take a GPU
    if args.child:
        mode, work = args.child
        print(json.dumps(child(args, mode, Path(work), f"{mode}-{os.getpid()}")))
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_ppo-") as tmp_name:
        work = Path(tmp_name)
        os.environ["LLMTRAIN_CACHE"] = str(work / "cache")
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
        make_models(args, work)
        params = json.loads((work / "runs" / "policy" / "llmtrain.json").read_text())["model"]["parameters"]
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):  # full/lora/full/lora
            for mode in MODES:
                out = subprocess.run(
                    [sys.executable, __file__, *sys.argv[1:], "--child", mode, str(work)],
                    capture_output=True,
                    text=True,
                    env=os.environ,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"the {mode} measurement failed:\n{out.stderr[-3000:]}")
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))

    report: dict[str, Any] = {
        "benchmark": "bench_ppo",
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "device_name": device_name(args.device),
            "threads": args.threads if args.device == "cpu" else None,
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "model": args.preset,
        "parameters": params,
        **{k: getattr(args, k) for k in ("batch_size", "max_new_tokens", "ppo_epochs", "num_mini_batches")},
        **{k: getattr(args, k) for k in ("steps", "warmup", "repeats", "lora_r", "seed")},
    }
    for mode in MODES:
        numeric = [k for k, v in runs[mode][0].items() if isinstance(v, int | float)]
        report[mode] = {k: statistics.median(r[k] for r in runs[mode]) for k in numeric}
        report[mode]["peak_memory_kind"] = runs[mode][0]["peak_memory_kind"]
        report[mode]["repeats"] = runs[mode]
    print_table(report)
    write_report(report, args.out, f"bench_ppo-{args.preset}-{args.device}")


def print_table(r: dict[str, Any]) -> None:
    m, full, lora = r["machine"], r["full"], r["lora"]
    threads = f", {m['threads']} thread(s) per process" if m["device"] == "cpu" else ""
    print(f"bench_ppo: {r['model']} ({r['parameters'] / 1e6:.2f}M parameters)")
    print(f"device: {m['device']} ({m['device_name']}, {m['cpu_count']} CPUs{threads}), torch {m['torch']}")
    print(
        f"shape: {r['batch_size']} prompts x {r['max_new_tokens']} new tokens per step, {r['ppo_epochs']} PPO epochs "
        f"x {r['num_mini_batches']} minibatch(es); {r['steps']} timed steps after {r['warmup']} warm-up; median of "
        f"{r['repeats']} alternating repeats, each in a fresh process"
    )
    rows = [
        ("", "full copies", f"LoRA r={r['lora_r']}"),
        (
            "rollout tokens/s (generation)",
            f"{full['rollout_tokens_per_s']:,.0f}",
            f"{lora['rollout_tokens_per_s']:,.0f}",
        ),
        ("s/step: generation", f"{full['time_generate_s']:.3f}", f"{lora['time_generate_s']:.3f}"),
        ("s/step: scoring", f"{full['time_score_s']:.3f}", f"{lora['time_score_s']:.3f}"),
        ("s/step: training", f"{full['time_train_s']:.3f}", f"{lora['time_train_s']:.3f}"),
        ("s/step: total", f"{full['step_s']:.3f}", f"{lora['step_s']:.3f}"),
        ("response tokens (mean)", f"{full['response_length']:.1f}", f"{lora['response_length']:.1f}"),
        ("trainable parameters", f"{full['trainable_parameters']:,.0f}", f"{lora['trainable_parameters']:,.0f}"),
        (
            f"peak memory, MiB ({full['peak_memory_kind']})",
            f"{full['peak_memory_mib']:,.0f}",
            f"{lora['peak_memory_mib']:,.0f}",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"  {row[0]:<{widths[0]}}   {row[1]:>{widths[1]}}   {row[2]:>{widths[2]}}")
    if m["device"] == "cpu":
        before, after = m["load_average_1min"]
        print(f"load average (1 min): {before:.2f} before, {after:.2f} after")


if __name__ == "__main__":
    main()
