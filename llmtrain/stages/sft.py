"""Supervised fine-tuning: a causal LM on prompt/response or chat data, loss on assistant tokens only.

Read top to bottom: accelerator and run folder, the model to tune (and LoRA), the chat data, the
parent's task accuracy, the loop, the end (evaluate, sample, save, register). Batches are a pure
function of (seed, step), and the loss of a step is averaged over the trained tokens of the whole
global batch, so resuming, accumulating and adding processes all give the same curve.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch

from llmtrain.config import PolicyConfig, SftConfig, config_to_dict
from llmtrain.data.chat import (
    collate_packed,
    collate_padded,
    load_chat_rows,
    masked_lm_loss,
    pack_examples,
    tokenize_dataset,
)
from llmtrain.data.schedule import batch_indices
from llmtrain.data.splits import train_and_eval_rows
from llmtrain.distributed import full_state_dict, micro_step
from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.evaluate import chat_eval_loss, distributed_task_accuracy, resolve_checker
from llmtrain.flops import parameter_count
from llmtrain.generate import stop_token_ids
from llmtrain.lora import add_lora, model_to_save
from llmtrain.optim import SCHEDULES, build_optimizer, lr_at
from llmtrain.registry import load_causal_lm, parent_manifest, resolve_init
from llmtrain.run_dir import Run
from llmtrain.runtime import (
    end_run,
    install_signal_handlers,
    make_accelerator,
    print_main,
    progress_bar,
    restore_signal_handlers,
)
from llmtrain.tokenizer import load_tokenizer, save_tokenizer

PLOT_CURVES = {
    "loss (assistant tokens)": ["train_loss", "val_loss"],
    "task accuracy": ["task_accuracy"],
    "learning rate": ["lr"],
}


def run(cfg: SftConfig) -> Path:
    """Fine-tune per `cfg`; returns the finished run directory."""
    _check_config(cfg)
    accelerator = make_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    init = resolve_init(cfg.init, cfg.runs_dir, "pretrain")
    run = Run.open(cfg, "sft", parent_manifest(init).get("preset") or Path(init.spec).name, accelerator)

    # ---- model, tokenizer, LoRA
    tokenizer = load_tokenizer(init.path, cfg.chat_template)
    model = load_causal_lm(init, cfg.runs_dir, attn_implementation=cfg.attn_implementation)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise LLMTrainError(f"The tokenizer of '{cfg.init}' has more tokens than the model's embedding.")
    model.config.use_cache = False  # training never needs the KV cache; packed rows must not use one
    if cfg.lora:
        model = add_lora(model, cfg, "CAUSAL_LM", accelerator)

    # ---- data: rows -> chat messages -> tokenized examples (-> packed rows)
    train_rows, eval_rows = train_and_eval_rows(cfg, load_chat_rows, "sft_train.jsonl", "sft_val.jsonl")
    prep = dict(num_proc=cfg.num_proc, cache_dir=cfg.cache_dir)
    with accelerator.main_process_first():  # the main process tokenizes and caches; the others then load the cache
        train_examples, train_stats = tokenize_dataset(tokenizer, train_rows, cfg.max_length, cfg.data, **prep)
        eval_examples, _ = tokenize_dataset(tokenizer, eval_rows, cfg.max_length, f"{cfg.eval_data} (held out)", **prep)
    if not train_examples:
        raise LLMTrainError(f"No training example of {cfg.data} fits in max_length={cfg.max_length}; raise it.")
    items = pack_examples(train_examples, cfg.max_length) if cfg.packing else train_examples
    collate = collate_packed if cfg.packing else collate_padded
    global_batch = cfg.batch_size * world
    steps_per_epoch = len(items) / (global_batch * cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_prompts = [_prompt_of(m) for m in eval_rows][: cfg.task_eval_rows]
    checker = resolve_checker(cfg.task, [p for p in eval_prompts if p is not None])

    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if cfg.compile:
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    step, train_time, parent_metrics = 0, 0.0, {}
    if run.resume_from is not None:
        state = run.load_checkpoint(accelerator)
        step, train_time, parent_metrics = state["step"], state["train_time_s"], state["parent_metrics"]
        run.truncate_metrics(step)
        print_main(accelerator, f"Resuming {run.name} from step {step}.")
    else:
        parent_metrics = _evaluate(model, raw_model, tokenizer, eval_examples, eval_prompts, checker, cfg, accelerator)
    run.start(
        config_to_dict(cfg),
        parent=init.run_name or init.path,
        preset=parent_manifest(init).get("preset"),
        model={
            "source": init.kind,
            "spec": init.spec,
            "lora": cfg.lora,
            "trainable_parameters": parameter_count(model, trainable_only=True),
        },
        data={
            "train": cfg.data,
            "eval": cfg.eval_data,
            "packing": cfg.packing,
            **vars(train_stats),
            "eval_rows": len(eval_rows),
            "train_items": len(items),
        },
        parent_metrics=parent_metrics,
        world_size=world,
    )
    if cfg.tracker:
        accelerator.init_trackers(run.name, config=config_to_dict(cfg))
    print_main(
        accelerator,
        f"run {run.name}: tuning {init.spec} on {len(train_examples):,} examples "
        f"({train_stats.truncated} truncated, {train_stats.dropped} dropped, {len(items):,} "
        f"{'packed rows' if cfg.packing else 'examples'}), {total_steps} steps; parent "
        + ", ".join(f"{k} {v:.4f}" for k, v in parent_metrics.items()),
    )

    # ---- the loop
    stop_signal = install_signal_handlers()
    progress = progress_bar(accelerator, total_steps, step, "sft")
    model.train()
    train_loss, stop = float("nan"), "max_steps"
    window = {"tokens": 0, "time": 0.0}
    try:
        while step < total_steps:
            if cfg.max_time_s and train_time >= cfg.max_time_s:
                stop = "max_time_s"
                break
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # This rank's share of each micro-step's global batch (a pure function of seed and step).
            chunks = []
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(items), global_batch, cfg.seed, step * cfg.grad_accum + micro)[rank::world]
                chunks.append([items[i] for i in idx])
            batches = [collate(chunk, tokenizer.pad_token_id) for chunk in chunks]
            # Average over the trained tokens of the whole global batch: every token weighs the same,
            # however the batch is split across micro-steps and processes.
            n_tokens = torch.tensor(float(sum((b["labels"] != -100).sum() for b in batches)), device=device)
            n_global = accelerator.reduce(n_tokens, reduction="sum") if world > 1 else n_tokens
            loss_sum = torch.zeros((), device=device)
            for micro, batch in enumerate(batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                with micro_step(accelerator, model, last=micro == cfg.grad_accum - 1):
                    logits = model(**batch, use_cache=False).logits
                    summed, _ = masked_lm_loss(logits, labels)
                    # DDP averages gradients over processes, hence the factor `world`.
                    accelerator.backward(summed * world / n_global.clamp(min=1))
                loss_sum += summed.detach()
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            flags = torch.stack([loss_sum, torch.tensor(float(stop_signal[0]), device=device)])
            flags = accelerator.reduce(flags, reduction="sum") if world > 1 else flags
            train_loss, signalled = (flags[0] / n_global.clamp(min=1)).item(), flags[1].item() > 0
            if not math.isfinite(train_loss):
                raise LLMTrainError(
                    f"The training loss became {train_loss} at step {step} (lr {lr:.3g}); the run stopped. "
                    f"The last good checkpoint is kept in {run.path}. Lower --lr and start again."
                )
            dt = time.perf_counter() - t0
            train_time += dt
            window["tokens"] += sum(len(item.input_ids) for chunk in chunks for item in chunk) * world  # no padding
            window["time"] += dt
            progress.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                tok_s = window["tokens"] / window["time"]
                run.log_metrics(step, {"train_loss": train_loss, "lr": lr, "tokens_per_s": tok_s}, accelerator)
                progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                window = {"tokens": 0, "time": 0.0}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                val = _evaluate(model, raw_model, tokenizer, eval_examples, [], None, cfg, accelerator)
                run.log_metrics(step, val, accelerator)
            state = {"train_time_s": train_time, "parent_metrics": parent_metrics}
            run.checkpoint_after_step(
                accelerator, step, total_steps, state, cfg, (stop_signal[0] or signal.SIGTERM) if signalled else 0
            )
    except RunInterrupted:
        raise  # a checkpoint was saved: the run stays resumable
    except Exception:  # a user error or a crash: the run is marked failed, not left "running"
        run.update(status="failed")
        raise
    finally:
        progress.close()
        restore_signal_handlers()

    # ---- the end: evaluate, sample, save, register
    final = _evaluate(model, raw_model, tokenizer, eval_examples, eval_prompts, checker, cfg, accelerator, show=True)
    run.log_metrics(step, final, accelerator)
    accelerator.wait_for_everyone()
    save_policy(raw_model, full_state_dict(accelerator, model), tokenizer, run, cfg, accelerator)
    metrics = {
        **final,
        "train_loss": train_loss,
        "steps": step,
        "train_time_s": round(train_time, 2),
        "stop_reason": stop,
    }
    metrics.update({f"parent_{k}": v for k, v in parent_metrics.items()})
    run.update(status="finished", metrics=metrics)
    run.plot(PLOT_CURVES)
    run.remove_checkpoints()
    end_run(accelerator)
    gains = ", ".join(f"{k} {parent_metrics[k]:.4f} -> {final[k]:.4f}" for k in final if k in parent_metrics)
    print_main(accelerator, f"\nFinished {run.name}: {gains}; {train_time:.1f} s training. Saved to {run.path}")
    return run.path


# ---------------------------------------------------------------- helpers


def _check_config(cfg: SftConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise LLMTrainError(f"Unknown schedule '{cfg.schedule}'. Choose one of: {', '.join(SCHEDULES)}.")
    for name in ("batch_size", "grad_accum", "max_length"):
        if getattr(cfg, name) < 1:
            raise LLMTrainError(f"{name} must be at least 1, got {getattr(cfg, name)}.")


def _prompt_of(messages: list[dict]) -> str | None:
    """The user question of a single-turn conversation (what task accuracy asks), else None."""
    users = [m for m in messages if m["role"] == "user"]
    return users[0]["content"] if len(users) == 1 else None


def _evaluate(
    model, raw_model, tokenizer, examples, prompts, checker, cfg: SftConfig, accelerator, show: bool = False
) -> dict[str, float]:
    """Held-out loss on assistant tokens, and task accuracy of greedy answers when a checker applies."""
    metrics = {"val_loss": chat_eval_loss(model, examples, tokenizer.pad_token_id, cfg.batch_size, accelerator)}
    if checker is not None and prompts:
        acc, results = distributed_task_accuracy(
            raw_model, tokenizer, prompts, checker, cfg.max_new_tokens, accelerator
        )
        metrics["task_accuracy"] = acc
        if show and accelerator.is_main_process:
            print("samples (held-out prompts, greedy):")
            for prompt, reply, ok in results[: cfg.num_samples]:
                print(f"  {prompt!r} -> {reply!r} {'correct' if ok else 'wrong'}")
    return metrics


def save_policy(raw_model, state_dict, tokenizer, run: Run, cfg: PolicyConfig, accelerator) -> None:
    """Save a tuned causal LM as a Hugging Face checkpoint that generates until the end of its turn: merged
    weights by default, or the LoRA adapter with --merge_lora false."""
    if not accelerator.is_main_process:
        return
    model = model_to_save(raw_model, cfg)
    if model is not raw_model and cfg.merge_lora:
        state_dict = None  # the merged model's own weights, not the adapter-wrapped state
    base = model.get_base_model() if cfg.lora and not cfg.merge_lora else model
    # The model's own end-of-sequence ids stay; the template's end-of-turn token is added to them.
    base.generation_config.eos_token_id = stop_token_ids(tokenizer, base)
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.config.use_cache = True
    model.save_pretrained(run.path, state_dict=state_dict, safe_serialization=True)
    save_tokenizer(tokenizer, run.path)
