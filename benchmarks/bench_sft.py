"""SFT throughput with and without packing: real (non-pad) tokens/s of `llmtrain.stages.sft.run`, side by side.

On a chat data set with a long-tailed length distribution (most rows short single-turn arithmetic Q/A, a minority
long multi-turn conversations of up to max_length tokens), padded batches spend most of their width on padding;
`--packing` fills rows of max_length with whole examples instead (best-fit decreasing). In one process, alternating
padded/packed (`--repeats` times, the median reported, because a CPU's speed drifts), this script runs the library's
SFT loop both ways on the same model and data and prints, for each: real tokens/s (what the loop logs to
metrics.jsonl after the warm-up steps), ms/step, real tokens per step, and the padding share of the batches; then
the ratio packed/padded. The model to tune comes from a short pretraining run (which also trains the tokenizer);
data, cache and runs live in a temporary folder that is removed at the end.

    python benchmarks/bench_sft.py                              # gpt-micro, max_length 256, batch 16, 2 threads
    python benchmarks/bench_sft.py --preset gpt-mini --repeats 3
    python benchmarks/bench_sft.py --device cuda --preset gpt-small --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from common import device_name, quiet, write_report

from llmtrain.config import PretrainConfig, SftConfig
from llmtrain.data.chat import Example, Packed, load_chat_rows, pack_examples, tokenize_dataset
from llmtrain.data.schedule import batch_indices
from llmtrain.registry import PRESETS
from llmtrain.stages import pretrain, sft
from llmtrain.tokenizer import load_tokenizer

MODES = ("padded", "packed")
EVAL_ROWS = 64  # held-out conversations: the loop evaluates once before and once after, never while timed
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Please work out {a} {op} {b}.")
FOLLOW_UPS = ("And {op} {b}?", "Now take that {op} {b}.", "What do you get with {op} {b} on top of it?")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt-micro", choices=PRESETS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--rows", type=int, default=2000, help="training conversations")
    p.add_argument("--long_share", type=float, default=0.2, help="share of long multi-turn conversations")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    p.add_argument("--pretrain_steps", type=int, default=20, help="steps of the run that makes the model to tune")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--verbose", action="store_true", help="show the library's own output")
    return p.parse_args()


# ---------------------------------------------------------------- the data set


def qa_turn(rng: np.random.Generator) -> tuple[list[dict], int]:
    """One arithmetic question and its worked answer (like data/sft_train.jsonl), and the result."""
    a, b, op = int(rng.integers(1, 100)), int(rng.integers(1, 100)), str(rng.choice(list(OPS)))
    result = OPS[op](a, b)
    question = str(rng.choice(QUESTIONS)).format(a=a, op=op, b=b)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": f"{a} {op} {b} = {result}"}], result


def follow_up_turn(rng: np.random.Generator, previous: int) -> tuple[list[dict], int]:
    """A turn that continues from the previous answer, so a long conversation reads as one chained calculation."""
    b, op = int(rng.integers(1, 100)), str(rng.choice(["+", "-"]))
    result = OPS[op](previous, b)
    question = str(rng.choice(FOLLOW_UPS)).format(op="plus" if op == "+" else "minus", b=b)
    answer = f"{previous} {op} {b} = {result}"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], result


def conversation(rng: np.random.Generator, tokenizer, long: bool, max_length: int) -> list[dict]:
    """A single-turn Q/A, or (long) one whose length in tokens is drawn log-uniformly up to max_length."""
    messages, result = qa_turn(rng)
    if not long:
        return messages
    # Log-uniform between twice a single turn and max_length: many medium, few very long conversations.
    target = math.exp(rng.uniform(math.log(2 * n_tokens(tokenizer, messages)), math.log(max_length)))
    while True:
        turn, next_result = qa_turn(rng) if rng.random() < 0.3 else follow_up_turn(rng, result)
        if n_tokens(tokenizer, messages + turn) > target:
            return messages
        messages, result = messages + turn, next_result


def n_tokens(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def write_rows(path: Path, tokenizer, n: int, long_share: float, max_length: int, seed: int) -> None:
    """`n` {"messages": [...]} rows, a `long_share` of them long multi-turn, seeded."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            messages = conversation(rng, tokenizer, rng.random() < long_share, max_length)
            f.write(json.dumps({"messages": messages}) + "\n")


# ---------------------------------------------------------------- the runs


