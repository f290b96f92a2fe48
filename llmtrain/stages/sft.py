"""Supervised fine-tuning: a causal LM on prompt/response or chat data, loss on assistant tokens only.

Read top to bottom: accelerator and run folder, the model to tune (and LoRA), the chat data, the
parent's task accuracy, the loop, the end (evaluate, sample, save, register). Batches are a pure
function of (seed, step), and the loss of a step is averaged over the trained tokens of the whole
global batch, so resuming, accumulating and adding processes all give the same curve.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llmtrain.config import SftConfig
from llmtrain.data.chat import (
    collate_packed,
    collate_padded,
    load_chat_rows,
    masked_lm_loss,
    pack_examples,
    tokenize_dataset,
)
from llmtrain.data.schedule import batch_indices
from llmtrain.data.splits import held_out_counts, tokenize_splits, train_and_eval_rows
from llmtrain.distributed import micro_step
from llmtrain.evaluate import chat_eval_loss, evaluate_answers, resolve_checker
from llmtrain.loop import Loop, open_run, prepare
from llmtrain.models import load_policy, save_policy
from llmtrain.runtime import to_device
from llmtrain.tokenizer import load_tokenizer

PLOT_CURVES = {
    "loss (assistant tokens)": ["train_loss", "val_loss"],
    "task accuracy": ["task_accuracy"],
    "learning rate": ["lr"],
}


def run(cfg: SftConfig) -> Path:
    """Fine-tune per `cfg`; returns the finished run directory."""
    accelerator, init, run = open_run(cfg, "sft", parent_stage="pretrain")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # ---- tokenizer, model (and LoRA)
    tokenizer = load_tokenizer(init.path, cfg.chat_template, cfg.trust_remote_code)
    model = load_policy(init, tokenizer, cfg, accelerator)

    # ---- data: rows -> chat messages -> tokenized examples (-> packed rows)
    train_rows, eval_rows = train_and_eval_rows(cfg, run, load_chat_rows, "sft_train.jsonl", "sft_val.jsonl")
    (train_examples, train_stats), (eval_examples, eval_stats) = tokenize_splits(
        tokenize_dataset, tokenizer, train_rows, eval_rows, cfg.max_length, cfg, accelerator
    )
    items = pack_examples(train_examples, cfg.max_length) if cfg.packing else train_examples
    collate = collate_packed if cfg.packing else collate_padded
    global_batch = cfg.batch_size * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(items) / (global_batch * cfg.grad_accum)))
    eval_prompts = [[{"role": "user", "content": p}] for p in map(_prompt_of, eval_rows) if p is not None]
    eval_prompts = eval_prompts[: cfg.task_eval_rows]
    checker = resolve_checker(cfg.task, [p[0]["content"] for p in eval_prompts])

    def evaluate(answers: bool, show: int = 0) -> dict[str, float]:
        """Held-out loss on assistant tokens, and the task accuracy of greedy answers when a checker applies."""
        metrics = {
            "val_loss": chat_eval_loss(model, eval_examples, tokenizer.pad_token_id, cfg.batch_size, accelerator)
        }
        if answers:
            metrics |= evaluate_answers(
                raw_model, tokenizer, eval_prompts, cfg.max_new_tokens, accelerator, checker, show=show
            )[0]
        return metrics

    model, optimizer, raw_model = prepare(accelerator, cfg, model)
    loop = Loop.begin(cfg, accelerator, run, model, optimizer, total_steps)
    if loop.step == 0:
        loop.state["parent_metrics"] = evaluate(answers=checker is not None)
    parent_metrics = loop.state["parent_metrics"]
    loop.start(
        f"tuning {init.spec} on {len(train_examples):,} examples ({train_stats.truncated} truncated, "
        f"{train_stats.dropped} dropped, {len(items):,} {'packed rows' if cfg.packing else 'examples'}), "
        f"{total_steps} steps; parent " + ", ".join(f"{k} {v:.4f}" for k, v in parent_metrics.items()),
        init=init,
        data={
            "train": cfg.data,
            "eval": cfg.eval_data,
            "packing": cfg.packing,
            **vars(train_stats),
            "held_out": held_out_counts(eval_stats, len(eval_prompts)),
            "train_items": len(items),
        },
        parent_metrics=parent_metrics,
    )

    # ---- the loop
    model.train()
    with loop.training():
        for _ in loop.steps():
            # This rank's share of each micro-step's global batch (a pure function of seed and step).
            chunks = []
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(items), global_batch, cfg.seed, loop.step * cfg.grad_accum + micro)
                chunks.append([items[i] for i in idx[rank::world]])
            batches = [collate(chunk, tokenizer.pad_token_id) for chunk in chunks]
            # Average over the trained tokens of the whole global batch: every token weighs the same,
            # however the batch is split across micro-steps and processes.
            n_tokens = torch.full((), float(sum((b["labels"] != -100).sum() for b in batches)), device=device)
            n_global = (accelerator.reduce(n_tokens, reduction="sum") if world > 1 else n_tokens).clamp(min=1)
            loss_sum = torch.zeros((), device=device)
            for micro, batch in enumerate(batches):
                batch = to_device(batch, device)
                labels = batch.pop("labels")
                with micro_step(accelerator, model, last=micro == cfg.grad_accum - 1):
                    summed, _ = masked_lm_loss(model(**batch, use_cache=False).logits, labels)
                    accelerator.backward(summed * world / n_global)  # DDP averages gradients over processes
                loss_sum += summed.detach()
            loop.optimizer_step()
            real_tokens = sum(len(item.input_ids) for chunk in chunks for item in chunk)  # no padding
            totals = loop.reduce((loss_sum / n_global)[None], tokens=real_tokens)  # summed over processes
            if totals is not None:
                loop.log({"train_loss": totals[0]})
            if loop.due(cfg.eval_every):
                loop.log_eval(evaluate(answers=False))
            loop.checkpoint()

        # ---- the end: evaluate, sample, save, register
        final = evaluate(answers=checker is not None, show=cfg.num_samples)
        loop.log_eval(final)
        save_policy(raw_model, loop.full_state_dict(), tokenizer, run.path, cfg, accelerator)
        gains = ", ".join(f"{k} {parent_metrics[k]:.4f} -> {final[k]:.4f}" for k in final if k in parent_metrics)
        loop.finish(final, PLOT_CURVES, gains)
    return run.path


# ---------------------------------------------------------------- helpers


def _prompt_of(messages: list[dict]) -> str | None:
    """The user question of a single-turn conversation (what task accuracy asks), else None."""
    users = [m for m in messages if m["role"] == "user"]
    return users[0]["content"] if len(users) == 1 else None
