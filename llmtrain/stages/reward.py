"""Reward model: a sequence classifier with one score, trained on preference pairs (Bradley-Terry).

Read top to bottom: accelerator and run folder, the model (a causal LM run turned into a native
`AutoModelForSequenceClassification`; the score is read at the last real token), the pairs, the
loop, the end (pairwise accuracy, keep the best, test once, score distributions, save, register).
Each evaluation measures the validation pairs and, the same way, a fixed sample of training pairs.
A reward model has no parent with a score, so there are no parent figures.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from llmtrain.config import RewardConfig
from llmtrain.data.preferences import collate_pairs, load_preference_pairs, tokenize_pairs
from llmtrain.data.schedule import batch_indices
from llmtrain.data.splits import (
    held_out_counts,
    tokenize_splits,
    tokenize_test,
    train_and_eval_rows,
    trainset_sample,
)
from llmtrain.distributed import micro_step
from llmtrain.evaluate import evaluate_pairs
from llmtrain.loop import Loop, open_run, prepare
from llmtrain.lora import add_lora
from llmtrain.losses import bradley_terry_loss
from llmtrain.models import check_positions, disable_dropout, load_reward_model, save_reward_model
from llmtrain.runtime import to_device
from llmtrain.tokenizer import load_tokenizer

PLOT_CURVES = {
    "Bradley-Terry loss": ["train_loss", "val_loss"],
    "pairwise accuracy": ["train_accuracy", "reward_accuracy"],
    "learning rate": ["lr"],
}


def run(cfg: RewardConfig) -> Path:
    """Train a reward model per `cfg`; returns the finished run directory."""
    accelerator, init, run = open_run(cfg, "reward", parent_stage="sft")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # ---- model: one score per sequence, read at the answer's last token (its end of turn)
    tokenizer = load_tokenizer(init.path, cfg.chat_template, cfg.trust_remote_code)
    model = load_reward_model(init.path, tokenizer, init.spec, cfg.attn_implementation, cfg.trust_remote_code)
    check_positions(model, cfg.max_length, "--max_length", cfg.init, accelerator.print)
    pad_id = model.config.pad_token_id  # padding that no answer ends with (see models.reward_pad_id)
    # The tokenizer saved with the run pads the same way, so the pair reads scores where they were trained.
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    if cfg.lora:
        model = add_lora(model, cfg, "SEQ_CLS", accelerator)  # SEQ_CLS keeps the new score head trainable
    disable_dropout(model)  # as TRL does: the two answers of a pair are scored by one function, not two samples

    # ---- data
    train_pairs, eval_pairs, test_set = train_and_eval_rows(
        cfg, run, load_preference_pairs, "prefs_train.jsonl", "prefs_val.jsonl"
    )
    (train, stats), (held_out, held_stats) = tokenize_splits(
        tokenize_pairs, tokenizer, train_pairs, eval_pairs, cfg.max_length, cfg, accelerator
    )
    trainset = trainset_sample(train, len(held_out))

    def evaluate(pairs) -> tuple[dict[str, float], dict]:
        return evaluate_pairs(model, pairs, pad_id, cfg.batch_size, accelerator)

    global_batch = cfg.batch_size * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / (global_batch * cfg.grad_accum)))

    model, optimizer, raw_model = prepare(accelerator, cfg, model)
    loop = Loop.begin(cfg, accelerator, run, model, optimizer, total_steps)
    loop.start(
        f"reward model from {init.spec} on {len(train):,} pairs ({stats.truncated} truncated, "
        f"{stats.dropped} dropped), {total_steps} steps",
        init=init,
        model={"architecture": type(raw_model).__name__},
        data={
            "train": cfg.data,
            "eval": cfg.eval_data,
            "test": test_set.source if test_set else None,
            **vars(stats),
            "held_out": held_out_counts(held_stats),
        },
    )

    # ---- the loop
    model.train()
    with loop.training():
        for _ in loop.steps():
            sums = torch.zeros(3, device=device)  # loss, correct pairs, pairs
            tokens = 0
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(train), global_batch, cfg.seed, loop.step * cfg.grad_accum + micro)
                batch = collate_pairs([train[i] for i in idx[rank::world]], pad_id)
                tokens += int(batch["attention_mask"].sum())
                batch = to_device({k: v for k, v in batch.items() if k != "labels"}, device)
                with micro_step(accelerator, model, last=micro == cfg.grad_accum - 1):
                    chosen, rejected = model(**batch).logits.squeeze(-1).float().chunk(2)
                    loss = bradley_terry_loss(chosen, rejected, cfg.margin)
                    accelerator.backward(loss / cfg.grad_accum)
                n = float(chosen.numel())
                sums += torch.stack([loss.detach() * n, (chosen > rejected).sum().float(), chosen.new_full((), n)])
            loop.optimizer_step()
            totals = loop.reduce(sums, tokens)
            if totals is not None:
                loss_sum, correct, pairs = totals
                loop.log({"train_loss": loss_sum / pairs, "train_accuracy": correct / pairs})
            if loop.due(cfg.eval_every):
                loop.evaluated(evaluate(held_out)[0], evaluate(trainset)[0])
            loop.checkpoint()

        # ---- the end: pairwise accuracy on held-out pairs (the best evaluation's with --keep_best), the test
        # pairs once, score distributions, save, register
        final, scores = evaluate(held_out)
        loop.evaluated(final, evaluate(trainset)[0])
        if loop.restore_best():
            final, scores = evaluate(held_out)
        test = items = None
        tested = tokenize_test(tokenize_pairs, tokenizer, test_set, cfg.max_length, cfg, accelerator)
        if tested is not None:
            rows, (test_pairs, _) = tested
            test, test_scores = evaluate(test_pairs)
            items = [
                {"item": _pair_key(pair), "score": float(c > r)}
                for pair, c, r in zip(test_pairs, test_scores["chosen"], test_scores["rejected"])
            ]
        save_reward_model(raw_model, loop.full_state_dict(), tokenizer, run.path, cfg, accelerator)
        final |= {
            "chosen_score_mean": float(np.mean(scores["chosen"])),
            "rejected_score_mean": float(np.mean(scores["rejected"])),
        }
        loop.finish(
            final,
            PLOT_CURVES,
            f"reward_accuracy {final['reward_accuracy']:.4f} on {len(held_out)} held-out pairs",
            histograms={"held-out scores": scores},
            test=test,
            test_items=items,
        )
    return run.path


def _pair_key(pair) -> str:
    """A test pair's key in test_items.jsonl: a digest of both sides' tokens (the same pair, the same key)."""
    ids = [*pair.chosen.input_ids, -1, *pair.rejected.input_ids]
    return hashlib.sha1(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:16]