def make_sft_config(args: argparse.Namespace, tmp: Path, init: Path, packing: bool, name: str) -> SftConfig:
    """The library config: no evaluation, samples or checkpoints inside the loop; a log line at the warm-up's end."""
    return SftConfig(
        runs_dir=str(tmp / "runs"),
        cache_dir=str(tmp / "cache"),
        run_name=name,
        seed=args.seed,
        init=str(init),
        data=str(tmp / "train.jsonl"),
        eval_data=str(tmp / "eval.jsonl"),
        max_length=args.max_length,
        packing=packing,
        batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        warmup_steps=args.warmup,
        mixed_precision="auto" if args.device == "cuda" else "no",
        task="none",
        eval_every=0,
        save_every=0,
        num_samples=0,
        log_every=math.gcd(args.warmup, args.steps),
    )


def batch_schedule(items: list[Example] | list[Packed], cfg: SftConfig) -> list[list[Example] | list[Packed]]:
    """The items of each step's batch, drawn as the loop draws them (one process, no accumulation)."""
    # batch_indices is the loop's own draw: a pure function of (seed, step).
    return [
        [items[i] for i in batch_indices(len(items), cfg.batch_size, cfg.seed, step)] for step in range(cfg.max_steps)
    ]


def measure(cfg: SftConfig, schedule: list, n_items: int, args: argparse.Namespace) -> dict[str, float]:
    """One SFT run: real tokens/s and ms/step over the logged windows after the warm-up.

    The loop logs `tokens_per_s` per window of `log_every` steps: the window's real tokens over its time. The
    tokens of each window are known exactly from the batch schedule, so each window's time is tokens / tokens_per_s,
    and the result is tokens-weighted: the timed windows' summed tokens over their summed time (not a mean of rates,
    which would overweight windows of short batches).
    """
    torch.set_num_threads(args.threads)
    gc.collect()  # start with the previous measurement's garbage collected
    with quiet(args.verbose):
        path = sft.run(cfg)
    if json.loads((path / "llmtrain.json").read_text())["data"]["train_items"] != n_items:
        raise RuntimeError(f"{path.name}: the loop's items differ from the ones this script scheduled")
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
    tokens, seconds, steps = 0, 0.0, 0
    for row in (r for r in rows if "tokens_per_s" in r and r["step"] > args.warmup):
        first = (row["step"] - 1) // cfg.log_every * cfg.log_every  # the window's first step, 0-based
        n = sum(len(item.input_ids) for batch in schedule[first : row["step"]] for item in batch)
        tokens, seconds, steps = tokens + n, seconds + n / row["tokens_per_s"], steps + row["step"] - first
    if steps != args.steps:
        raise RuntimeError(f"expected {args.steps} timed steps in {path / 'metrics.jsonl'}, found {steps}")
    return {"tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / steps}


def batch_stats(schedule: list, warmup: int) -> dict[str, float]:
    """Real tokens per timed step, and the padding share of the collated batches (each as wide as its longest row)."""
    timed = schedule[warmup:]
    real = sum(len(item.input_ids) for batch in timed for item in batch)
    width = sum(len(batch) * max(len(item.input_ids) for item in batch) for batch in timed)
    return {"real_tokens_per_step": real / len(timed), "padding_share": 1 - real / width}


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the library's Accelerator would otherwise take a GPU
    torch.set_num_threads(args.threads)
    if not args.verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_sft-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["LLMTRAIN_CACHE"] = str(tmp / "cache")
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")  # datasets is imported lazily, after this
        # The model to tune: a short pretraining run, which also trains the project's tokenizer.
        # seq_len = max_length, so the position range covers the longest SFT row.
        with quiet(args.verbose):
            parent = pretrain.run(
                PretrainConfig(
                    runs_dir=str(tmp / "runs"),
                    cache_dir=str(tmp / "cache"),
                    run_name="parent",
                    seed=args.seed,
                    preset=args.preset,
                    seq_len=args.max_length,
                    batch_size=8,
                    max_steps=args.pretrain_steps,
                    warmup_steps=min(5, args.pretrain_steps),
                    mixed_precision="auto" if args.device == "cuda" else "no",
                    eval_every=0,
                    eval_batches=1,
                    sample_every=0,
                    num_samples=1,
                    sample_tokens=1,
                    save_every=0,
                )
            )
        tokenizer = load_tokenizer(parent)
        write_rows(tmp / "train.jsonl", tokenizer, args.rows, args.long_share, args.max_length, args.seed)
        write_rows(tmp / "eval.jsonl", tokenizer, EVAL_ROWS, args.long_share, args.max_length, args.seed + 1)
        rows = load_chat_rows(str(tmp / "train.jsonl"))
        examples, data_stats = tokenize_dataset(tokenizer, rows, args.max_length)
        items = {"padded": examples, "packed": pack_examples(examples, args.max_length)}
        configs = {mode: make_sft_config(args, tmp, parent, mode == "packed", mode) for mode in MODES}
        schedules = {mode: batch_schedule(items[mode], configs[mode]) for mode in MODES}

        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for i in range(args.repeats):  # padded/packed/padded/packed
            for mode in MODES:
                cfg = make_sft_config(args, tmp, parent, mode == "packed", f"{mode}-{i}")
                runs[mode].append(measure(cfg, schedules[mode], len(items[mode]), args))
        model_manifest = json.loads((parent / "llmtrain.json").read_text())

    lengths = np.array([len(e.input_ids) for e in examples])
    report: dict[str, Any] = {
        "benchmark": "bench_sft",
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "device_name": device_name(args.device),
            "threads": torch.get_num_threads(),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "model": args.preset,
        "architecture": model_manifest["model"]["architecture"],
        "parameters": model_manifest["model"]["parameters"],
        **{k: getattr(args, k) for k in ("max_length", "batch_size", "steps", "warmup", "repeats", "seed")},
        "data": {
            "rows": args.rows,
            "long_share": args.long_share,
            "examples": len(examples),
            "truncated": data_stats.truncated,
            "tokens": data_stats.tokens,
            "trained_tokens": data_stats.trained_tokens,
            "length_min": int(lengths.min()),
            "length_median": float(np.median(lengths)),
            "length_p90": float(np.percentile(lengths, 90)),
            "length_max": int(lengths.max()),
        },
        "tokens_per_s": "real (non-pad) tokens, as logged by the loop; tokens-weighted over the timed windows",
    }
    for mode in MODES:  # median of the repeats
        median = {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]}
        report[mode] = {
            "items": len(items[mode]),
            **median,
            **batch_stats(schedules[mode], args.warmup),
            "repeats": runs[mode],
        }
    report["ratio_packed_over_padded"] = report["packed"]["tokens_per_s"] / report["padded"]["tokens_per_s"]
    print_table(report)
    write_report(report, args.out, f"bench_sft-{args.preset}-{args.device}")


