"""Chat data preparation: rows/s of the old row-by-row loop against datasets.map + cache, and a cache hit.

`llmtrain.data.chat.tokenize_dataset` used to loop over the rows in Python, in every process of every launch.
It now maps them with `datasets` in `num_proc` processes and caches the result under the llmtrain cache folder
(`llmtrain.data.prepare`). On `--rows` synthetic chat rows (deterministic arithmetic Q/A, one to four turns, a
quarter with a system turn), with a tokenizer trained by `llmtrain.tokenizer.train_tokenizer` (or `--tokenizer`,
a local folder), this script times, each in a fresh Python process as one launch of a stage would see it (the
saved tokenizer loaded, the rows rebuilt, only the call timed):

- **old loop**: the previous `tokenize_dataset` body, `tokenize_chat` row after row;
- **map, num_proc=1** and **map, num_proc=N** (N = `--num_proc`, default every core this process may use), each on
  an empty cache: the new path's overhead alone, and with the cores;
- **cache hit, same process**: the num_proc=N call again in its process;
- **cache hit, second launch**: a fresh process calling with the same inputs (tokenizing is switched off in it, so
  a miss would fail).

Every path's examples and statistics are checked to equal the old loop's (a hash of both). The measurements are
alternated `--repeats` times and the medians reported, since a shared CPU's speed drifts. Prints a table and writes
JSON (by default `benchmarks/results/bench_chat_data-cpu.json`). Tokenizer and caches live in a temporary folder
that is removed at the end.

    python benchmarks/bench_chat_data.py                       # 100,000 rows, every core
    python benchmarks/bench_chat_data.py --rows 20000 --num_proc 4 --repeats 3
    python benchmarks/bench_chat_data.py --tokenizer path/to/model --max_length 512
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import datasets
import tokenizers
import torch
import transformers
from common import device_name, write_report

from llmtrain.data.chat import Example, TokenizeStats, check_verified, tokenize_chat, tokenize_dataset
from llmtrain.errors import LLMTrainError
from llmtrain.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

SYSTEM = "You are a careful arithmetic tutor. Answer with the full equation."
QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Please work out {a} {op} {b}.")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="synthetic chat rows")
    p.add_argument("--num_proc", type=int, default=None, help="map processes (default: every usable core)")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=512, help="of the tokenizer trained here")
    p.add_argument("--tokenizer", default=None, help="a local tokenizer folder instead of training one")
    p.add_argument("--repeats", type=int, default=1, help="alternated repeats; medians are reported")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=2, metavar=("MODE", "TMP"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def chat_rows(n: int, seed: int) -> list[list[dict]]:
    """`n` conversations: one to four arithmetic Q/A turns, a quarter of them after a system turn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
        for _ in range(rng.choice((1, 1, 2, 3, 4))):
            a, b, op = rng.randint(1, 99), rng.randint(1, 99), rng.choice(list(OPS))
            question = rng.choice(QUESTIONS).format(a=a, op=op, b=b)
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"{a} {op} {b} = {OPS[op](a, b)}"},
            ]
        rows.append(messages)
    return rows


def old_loop(tokenizer, rows, max_length: int, source: str = "the data") -> tuple[list[Example], TokenizeStats]:
    """`tokenize_dataset` as it was before datasets.map: every row through `tokenize_chat`, in this process."""
    stats = TokenizeStats()
    examples = []
    for n, messages in enumerate(rows, 1):
        try:
            examples.append(tokenize_chat(tokenizer, messages, max_length, stats))
        except LLMTrainError as e:
            raise LLMTrainError(f"{source}, row {n}: {e}") from None
    check_verified(stats.unverified, stats.rows, stats.unverified_reason, source)
    return [e for e in examples if e is not None], stats


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def digest(result: tuple[list[Example], TokenizeStats]) -> str:
    """A hash of the examples and the statistics, to compare the paths' results across processes."""
    examples, stats = result
    text = json.dumps([[[e.input_ids, e.labels] for e in examples], asdict(stats)])
    return hashlib.sha256(text.encode()).hexdigest()


