"""Supervised fine-tuning: a causal LM on prompt/response or chat data, loss on assistant tokens only.

Read top to bottom: accelerator and run folder, the model to tune (and LoRA), the chat data, the
parent's evaluation, the loop, the end (evaluate, keep the best, test once, save, register). Each
evaluation measures the validation rows and, the same way, a fixed sample of training rows. Batches are a pure
function of (seed, step), and the loss of a step is averaged over the trained tokens of the whole
global batch, so resuming, accumulating and adding processes all give the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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
from llmtrain.data.splits import (
    held_out_counts,
    tokenize_splits,
    tokenize_test,
    train_and_eval_rows,
    trainset_sample,
)
from llmtrain.distributed import micro_step
from llmtrain.evaluate import chat_eval_loss, evaluate_answers, item_scores, resolve_checker
from llmtrain.loop import Loop, open_run, prepare
from llmtrain.models import load_policy, parent_model, save_policy
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

    # ---- data: rows -> chat messages -> tokenized examples (-> packed rows); the test rows wait for the end
    train_rows, eval_rows, test_set = train_and_eval_rows(cfg, run, load_chat_rows, "sft_train.jsonl", "sft_val.jsonl")
    (train_examples, train_stats), (eval_examples, eval_stats) = tokenize_splits(
        tokenize_dataset, tokenizer, train_rows, eval_rows, cfg.max_length, cfg, accelerator
    )
    items = pack_examples(train_examples, cfg.max_length) if cfg.packing else train_examples
    collate = collate_packed if cfg.packing else collate_padded
    global_batch = cfg.batch_size * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(items) / (global_batch * cfg.grad_accum)))
    eval_prompts = _prompts(eval_rows)[: cfg.task_eval_rows]
    checker = resolve_checker(cfg.task, [p[0]["content"] for p in eval_prompts])
    trainset = Split(
        trainset_sample(train_examples, len(eval_examples)), _prompts(trainset_sample(train_rows, len(eval_prompts)))
    )
    held_out = Split(eval_examples, eval_prompts)

    def evaluate(split: Split, answers: bool, show: int = 0, policy=None) -> dict[str, float]:
        """Loss on the assistant tokens of a split's examples, and the task accuracy of greedy answers to its
        prompts when a checker applies; of the model being tuned, or of `policy`."""
        policy = policy if policy is not None else raw_model
        metrics = {
            "val_loss": chat_eval_loss(policy, split.examples, tokenizer.pad_token_id, cfg.batch_size, accelerator)
        }
        if answers and checker is not None:
            task, split.replies = evaluate_answers(
                policy, tokenizer, split.prompts, cfg.max_new_tokens, accelerator, checker, show=show
            )
            metrics |= task
        return metrics

    # Evaluations during training answer the prompts only when the best step is chosen by task accuracy.
    answer_often = cfg.keep_best == "task_accuracy"

    model, optimizer, raw_model = prepare(accelerator, cfg, model)
    loop = Loop.begin(cfg, accelerator, run, model, optimizer, total_steps)
    if loop.step == 0:
        loop.state["parent_metrics"] = evaluate(held_out, answers=True)
        loop.state["parent_trainset"] = evaluate(trainset, answers=True)
    parent_metrics = loop.state["parent_metrics"]
    loop.start(
        f"tuning {init.spec} on {len(train_examples):,} examples ({train_stats.truncated} truncated, "
        f"{train_stats.dropped} dropped, {len(items):,} {'packed rows' if cfg.packing else 'examples'}), "
        f"{total_steps} steps; parent " + ", ".join(f"{k} {v:.4f}" for k, v in parent_metrics.items()),
        init=init,
        data={
            "train": cfg.data,
            "eval": cfg.eval_data,
            "test": test_set.source if test_set else None,
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
                loop.evaluated(evaluate(held_out, answer_often), evaluate(trainset, answer_often))
            loop.checkpoint()

        # ---- the end: evaluate (the best evaluation's weights with --keep_best), test once, save, register
        final = evaluate(held_out, answers=True, show=cfg.num_samples)
        loop.evaluated(final, evaluate(trainset, answers=True))
        if loop.restore_best():
            final = evaluate(held_out, answers=True)
        test = parent_test = items = None
        tested = tokenize_test(tokenize_dataset, tokenizer, test_set, cfg.max_length, cfg, accelerator)
        if tested is not None:
            rows, (examples, _) = tested
            test_split = Split(examples, _prompts(rows)[: cfg.task_eval_rows])
            test = evaluate(test_split, answers=True)
            ours = test_split.replies
            with parent_model(init, cfg, accelerator, raw_model) as parent_policy:
                parent_test = evaluate(test_split, answers=True, policy=parent_policy)
            if checker is not None:
                items = item_scores(test_split.prompts, ours, test_split.replies, checker)
        save_policy(raw_model, loop.full_state_dict(), tokenizer, run.path, cfg, accelerator)
        gains = ", ".join(f"{k} {parent_metrics[k]:.4f} -> {final[k]:.4f}" for k in final if k in parent_metrics)
        loop.finish(final, PLOT_CURVES, gains, test=test, parent_test=parent_test, test_items=items)
    return run.path


# ---------------------------------------------------------------- helpers


@dataclass
class Split:
    """What an evaluation measures: tokenized examples (the loss) and single-turn prompts (task accuracy), and the
    replies of its last answering."""

    examples: list
    prompts: list[list[dict]]
    replies: list[str] = field(default_factory=list)


def _prompts(rows: list[list[dict]]) -> list[list[dict]]:
    """The user turn of each single-turn conversation: what task accuracy asks."""
    return [[{"role": "user", "content": p}] for p in map(_prompt_of, rows) if p is not None]


def _prompt_of(messages: list[dict]) -> str | None:
    """The user question of a single-turn conversation (what task accuracy asks), else None."""
    users = [m for m in messages if m["role"] == "user"]
    return users[0]["content"] if len(users) == 1 else None