def print_table(r: dict[str, Any]) -> None:
    m, d, padded, packed = r["machine"], r["data"], r["padded"], r["packed"]
    cpu = m["device"] == "cpu"
    print(f"bench_sft: {r['model']} ({r['architecture']}, {r['parameters'] / 1e6:.2f}M parameters)")
    threads = f", {m['threads']} threads" if cpu else ""
    print(f"device: {m['device']} ({m['device_name']}, {m['cpu_count']} CPUs{threads}), torch {m['torch']}")
    print(
        f"data: {d['examples']:,} conversations ({d['long_share']:.0%} long multi-turn), tokens per example "
        f"min {d['length_min']} / median {d['length_median']:.0f} / p90 {d['length_p90']:.0f} / max {d['length_max']}"
        f" ({d['truncated']} truncated)"
    )
    print(
        f"shape: batch {r['batch_size']}, max_length {r['max_length']}; {r['steps']} timed steps after "
        f"{r['warmup']} warm-up; median of {r['repeats']} alternating repeats"
    )
    each = lambda side: " ".join(f"{x['tokens_per_s']:,.0f}" for x in side["repeats"])  # noqa: E731
    rows = [
        ("", "padded", "packed"),
        ("items (examples | packed rows)", f"{padded['items']:,}", f"{packed['items']:,}"),
        ("tokens/s (real, no padding)", f"{padded['tokens_per_s']:,.0f}", f"{packed['tokens_per_s']:,.0f}"),
        ("ms/step", f"{padded['ms_per_step']:.1f}", f"{packed['ms_per_step']:.1f}"),
        ("real tokens/step", f"{padded['real_tokens_per_step']:,.0f}", f"{packed['real_tokens_per_step']:,.0f}"),
        ("padding share of batches", f"{padded['padding_share']:.1%}", f"{packed['padding_share']:.1%}"),
        ("tokens/s each repeat", each(padded), each(packed)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"  {row[0]:<{widths[0]}}   {row[1]:>{widths[1]}}   {row[2]:>{widths[2]}}")
    print(f"packed / padded: {r['ratio_packed_over_padded']:.2f}x real tokens/s")
    if cpu:
        before, after = m["load_average_1min"]
        print(f"load average (1 min): {before:.2f} before, {after:.2f} after (this benchmark adds ~{m['threads']})")


if __name__ == "__main__":
    main()
