"""Pretraining throughput: llmtrain's loop against a bare PyTorch loop on the same model, data and optimizer.

Measures, in one process and alternating A/B/A/B (the CPU's speed drifts, so each side's median is reported):
  (A) the library loop, `llmtrain.stages.pretrain.run`, read back from its metrics.jsonl after the warm-up steps;
  (B) a bare loop: forward, cross-entropy, backward, clip, AdamW step, on the same batches pre-fetched before timing.
The ratio A/B is the loop's overhead (target >= 0.95). Data, tokenizer, shards and runs live in a temporary folder.

    python benchmarks/bench_pretrain.py --preset gpt-micro --batch_size 16 --seq_len 128
    python benchmarks/bench_pretrain.py --nanogpt            # nanoGPT's CPU shape: 4 layers, 4 heads, 128 wide
    python benchmarks/bench_pretrain.py --preset gpt-small --device cuda --compile --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from llmtrain.config import PretrainConfig
from llmtrain.data.windows import TokenWindows
from llmtrain.flops import flops_per_token, non_embedding_params, peak_flops
from llmtrain.optim import build_optimizer
from llmtrain.registry import PRESETS, preset_config
from llmtrain.stages.pretrain import run
from llmtrain.tokenizer import load_tokenizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt-micro", choices=PRESETS)
    p.add_argument("--nanogpt", action="store_true", help="nanoGPT's CPU shape (GPT-2, 4x4x128) instead of a preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 12 with --nanogpt, else 16")
    p.add_argument("--seq_len", type=int, default=None, help="default: 64 with --nanogpt, else 128")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=2)
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
    """The library config for one measurement: no eval, samples or checkpoints inside the timed steps."""
    return PretrainConfig(
        runs_dir=str(tmp / "runs"),
        cache_dir=str(tmp / "cache"),
        seed=args.seed,
        data="default",
        preset=model,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        compile=args.compile,
        mixed_precision="auto" if args.device == "cuda" else "no",
        max_steps=max_steps,
        eval_every=0,
        sample_every=0,
        save_every=0,
        log_every=math.gcd(args.warmup, args.steps),  # a log line falls exactly on the last warm-up step
        eval_batches=1,
        num_samples=1,
        sample_tokens=1,
    )


def quiet(verbose: bool) -> contextlib.AbstractContextManager:
    if verbose:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    devnull = stack.enter_context(open(os.devnull, "w"))
    stack.enter_context(contextlib.redirect_stdout(devnull))
    stack.enter_context(contextlib.redirect_stderr(devnull))
    return stack


def nanogpt_checkpoint(tokenizer_dir: Path, out: Path, seq_len: int, seed: int) -> Path:
    """nanoGPT's CPU shape as a GPT-2 config with random weights, saved with the tokenizer as a local checkpoint."""
    tokenizer = load_tokenizer(tokenizer_dir)
    # A run folder's tokenizer.json keeps the left padding its end-of-run sampling switched on, and the library's
    # shard builder encodes with the raw backend, so a padded tokenizer would pad every document: switch it off.
    tokenizer.backend_tokenizer.no_padding()
    config = GPT2Config(
        vocab_size=64 * math.ceil(len(tokenizer) / 64),
        n_positions=seq_len,
        n_embd=128,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def library_loop(cfg: PretrainConfig, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """(A) llmtrain's loop; tokens/s = tokens of the logged windows after warm-up / their summed time."""
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with quiet(args.verbose):
        path = run(cfg)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
    seen, tokens, seconds, waiting = 0, 0, 0.0, 0.0
    for row in (r for r in rows if "tokens_per_s" in r):
        n = row["tokens_seen"] - seen
        seen = row["tokens_seen"]
        if row["step"] > args.warmup:
            tokens += n
            seconds += n / row["tokens_per_s"]
            waiting += row["data_wait_frac"] * n / row["tokens_per_s"]
    return {
        "tokens_per_s": tokens / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "data_wait_frac": waiting / seconds,
        "peak_memory_mib": peak_memory_mib(device),
    }


def bare_loop(
    make_model: Any, cfg: PretrainConfig, batches: list, args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    """(B) the same steps without the library: pre-fetched batches, no logging, no per-step sync."""
    torch.set_num_threads(args.threads)
    model = make_model().to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if args.compile:
        model = torch.compile(model)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()  # what mixed_precision "auto" picks
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
    seconds = time.perf_counter() - t0
    return {
        "tokens_per_s": args.steps * args.batch_size * args.seq_len / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "data_wait_frac": 0.0,
        "peak_memory_mib": peak_memory_mib(device),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the library's Accelerator would otherwise pick a GPU
    torch.set_num_threads(args.threads)
    if not args.verbose:
        transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bench_pretrain-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["LLMTRAIN_CACHE"] = str(tmp / "cache")
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")  # datasets is imported lazily, after this
        # Warm-up call: trains the tokenizer and builds the token shards before anything is timed.
        with quiet(args.verbose):
            first = run(make_config(args, tmp, "gpt-nano" if args.nanogpt else args.preset, 2))
        model_spec = args.preset
        with quiet(args.verbose):
            if args.nanogpt:
                model_spec = str(nanogpt_checkpoint(first, tmp / "nanogpt", args.seq_len, args.seed))
            warm = run(make_config(args, tmp, model_spec, 2))
        cfg = make_config(args, tmp, model_spec, args.warmup + args.steps)
        tokenizer = load_tokenizer(warm)
        manifest = json.loads((warm / "llmtrain.json").read_text())
        shards = Path(manifest["data"]["shards"])
        dtype = json.loads((shards / "meta.json").read_text())["dtype"]
        windows = TokenWindows(np.memmap(shards / "train.bin", dtype=dtype, mode="r"), args.seq_len)
        batches = [windows.random_batch(args.seed, s, 0, args.batch_size, device) for s in range(cfg.max_steps)]

        def make_model() -> torch.nn.Module:
            if args.nanogpt:
                return AutoModelForCausalLM.from_pretrained(model_spec, attn_implementation="sdpa")
            special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            torch.manual_seed(args.seed)
            vocab = 64 * math.ceil(len(tokenizer) / 64)
            return AutoModelForCausalLM.from_config(preset_config(args.preset, vocab, args.seq_len, special))

        results: dict[str, list[dict[str, float]]] = {"library": [], "bare": []}
        for _ in range(args.repeats):
            results["library"].append(library_loop(cfg, args, device))
            results["bare"].append(bare_loop(make_model, cfg, batches, args, device))
        model = make_model()
        threads = torch.get_num_threads()

    median = {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in results.items()}
    ratio = median["library"]["tokens_per_s"] / median["bare"]["tokens_per_s"]
    n_params = sum(p.numel() for p in model.parameters())
    peak = peak_flops(device)
    flops_tok = flops_per_token(
        non_embedding_params(model), model.config.num_hidden_layers, model.config.hidden_size, args.seq_len
    )
    mfu = {side: flops_tok * m["tokens_per_s"] / peak for side, m in median.items()} if peak else None
    mem_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS (ru_maxrss, cumulative)"
    report = {
        "benchmark": "bench_pretrain",
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "device_name": device_name(device),
        },
        "model": args.name,
        "architecture": type(model).__name__,
        "parameters": n_params,
        "threads": threads,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "compile": args.compile,
        "library_loop": {**median["library"], "runs": results["library"]},
        "bare_loop": {**median["bare"], "runs": results["bare"]},
        "ratio_loop_over_bare": ratio,
        "peak_memory_kind": mem_kind,
        "mfu": mfu,
    }
    print_table(report, args)
    out = args.out or Path(__file__).parent / "results" / f"bench_pretrain-{args.name}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


def print_table(r: dict[str, Any], args: argparse.Namespace) -> None:
    m = r["machine"]
    lib, bare = r["library_loop"], r["bare_loop"]
    threads = f", {r['threads']} threads" if args.device == "cpu" else ""
    print(f"bench_pretrain  {r['model']} ({r['architecture']}, {r['parameters'] / 1e6:.2f}M parameters)")
    print(f"device {m['device']}: {m['device_name']}, {m['cpu_count']} CPUs{threads}, torch {m['torch']}")
    print(
        f"batch {args.batch_size} x seq {args.seq_len} = {args.batch_size * args.seq_len:,} tokens/step; "
        f"{args.steps} timed steps after {args.warmup} warm-up; median of {args.repeats} alternating repeats"
        + ("; compiled" if args.compile else "")
    )
    per_run = lambda side: "  ".join(f"{x['tokens_per_s']:,.0f}" for x in side["runs"])  # noqa: E731
    mfu = r["mfu"]
    no_mfu = "n/a (CPU)" if args.device == "cpu" else "n/a (unknown GPU peak)"
    rows = [
        ("", "library loop (A)", "bare loop (B)"),
        ("tokens/s", f"{lib['tokens_per_s']:,.0f}", f"{bare['tokens_per_s']:,.0f}"),
        ("ms/step", f"{lib['ms_per_step']:.2f}", f"{bare['ms_per_step']:.2f}"),
        ("tokens/s per repeat", per_run(lib), per_run(bare)),
        ("data wait", f"{lib['data_wait_frac']:.1%}", "pre-fetched"),
        ("peak memory (MiB)", f"{lib['peak_memory_mib']:,.0f}", f"{bare['peak_memory_mib']:,.0f}"),
        ("MFU", *((f"{mfu['library']:.1%}", f"{mfu['bare']:.1%}") if mfu else (no_mfu, no_mfu))),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}   {row[1]:>{widths[1]}}   {row[2]:>{widths[2]}}")
    verdict = "ok" if r["ratio_loop_over_bare"] >= 0.95 else "BELOW TARGET"
    print(f"loop / bare: {r['ratio_loop_over_bare']:.3f} (target >= 0.95: {verdict})")
    print(f"peak memory is {r['peak_memory_kind']}")


if __name__ == "__main__":
    main()
