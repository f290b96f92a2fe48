"""Pretraining: a causal LM on a text corpus, with a nanoGPT-style loop on Accelerate.

Read top to bottom: accelerator and run folder, tokenizer, token shards, model, optimizer, the loop,
the end (evaluate, sample, save, register). Every stop, whether max_steps, token budget, time
budget or a signal, ends the same way: a checkpoint or a finished run, never a lost one.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmtrain.config import PretrainConfig, config_to_dict
from llmtrain.data.corpus import (
    build_token_shards,
    documents_for_tokenizer,
    fingerprint_corpus,
    load_documents,
    resolve_corpus,
)
from llmtrain.data.windows import TokenWindows
from llmtrain.distributed import full_state_dict, micro_step
from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.evaluate import evaluate_lm
from llmtrain.flops import flops_per_token, non_embedding_params, parameter_count, peak_flops
from llmtrain.generate import sample
from llmtrain.optim import SCHEDULES, build_optimizer, lr_at
from llmtrain.registry import ModelSource, load_causal_lm, preset_config, resolve_model
from llmtrain.run_dir import Run
from llmtrain.runtime import (
    cache_dir,
    end_run,
    install_signal_handlers,
    make_accelerator,
    print_main,
    progress_bar,
    restore_signal_handlers,
)
from llmtrain.tokenizer import load_tokenizer, save_tokenizer, token_byte_lengths, train_tokenizer

PLOT_CURVES = {"loss": ["train_loss", "val_loss"], "bits per byte": ["val_bpb"], "learning rate": ["lr"]}


def run(cfg: PretrainConfig) -> Path:
    """Pretrain per `cfg`; returns the finished run directory."""
    _check_config(cfg)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    source = resolve_model(cfg.preset, cfg.runs_dir)
    run = Run.open(cfg, "pretrain", cfg.preset if source.kind == "preset" else "continued", accelerator)

    # ---- data: tokenizer, then token shards (built once, by the main process, then cached)
    cache = cache_dir(cfg.cache_dir)
    corpus = resolve_corpus(cfg.data, cache)
    read_opts = dict(
        text_field=cfg.text_field,
        dataset_config=cfg.dataset_config,
        split=cfg.dataset_split,
        max_documents=cfg.max_documents,
    )
    data_fp = fingerprint_corpus(corpus, **read_opts)
    with accelerator.main_process_first():
        docs = load_documents(corpus, streaming=cfg.streaming, **read_opts)
        tokenizer = _get_tokenizer(cfg, source, docs, data_fp, cache)
        shards = build_token_shards(
            docs, tokenizer, cache / "tokens", data_fp, cfg.dedup, cfg.val_fraction, cfg.num_proc
        )
    train_data = TokenWindows(shards.tokens("train"), cfg.seq_len, "train")
    val_data = TokenWindows(shards.tokens("val"), cfg.seq_len, "val")
    token_bytes = torch.tensor(token_byte_lengths(tokenizer), device=device)

    # ---- model and optimizer
    model = _build_model(cfg, source, tokenizer)
    n_params = parameter_count(model)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    total_steps = cfg.max_steps
    if cfg.max_tokens:
        total_steps = min(total_steps, math.ceil(cfg.max_tokens / tokens_per_step))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if cfg.compile:
        model.compile()  # in place: state_dict keys stay those of the HF model, so checkpoints load anywhere
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)  # the bare HF model, for config, sampling and saving
    flops_tok = flops_per_token(
        non_embedding_params(raw_model),
        raw_model.config.num_hidden_layers,
        raw_model.config.hidden_size,
        cfg.seq_len,
    )
    peak = peak_flops(device)

    step, tokens_seen, train_time = 0, 0, 0.0
    if run.resume_from is not None:
        state = run.load_checkpoint(accelerator)
        step, tokens_seen, train_time = state["step"], state["tokens_seen"], state["train_time_s"]
        run.truncate_metrics(step)
        print_main(accelerator, f"Resuming {run.name} from step {step} ({run.resume_from.name}).")
    run.start(
        config_to_dict(cfg),
        preset=cfg.preset if source.kind == "preset" else None,
        parent=source.run_name or (source.path if source.kind != "preset" else None),
        model={
            "source": source.kind,
            "spec": cfg.preset,
            "parameters": n_params,
            "architecture": type(raw_model).__name__,
        },
        data={"spec": cfg.data, "fingerprint": data_fp, "shards": str(shards.path), **vars(shards.stats)},
        world_size=world,
    )
    if cfg.tracker:
        accelerator.init_trackers(run.name, config=config_to_dict(cfg))
    print_main(
        accelerator,
        _summary(cfg, run, n_params, shards.stats, tokens_per_step, world, device, accelerator.mixed_precision),
    )

    # ---- the loop
    stop_signal = install_signal_handlers()
    progress = progress_bar(accelerator, total_steps, step, "pretrain")
    model.train()
    last_val: dict[str, float] = {}
    train_loss = float("nan")
    if step == 0 and cfg.eval_every > 0:
        last_val = evaluate_lm(model, val_data, token_bytes, cfg.batch_size, cfg.eval_batches, accelerator)
        run.log_metrics(0, last_val, accelerator)
    window_tokens, window_time, data_time = 0, 0.0, 0.0
    try:
        while True:
            stop = _stop_reason(cfg, step, total_steps, tokens_seen, train_time)
            if stop:
                break
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                td = time.perf_counter()
                x, y = train_data.random_batch(cfg.seed, step, micro, cfg.batch_size, device, rank, world)
                data_time += time.perf_counter() - td
                # Gradients are all-reduced once per optimizer step, on the last micro-step.
                with micro_step(accelerator, model, last=micro == cfg.grad_accum - 1):
                    logits = model(input_ids=x).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    accelerator.backward(loss / cfg.grad_accum)
                loss_sum += loss.detach()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step

            # One small collective per step: the mean loss and "has any process been signalled".
            flags = torch.stack([loss_sum / cfg.grad_accum, torch.tensor(float(stop_signal[0]), device=device)])
            flags = accelerator.reduce(flags, reduction="mean") if world > 1 else flags
            train_loss, signalled = flags[0].item(), flags[1].item() > 0
            if not math.isfinite(train_loss):
                raise LLMTrainError(
                    f"The training loss became {train_loss} at step {step} (lr {lr:.3g}); the run stopped. "
                    f"The last good checkpoint is kept in {run.path}. Lower --lr, raise --warmup_steps or "
                    f"set --grad_clip, then start again (or --resume from that checkpoint)."
                )
            dt = time.perf_counter() - t0
            train_time += dt
            window_tokens += tokens_per_step
            window_time += dt
            progress.update(1)

            if step % cfg.log_every == 0 or step == total_steps:
                tok_s = window_tokens / window_time
                logged = {
                    "train_loss": train_loss,
                    "lr": lr,
                    "tokens_seen": tokens_seen,
                    "tokens_per_s": tok_s,
                    "data_wait_frac": data_time / window_time,
                }
                if grad_norm is not None:
                    logged["grad_norm"] = float(grad_norm)
                if peak:
                    logged["mfu"] = flops_tok * tok_s / (peak * world)
                run.log_metrics(step, logged, accelerator)
                progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                window_tokens, window_time, data_time = 0, 0.0, 0.0
            if cfg.eval_every and step % cfg.eval_every == 0:
                last_val = evaluate_lm(model, val_data, token_bytes, cfg.batch_size, cfg.eval_batches, accelerator)
                run.log_metrics(step, last_val, accelerator)
                progress.write(f"step {step}: val_loss {last_val['val_loss']:.4f}  val_bpb {last_val['val_bpb']:.4f}")
            if cfg.sample_every and step % cfg.sample_every == 0:
                _print_samples(progress.write, raw_model, tokenizer, val_data, cfg, accelerator)
            train_state = {"tokens_seen": tokens_seen, "train_time_s": train_time}
            run.checkpoint_after_step(
                accelerator, step, total_steps, train_state, cfg, (stop_signal[0] or signal.SIGTERM) if signalled else 0
            )
    except RunInterrupted:
        raise  # a checkpoint was saved: the run stays resumable
    except Exception:  # a user error or a crash: the run is marked failed, not left "running"
        run.update(status="failed")
        raise
    finally:
        progress.close()
        restore_signal_handlers()

    # ---- the end: evaluate, sample, save a Hugging Face checkpoint, register
    final_val = evaluate_lm(model, val_data, token_bytes, cfg.batch_size, cfg.eval_batches, accelerator)
    if not last_val or final_val != last_val:
        run.log_metrics(step, final_val, accelerator)
    _print_samples(print, raw_model, tokenizer, val_data, cfg, accelerator)
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        if raw_model.generation_config.eos_token_id is None:  # a model's own end-of-sequence ids are kept
            raw_model.generation_config.eos_token_id = tokenizer.eos_token_id
        raw_model.generation_config.pad_token_id = tokenizer.pad_token_id
        raw_model.save_pretrained(run.path, state_dict=state_dict, safe_serialization=True)
        save_tokenizer(tokenizer, run.path)
    metrics = {
        **final_val,
        "train_loss": train_loss,
        "tokens_seen": tokens_seen,
        "steps": step,
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(tokens_seen / train_time, 1) if train_time else 0.0,
        "stop_reason": stop,
    }
    if peak and train_time:
        metrics["mfu"] = flops_tok * metrics["tokens_per_s"] / (peak * world)
    run.update(status="finished", metrics=metrics)
    run.plot(PLOT_CURVES)
    run.remove_checkpoints()
    end_run(accelerator)
    print_main(
        accelerator,
        f"\nFinished {run.name}: val_loss {final_val['val_loss']:.4f}, "
        f"val_bpb {final_val['val_bpb']:.4f}, {metrics['tokens_per_s']:,.0f} tokens/s, "
        f"{train_time:.1f} s training ({stop}). Saved to {run.path}",
    )
    return run.path


# ---------------------------------------------------------------- helpers


def _check_config(cfg: PretrainConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise LLMTrainError(f"Unknown schedule '{cfg.schedule}'. Choose one of: {', '.join(SCHEDULES)}.")
    for name in ("batch_size", "seq_len", "grad_accum", "max_steps"):
        if getattr(cfg, name) < 1:
            raise LLMTrainError(f"{name} must be at least 1, got {getattr(cfg, name)}.")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise LLMTrainError(f"val_fraction must be between 0 and 1, got {cfg.val_fraction}.")


def _get_tokenizer(cfg: PretrainConfig, source: ModelSource, docs, data_fp: str, cache: Path):
    """--tokenizer if given; else the tokenizer of the model we continue from; else train one on the data."""
    if cfg.tokenizer:
        tok_source = resolve_model(cfg.tokenizer, cfg.runs_dir) if not Path(cfg.tokenizer).is_dir() else None
        return load_tokenizer(tok_source.path if tok_source and tok_source.path else cfg.tokenizer)
    if source.kind != "preset":
        return load_tokenizer(source.path)
    out = cache / "tokenizers" / f"{data_fp}-v{cfg.vocab_size}-c{cfg.tokenizer_train_chars}"
    if (out / "tokenizer.json").is_file():
        return load_tokenizer(out)
    tokenizer = train_tokenizer(
        documents_for_tokenizer(docs, cfg.tokenizer_train_chars), cfg.vocab_size, model_max_length=cfg.seq_len
    )
    if len(tokenizer) <= 256 + 7:
        raise LLMTrainError(f"The corpus {cfg.data} has no text to train a tokenizer on; it is empty.")
    save_tokenizer(tokenizer, out)
    return tokenizer


def _build_model(cfg: PretrainConfig, source: ModelSource, tokenizer):
    from transformers import AutoModelForCausalLM

    if source.kind == "preset":
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        # Round the embedding up to a multiple of 64: faster matmuls, and unused rows cost nothing.
        vocab = 64 * math.ceil(len(tokenizer) / 64)
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(preset_config(cfg.preset, vocab, cfg.seq_len, special))
    model = load_causal_lm(source, cfg.runs_dir, attn_implementation=cfg.attn_implementation)
    if len(tokenizer) > model.config.vocab_size:
        raise LLMTrainError(
            f"The tokenizer has {len(tokenizer)} tokens but model '{cfg.preset}' has an embedding of only "
            f"{model.config.vocab_size}: token ids past {model.config.vocab_size - 1} would crash. Use the model's "
            f"own tokenizer (drop --tokenizer) or a tokenizer with at most {model.config.vocab_size} tokens."
        )
    return model


def _stop_reason(cfg: PretrainConfig, step: int, total_steps: int, tokens_seen: int, train_time: float) -> str | None:
    if step >= total_steps:
        return "max_tokens" if cfg.max_tokens and total_steps < cfg.max_steps else "max_steps"
    if cfg.max_tokens and tokens_seen >= cfg.max_tokens:
        return "max_tokens"
    if cfg.max_time_s and train_time >= cfg.max_time_s:
        return "max_time_s"
    return None


def _print_samples(write, model, tokenizer, val_data: TokenWindows, cfg: PretrainConfig, accelerator) -> None:
    """Continue the first few tokens of held-out documents, so progress is visible as text. Every process
    samples (with sharded parameters each forward pass needs them all); the main one prints."""
    prompts = _sample_prompts(val_data, tokenizer, cfg.num_samples)
    outputs = sample(model, tokenizer, prompts, max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50)
    if not accelerator.is_main_process:
        return
    write("samples:")
    for prompt, out in zip(prompts, outputs):
        write(f"  {prompt!r} -> {out!r}")


def _sample_prompts(val_data: TokenWindows, tokenizer, n: int, prompt_tokens: int = 8) -> list[str]:
    tokens = val_data.tokens
    eos = tokenizer.eos_token_id
    starts = [0] + [int(i) + 1 for i in (tokens[:200_000] == eos).nonzero()[0][: n - 1]]
    # Cut at the last space so a prompt never ends inside a word or a number.
    texts = [tokenizer.decode(tokens[s : s + prompt_tokens], skip_special_tokens=True) for s in starts[:n]]
    prompts = [t.rsplit(" ", 1)[0] + " " if " " in t.strip() else t for t in texts]
    return [p for p in prompts if p.strip()] or [tokenizer.decode(tokens[:prompt_tokens])]


def _summary(cfg, run, n_params, stats, tokens_per_step, world, device, precision) -> str:
    return (
        f"run {run.name}: {cfg.preset}, {n_params / 1e6:.2f}M parameters, {world} process(es) on {device.type}, "
        f"precision {precision}\n"
        f"data: {stats.documents_read} documents read, {stats.empty_dropped} empty and {stats.duplicates_dropped} "
        f"duplicates dropped; train {stats.train_tokens:,} tokens ({stats.train_documents} docs), "
        f"val {stats.val_tokens:,} tokens ({stats.val_documents} docs)\n"
        f"{tokens_per_step:,} tokens per step (batch {cfg.batch_size} x seq {cfg.seq_len} x accum {cfg.grad_accum} "
        f"x {world} processes)"
    )