def child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process, as one launch of a stage would see it: load the saved tokenizer,
    rebuild the rows, time the call(s); print JSON."""
    import llmtrain.data.chat as chat

    mode, tmp = args.child[0], Path(args.child[1])
    tokenizer = load_tokenizer(tmp / "tokenizer")
    rows = chat_rows(args.rows, args.seed)
    tokenize_dataset(tokenizer, rows[:50], args.max_length)  # probe the template once, outside the timings
    report: dict[str, Any] = {}
    if mode == "old":
        result, report["seconds"] = timed(old_loop, tokenizer, rows, args.max_length)
    else:
        if mode == "hit":  # the second launch: tokenizing is switched off, so a miss fails

            def no_tokenizing(*a, **k):
                raise RuntimeError("the second launch tokenized a row: the cache was missed")

            chat.tokenize_chat = no_tokenizing
        cache = tmp / ("cache" if mode == "hit" else f"cache-{mode}")
        call = dict(num_proc=args.num_proc, cache_dir=cache)
        result, report["seconds"] = timed(tokenize_dataset, tokenizer, rows, args.max_length, **call)
        if mode != "hit":  # the same call again in this process: the cache is hit
            again, report["hit_seconds"] = timed(tokenize_dataset, tokenizer, rows, args.max_length, **call)
            report["hit_digest"] = digest(again)
            entry = next((cache / "prepared").iterdir())
            report["entry_mib"] = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) / 2**20
    report["digest"] = digest(result)
    stats = {k: v for k, v in asdict(result[1]).items() if k != "unverified_reason"}
    report["data"] = {"examples": len(result[0]), **stats}
    print(json.dumps(report))


def run_child(args: argparse.Namespace, mode: str, tmp: Path, num_proc: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, str(tmp), "--rows", str(args.rows)]
    command += ["--seed", str(args.seed), "--max_length", str(args.max_length), "--num_proc", str(num_proc)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.child is not None:
        child(args)
        return
    transformers.logging.set_verbosity_error()
    num_proc = args.num_proc or usable_cores()
    load_before = os.getloadavg()[0]
    runs: dict[str, list[float]] = {}
    reference: dict[str, Any] = {}

    def record(name: str, seconds: float, result_digest: str) -> None:
        if result_digest != reference["digest"]:
            raise RuntimeError(f"{name}: the examples or statistics differ from the old loop's")
        runs.setdefault(name, []).append(seconds)
        print(f"  {name:<28} {seconds:8.2f} s  {args.rows / seconds:10,.0f} rows/s", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_chat_data-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["LLMTRAIN_CACHE"] = str(tmp / "cache")
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")
        if args.tokenizer:
            source = load_tokenizer(args.tokenizer)
        else:
            texts = [m["content"] for messages in chat_rows(5000, args.seed) for m in messages]
            source = train_tokenizer(texts, vocab_size=args.vocab_size)
        # Every measurement loads this saved tokenizer, as every stage loads its parent run's.
        save_tokenizer(source, tmp / "tokenizer")

        print(f"bench_chat_data: {args.rows:,} rows, {num_proc} map processes ({usable_cores()} usable cores)")
        for i in range(args.repeats):  # old / map 1 / map N / second launch, alternated
            print(f"repeat {i + 1} of {args.repeats}", flush=True)
            old = run_child(args, "old", tmp, num_proc)
            reference = reference or old
            record("old loop", old["seconds"], old["digest"])
            for n in dict.fromkeys((1, num_proc)):
                cold = run_child(args, str(n), tmp, n)
                record(f"map, num_proc={n} (cold)", cold["seconds"], cold["digest"])
            record("cache hit, same process", cold["hit_seconds"], cold["hit_digest"])
            for name in ("cache", "cache-1"):
                shutil.rmtree(tmp / name, ignore_errors=True)
            os.rename(tmp / f"cache-{num_proc}", tmp / "cache")
            second = run_child(args, "hit", tmp, num_proc)
            record("cache hit, second launch", second["seconds"], second["digest"])

    results = {
        name: {
            "seconds": statistics.median(times),
            "rows_per_s": args.rows / statistics.median(times),
            "best_seconds": min(times),
            "each": times,
        }
        for name, times in runs.items()
    }
    old_s = results["old loop"]["seconds"]
    report: dict[str, Any] = {
        "benchmark": "bench_chat_data",
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor(),
            "device_name": device_name("cpu"),
            "cpu_count": os.cpu_count(),
            "usable_cores": usable_cores(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "rows": args.rows,
        "repeats": args.repeats,
        "num_proc": num_proc,
        "max_length": args.max_length,
        "tokenizer": args.tokenizer or f"train_tokenizer(vocab_size={args.vocab_size})",
        "data": reference["data"],
        "cache_entry_mib": cold["entry_mib"],
        "results": results,
        "speedup_cold_over_old": old_s / results[f"map, num_proc={num_proc} (cold)"]["seconds"],
        "speedup_second_launch_over_old": old_s / results["cache hit, second launch"]["seconds"],
    }
    print_table(report)
    write_report(report, args.out, "bench_chat_data-cpu")


def print_table(r: dict[str, Any]) -> None:
    m, d = r["machine"], r["data"]
    print()
    print(f"bench_chat_data: {r['rows']:,} chat rows, max_length {r['max_length']}, tokenizer {r['tokenizer']}")
    print(
        f"machine: {m['device_name']}, {m['usable_cores']} usable cores; python {m['python']}, datasets "
        f"{m['datasets']}, transformers {m['transformers']}, tokenizers {m['tokenizers']}"
    )
    print(
        f"data: {d['examples']:,} examples, {d['tokens']:,} tokens ({d['trained_tokens']:,} trained), "
        f"{d['truncated']} truncated, {d['dropped']} dropped; cache entry {r['cache_entry_mib']:.1f} MiB"
    )
    old = r["results"]["old loop"]["seconds"]
    best = r["results"]["old loop"]["best_seconds"]
    header = f"  {'median of ' + str(r['repeats']):<28} {'seconds':>9} {'rows/s':>11} {'vs old loop':>12}"
    print(f"{header}   best (vs old)   each (s)")
    for name, x in r["results"].items():
        each = " ".join(f"{t:.2f}" for t in x["each"])
        line = f"  {name:<28} {x['seconds']:9.2f} {x['rows_per_s']:11,.0f} {old / x['seconds']:11.2f}x"
        print(f"{line}   {x['best_seconds']:5.2f} ({best / x['best_seconds']:5.2f}x)   {each}")
    before, after = m["load_average_1min"]
    print(f"load average (1 min): {before:.2f} before, {after:.2f} after")


if __name__ == "__main__":
    main()
