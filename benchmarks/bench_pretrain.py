"""Pretraining throughput: llmtrain's loop against a bare PyTorch loop on the same model, data and optimizer.

Measures, in one process and alternating A/B/A/B (the CPU's speed drifts, so each side's median is reported):
  (A) the library loop, `llmtrain.stages.pretrain.run`, read back from its metrics.jsonl after the warm-up steps;
  (B) a bare loop: forward, cross-entropy, backward, clip, AdamW step, on the same batches pre-fetched before timing.
The ratio A/B is the loop's overhead (target >= 0.95). Data, tokenizer, shards and runs live in a temporary folder.

    python benchmarks/bench_pretrain.py --preset gpt-micro          # batch 16 x seq 128, the default recipe
    python benchmarks/bench_pretrain.py --nanogpt                   # nanoGPT's CPU shape, batch 12 x seq 64
    python benchmarks/bench_pretrain.py --preset gpt-small --device cuda --compile --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from common import device_name, quiet, write_report
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from llmtrain.config import PretrainConfig
from llmtrain.data.windows import TokenWindows
from llmtrain.flops import flops_per_token, non_embedding_params, peak_flops
from llmtrain.optim import build_optimizer
from llmtrain.registry import PRESETS, preset_config
from llmtrain.stages.pretrain import run
from llmtrain.tokenizer import load_tokenizer

# nanoGPT's CPU example shape (GPT-2 blocks, no dropout), and the library settings that keep a run to its loop.
NANOGPT = dict(n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
QUIET_RUN = dict(eval_every=0, sample_every=0, save_every=0, eval_batches=1, num_samples=1, sample_tokens=1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt-micro", choices=PRESETS)
    p.add_argument("--nanogpt", action="store_true", help="nanoGPT's CPU shape (GPT-2, 4x4x128) instead of a preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batch_size", type=int, default=None, help="default: 12 with --nanogpt, else 16")
    p.add_argument("--seq_len", type=int, default=None, help="default: 64 with --nanogpt, else 128")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--verbose", action="store_true", help="show the library's own output")
    args = p.parse_args()
    args.batch_size = args.batch_size or (12 if args.nanogpt else 16)
    args.seq_len = args.seq_len or (64 if args.nanogpt else 128)
    args.name = "nanogpt" if args.nanogpt else args.preset
    return args


def make_config(args: argparse.Namespace, tmp: Path, model: str, max_steps: int) -> PretrainConfig:
    """The library config: no eval, samples or checkpoints inside the timed steps; a log line at the warm-up's end."""
    return PretrainConfig(
        runs_dir=str(tmp / "runs"),
        cache_dir=str(tmp / "cache"),
        data="default",
        preset=model,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=max_steps,
        log_every=math.gcd(args.warmup, args.steps),
        seed=args.seed,
        compile=args.compile,
        mixed_precision="auto" if args.device == "cuda" else "no",
        **QUIET_RUN,
    )


def nanogpt_checkpoint(tokenizer_dir: Path, out: Path, seq_len: int, seed: int) -> Path:
    """nanoGPT's CPU shape as a GPT-2 config with random weights, saved with the tokenizer as a local checkpoint."""
    tokenizer = load_tokenizer(tokenizer_dir)
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = GPT2Config(vocab_size=64 * math.ceil(len(tokenizer) / 64), n_positions=seq_len, **NANOGPT, **special)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prefetched_batches(run_dir: Path, seq_len: int, batch_size: int, seed: int, steps: int, device) -> list:
    """The batches the library draws at steps 0..steps-1, from the token shards that `run_dir` trained on."""
    shards = Path(json.loads((run_dir / "llmtrain.json").read_text())["data"]["shards"])
    dtype = json.loads((shards / "meta.json").read_text())["dtype"]
    windows = TokenWindows(np.memmap(shards / "train.bin", dtype=dtype, mode="r"), seq_len)
    return [windows.random_batch(seed, s, 0, batch_size, device) for s in range(steps)]


def fresh_model(preset: str, tokenizer, seq_len: int, seed: int) -> torch.nn.Module:
    """The preset with the library's fresh initialisation: the same seed, the vocabulary padded to a multiple of 64."""
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(seed)
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    return AutoModelForCausalLM.from_config(preset_config(preset, vocab, seq_len, special))


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def library_loop(cfg: PretrainConfig, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """(A) llmtrain's loop: tokens of the logged windows after the warm-up over their summed time."""
    torch.set_num_threads(args.threads)
    gc.collect()  # start with the previous measurement's garbage collected
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with quiet(args.verbose):
        path = run(cfg)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
    seen, tokens, seconds, waiting = 0, 0, 0.0, 0.0
    for row in (r for r in rows if "tokens_per_s" in r):
        n, seen = row["tokens_seen"] - seen, row["tokens_seen"]
        if row["step"] > args.warmup:
            tokens += n
            seconds += n / row["tokens_per_s"]
            waiting += row["data_wait_frac"] * n / row["tokens_per_s"]
    return {"tokens_per_s": tokens / seconds, "data_wait_frac": waiting / seconds, "peak_mib": peak_memory_mib(device)}


def bare_loop(
    make_model: Callable[[], torch.nn.Module], cfg: PretrainConfig, batches: list, args: argparse.Namespace
) -> dict[str, float]:
    """(B) the same steps without the library: pre-fetched batches, no logging, no per-step sync."""
    device = batches[0][0].device
    torch.set_num_threads(args.threads)
    gc.collect()
    model = make_model().to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if args.compile:
        model = torch.compile(model)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()  # what the library's "auto" precision picks
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for i, (x, y) in enumerate(batches):
        if i == args.warmup:
            sync()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    tokens_per_s = args.steps * args.batch_size * args.seq_len / (time.perf_counter() - t0)
    return {"tokens_per_s": tokens_per_s, "data_wait_frac": 0.0, "peak_mib": peak_memory_mib(device)}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the library's Accelerator would otherwise take a GPU
    torch.set_num_threads(args.threads)
    if not args.verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_pretrain-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["LLMTRAIN_CACHE"] = str(tmp / "cache")
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")  # datasets is imported lazily, after this
        # Short warm-up calls: train the tokenizer and build the token shards before anything is timed.
        with quiet(args.verbose):
            warm = run(make_config(args, tmp, "gpt-nano" if args.nanogpt else args.preset, 2))
            spec = args.preset
            if args.nanogpt:  # a local checkpoint folder is what the loop continues from
                spec = str(nanogpt_checkpoint(warm, tmp / "nanogpt", args.seq_len, args.seed))
                warm = run(make_config(args, tmp, spec, 2))
        cfg = make_config(args, tmp, spec, args.warmup + args.steps)
        tokenizer = load_tokenizer(warm)
        batches = prefetched_batches(warm, args.seq_len, args.batch_size, args.seed, cfg.max_steps, device)

        def make_model() -> torch.nn.Module:
            if args.nanogpt:
                return AutoModelForCausalLM.from_pretrained(spec, attn_implementation="sdpa")
            return fresh_model(args.preset, tokenizer, args.seq_len, args.seed)

        runs: dict[str, list[dict[str, float]]] = {"library_loop": [], "bare_loop": []}
        for _ in range(args.repeats):  # A/B/A/B
            runs["library_loop"].append(library_loop(cfg, args, device))
            runs["bare_loop"].append(bare_loop(make_model, cfg, batches, args))
        model = make_model()

    tokens_per_step = args.batch_size * args.seq_len
    flops_tok = flops_per_token(
        non_embedding_params(model), model.config.num_hidden_layers, model.config.hidden_size, args.seq_len
    )
    peak = peak_flops(device)
    report: dict[str, Any] = {
        "benchmark": "bench_pretrain",
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "model": args.name,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        **{k: getattr(args, k) for k in ("batch_size", "seq_len", "steps", "warmup", "repeats", "compile")},
        "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS (ru_maxrss)",
    }
    for side, results in runs.items():  # median of the repeats; ms/step from the median tokens/s
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        median["ms_per_step"] = 1000 * tokens_per_step / median["tokens_per_s"]
        median["mfu"] = flops_tok * median["tokens_per_s"] / peak if peak else None
        report[side] = {**median, "repeats": results}
    report["ratio_loop_over_bare"] = report["library_loop"]["tokens_per_s"] / report["bare_loop"]["tokens_per_s"]
    print_table(report)
    write_report(report, args.out, f"bench_pretrain-{args.name}-{args.device}")


def print_table(r: dict[str, Any]) -> None:
    m, lib, bare = r["machine"], r["library_loop"], r["bare_loop"]
    cpu = m["device"] == "cpu"
    print(f"bench_pretrain: {r['model']} ({r['architecture']}, {r['parameters'] / 1e6:.2f}M parameters)")
    threads = f", {m['threads']} threads" if cpu else ""
    print(f"device: {m['device']} ({m['device_name']}, {m['cpu_count']} CPUs{threads}), torch {m['torch']}")
    print(
        f"shape: batch {r['batch_size']} x seq {r['seq_len']} = {r['batch_size'] * r['seq_len']:,} tokens/step; "
        f"{r['steps']} timed steps after {r['warmup']} warm-up; median of {r['repeats']} A/B repeats"
        + (", compiled" if r["compile"] else "")
    )
    each = lambda side: " ".join(f"{x['tokens_per_s']:,.0f}" for x in side["repeats"])  # noqa: E731
    mfu = lambda side: f"{side['mfu']:.1%}" if side["mfu"] is not None else ("n/a (CPU)" if cpu else "n/a")  # noqa: E731
    memory = f"peak memory: {lib['peak_mib']:,.0f} MiB, process max RSS" if cpu else None
    rows = [
        ("", "library loop (A)", "bare loop (B)"),
        ("tokens/s", f"{lib['tokens_per_s']:,.0f}", f"{bare['tokens_per_s']:,.0f}"),
        ("ms/step", f"{lib['ms_per_step']:.2f}", f"{bare['ms_per_step']:.2f}"),
        ("tokens/s each repeat", each(lib), each(bare)),
        ("data wait", f"{lib['data_wait_frac']:.1%}", "pre-fetched"),
        *([] if cpu else [("peak memory (MiB, allocated)", f"{lib['peak_mib']:,.0f}", f"{bare['peak_mib']:,.0f}")]),
        ("MFU", mfu(lib), mfu(bare)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"  {row[0]:<{widths[0]}}   {row[1]:>{widths[1]}}   {row[2]:>{widths[2]}}")
    ratio = r["ratio_loop_over_bare"]
    print(f"loop / bare: {ratio:.3f} (target >= 0.95: {'ok' if ratio >= 0.95 else 'BELOW TARGET'})")
    if memory:
        print(memory + " (whole benchmark process, both loops)")
        before, after = m["load_average_1min"]
        print(f"load average (1 min): {before:.2f} before, {after:.2f} after (this benchmark adds ~{m['threads']})")


if __name__ == "__main__":
    main()
