"""DPO: tune a causal LM on preference pairs against a frozen reference, its SFT parent.

Read top to bottom: accelerator and run folder, the policy (and LoRA), the pairs, the reference
(a frozen copy, the adapter-disabled base with --lora, or log-probs computed once with
--precompute_ref), the parent's scores, the loop, the end (held-out preference metrics, task
accuracy, win rate against the parent judged by a reward model, keep the best, the test set once,
save, register). Each evaluation measures the validation pairs and, the same way, a fixed sample
of training pairs.

The loop is the project's own rather than TRL's DPOTrainer so that DPO shares the run folder,
resume, signal and multi-process rules of every other stage; the loss is `losses.dpo_loss`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from llmtrain.config import DpoConfig
from llmtrain.data.preferences import collate_pairs, load_preference_pairs, sequence_logprobs, tokenize_pairs
from llmtrain.data.schedule import batch_indices
from llmtrain.data.splits import (
    held_out_counts,
    tokenize_splits,
    tokenize_test,
    train_and_eval_rows,
    trainset_sample,
)
from llmtrain.distributed import micro_step, prepare_frozen, process_share
from llmtrain.evaluate import evaluate_answers, item_scores, resolve_checker, win_rate
from llmtrain.loop import Loop, open_run, prepare
from llmtrain.losses import dpo_loss
from llmtrain.models import disable_dropout, load_causal_lm, load_policy, parent_model, save_policy
from llmtrain.registry import resolve_judge
from llmtrain.runtime import to_device
from llmtrain.tokenizer import load_tokenizer

PLOT_CURVES = {
    "DPO loss": ["train_loss", "val_loss"],
    "implicit rewards": ["chosen_reward", "rejected_reward", "margin"],
    "preference accuracy": ["accuracy", "val_accuracy"],
    "task accuracy": ["task_accuracy"],
}


def run(cfg: DpoConfig) -> Path:
    """Tune per `cfg`; returns the finished run directory."""
    accelerator, init, run = open_run(cfg, "dpo", parent_stage="sft")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    judge = resolve_judge(cfg.judge, cfg.runs_dir)
    if judge is not None:
        run.pin_parent("judge", cfg.judge, judge.path)

    # ---- the policy (and LoRA)
    tokenizer = load_tokenizer(init.path, cfg.chat_template, cfg.trust_remote_code)
    model = load_policy(init, tokenizer, cfg, accelerator)
    disable_dropout(model)  # as TRL does: policy and reference score alike, so the first loss is exactly log 2

    # ---- the pairs
    train_pairs, eval_pairs, test_set = train_and_eval_rows(
        cfg, run, load_preference_pairs, "prefs_train.jsonl", "prefs_val.jsonl"
    )
    (train, stats), (held_out, held_stats) = tokenize_splits(
        tokenize_pairs, tokenizer, train_pairs, eval_pairs, cfg.max_length, cfg, accelerator
    )
    trainset = trainset_sample(train, len(held_out))
    global_batch = cfg.batch_size * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / (global_batch * cfg.grad_accum)))
    eval_prompts = [p.prompt for p in eval_pairs if len(p.prompt) == 1][: cfg.task_eval_rows]
    checker = resolve_checker(cfg.task, [p[0]["content"] for p in eval_prompts])

    model, optimizer, raw_model = prepare(accelerator, cfg, model)
    loop = Loop.begin(cfg, accelerator, run, model, optimizer, total_steps)

    # ---- the reference. Before the first step the policy IS the reference, so scores computed then need
    # no second model; a frozen copy is loaded only when the loop needs one (or to re-score on resume).
    ref_model = None
    if not cfg.lora and (not cfg.precompute_ref or loop.step > 0):
        ref_model = prepare_frozen(
            load_causal_lm(init, cfg.runs_dir, cfg.attn_implementation, cfg.trust_remote_code), accelerator
        )

    def reference(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            if cfg.lora:
                with raw_model.disable_adapter():
                    return _logprobs(raw_model, batch)
            return _logprobs(ref_model if ref_model is not None else raw_model, batch)

    pad_id = tokenizer.pad_token_id
    t_ref = time.perf_counter()
    eval_ref = score_pairs(reference, held_out, pad_id, cfg.batch_size, accelerator)
    trainset_ref = score_pairs(reference, trainset, pad_id, cfg.batch_size, accelerator)
    train_ref = score_pairs(reference, train, pad_id, cfg.batch_size, accelerator) if cfg.precompute_ref else None
    reference_pass_s = time.perf_counter() - t_ref
    if cfg.precompute_ref and ref_model is not None:
        ref_model = None  # only needed to re-score after a resume

    def answers(prompts=eval_prompts, show: int = 0, policy=None) -> tuple[dict[str, float], list[str]]:
        """Greedy replies to prompts (the held-out ones) and their task accuracy; of the policy, or of `policy`."""
        policy = policy if policy is not None else raw_model
        return evaluate_answers(policy, tokenizer, prompts, cfg.max_new_tokens, accelerator, checker, show=show)

    def preferences(pairs, ref: torch.Tensor) -> dict[str, float]:
        return _preference_metrics(raw_model, pairs, ref, cfg, pad_id, accelerator)

    if loop.step == 0:  # the parent's answers: its task accuracy, and the replies the win rate compares against
        loop.state["parent_metrics"], loop.state["parent_replies"] = answers()
        # Before the first step the policy is its reference: its implicit-reward margin is 0, and a judge finds it
        # as good as itself. These are the curves' first points, from which reward hacking is judged.
        loop.state["parent_metrics"] |= {"val_margin": 0.0} | ({"win_rate": 0.5} if judge and eval_prompts else {})
    # DPO raises its implicit reward (the margin); task accuracy and a judge's win rate are not optimized.
    loop.reward, loop.guard_rows = "val_margin", len(eval_prompts)
    loop.guards = ("task_accuracy",) * (checker is not None) + ("win_rate",) * (judge is not None)
    parent = loop.state["parent_metrics"]
    loop.start(
        f"DPO ({cfg.loss_type}, beta {cfg.beta}) of {init.spec} on {len(train):,} pairs ({stats.truncated} "
        f"truncated, {stats.dropped} dropped), {total_steps} steps"
        + (f"; parent task_accuracy {parent['task_accuracy']:.4f}" if "task_accuracy" in parent else ""),
        init=init,
        model={
            "reference": "adapter-disabled base" if cfg.lora else "precomputed" if cfg.precompute_ref else "copy",
            "judge": judge.spec if judge else None,
        },
        data={
            "train": cfg.data,
            "eval": cfg.eval_data,
            "test": test_set.source if test_set else None,
            **vars(stats),
            "held_out": held_out_counts(held_stats, len(eval_prompts)),
        },
        reference_pass_s=round(reference_pass_s, 2),
        parent_metrics=parent,
    )

    # ---- the loop
    model.train()
    with loop.training():
        for _ in loop.steps():
            sums = torch.zeros(6, device=device)  # loss, chosen reward, rejected reward, correct, nll, pairs
            tokens = 0
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(train), global_batch, cfg.seed, loop.step * cfg.grad_accum + micro)[rank::world]
                batch = collate_pairs([train[i] for i in idx], pad_id)
                tokens += int(batch["attention_mask"].sum())
                batch = to_device(batch, device)
                ref = to_device(train_ref[idx], device).T.flatten() if train_ref is not None else reference(batch)
                with micro_step(accelerator, model, last=micro == cfg.grad_accum - 1):
                    policy, n_tokens = _logprobs(model, batch, with_counts=True)
                    loss, stats = _loss(policy, ref, n_tokens, cfg)
                    accelerator.backward(loss / cfg.grad_accum)
                sums += stats
            loop.optimizer_step()
            totals = loop.reduce(sums, tokens)
            if totals is not None:
                *totals, pairs = totals
                means = dict(zip(("train_loss", "chosen_reward", "rejected_reward", "accuracy", "nll"), totals))
                means = {k: v / pairs for k, v in means.items()}
                margin = means["chosen_reward"] - means["rejected_reward"]
                loop.log({"train_loss": means.pop("train_loss"), "margin": margin} | means)
            if loop.due(cfg.eval_every):
                loop.evaluated(preferences(held_out, eval_ref), preferences(trainset, trainset_ref))
            loop.checkpoint()

        # ---- the end: held-out preference metrics, task accuracy, win rate (the best evaluation's with
        # --keep_best), the test set once, save, register. Evaluation runs on the unwrapped model: each rank scores
        # its own share, with no DDP hooks in between.
        def evaluate(show: int = 0) -> dict[str, float]:
            metrics = preferences(held_out, eval_ref)
            task, replies = answers(show=show)
            if judge is not None and eval_prompts:
                metrics["win_rate"] = win_rate(
                    judge, eval_prompts, replies, loop.state["parent_replies"], accelerator, cfg.trust_remote_code
                )
            return metrics | task

        final = evaluate(show=cfg.num_samples)
        loop.evaluated(final, preferences(trainset, trainset_ref))
        if loop.restore_best():
            final = evaluate()
        test = parent_test = items = None
        tested = tokenize_test(tokenize_pairs, tokenizer, test_set, cfg.max_length, cfg, accelerator)
        if tested is not None:
            rows, (test_pairs, _) = tested
            test_prompts = [p.prompt for p in rows if len(p.prompt) == 1][: cfg.task_eval_rows]
            with parent_model(init, cfg, accelerator, raw_model, ref_model) as parent_policy:
                test_ref = score_pairs(
                    lambda b: _logprobs(parent_policy, b), test_pairs, pad_id, cfg.batch_size, accelerator
                )
                parent_test, parent_replies = answers(test_prompts, policy=parent_policy)
            test = preferences(test_pairs, test_ref)
            task, replies = answers(test_prompts)
            test |= task
            if judge is not None and test_prompts:
                test["win_rate"] = win_rate(
                    judge, test_prompts, replies, parent_replies, accelerator, cfg.trust_remote_code
                )
            if checker is not None:
                items = item_scores(test_prompts, replies, parent_replies, checker)
        save_policy(raw_model, loop.full_state_dict(), tokenizer, run.path, cfg, accelerator)
        summary = [f"held-out preference accuracy {final['val_accuracy']:.3f}"]
        if "task_accuracy" in final:
            summary.append(f"task_accuracy {parent['task_accuracy']:.4f} -> {final['task_accuracy']:.4f}")
        if "win_rate" in final:
            summary.append(f"win rate vs parent {final['win_rate']:.3f}")
        loop.finish(final, PLOT_CURVES, ", ".join(summary), test=test, parent_test=parent_test, test_items=items)
    return run.path


# ---------------------------------------------------------------- helpers


def _logprobs(model, batch: dict, with_counts: bool = False):
    """Summed answer log-probs of each row of a [2B, L] pair batch (chosen rows first), and answer lengths."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = sequence_logprobs(logits, labels)
    return (logps, (labels[:, 1:] != -100).sum(-1)) if with_counts else logps


def _loss(policy: torch.Tensor, ref: torch.Tensor, n_tokens: torch.Tensor, cfg: DpoConfig):
    """The loss of a [2B] batch (chosen first): DPO's plus `nll_weight` times the per-token NLL of the chosen
    answers (RPO's term); and its summed statistics: loss, chosen and rejected rewards, correct pairs, NLL, pairs."""
    b = policy.shape[0] // 2
    out = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], cfg.beta, cfg.loss_type, cfg.label_smoothing)
    nll = -(policy[:b] / n_tokens[:b].clamp(min=1)).mean()
    with torch.no_grad():
        correct = (out.chosen_rewards > out.rejected_rewards).sum().float()
        pairs = policy.new_full((), b)  # filled on the device: a copy from the host would wait for the GPU
        stats = torch.stack(
            [out.loss * b, out.chosen_rewards.sum(), out.rejected_rewards.sum(), correct, nll * b, pairs]
        )
    return out.loss + cfg.nll_weight * nll, stats


@torch.no_grad()
def score_pairs(logprobs_of, pairs, pad_id: int, batch_size: int, accelerator) -> torch.Tensor:
    """[N, 2] summed answer log-probs (chosen, rejected) of every pair, split across processes and gathered."""
    from accelerate.utils import gather_object

    mine, own = process_share(len(pairs), accelerator)
    rows: list[tuple[int, float, float]] = []
    for i in range(0, len(mine), batch_size):
        idx = mine[i : i + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate_pairs([pairs[j] for j in idx], pad_id).items()}
        chosen, rejected = logprobs_of(batch).float().cpu().chunk(2)
        rows += list(zip(idx, chosen.tolist(), rejected.tolist()))
    rows = rows[:own]
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    table = torch.zeros(len(pairs), 2)
    for j, c, r in rows:
        table[j] = torch.tensor([c, r])
    return table


@torch.no_grad()
def _preference_metrics(model, pairs, ref: torch.Tensor, cfg: DpoConfig, pad_id: int, accelerator) -> dict:
    """Held-out DPO loss, implicit-reward accuracy and margin against the reference."""
    was_training = model.training
    model.eval()
    policy = score_pairs(lambda b: _logprobs(model, b), pairs, pad_id, cfg.batch_size, accelerator)
    if was_training:
        model.train()
    out = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], cfg.beta, cfg.loss_type, cfg.label_smoothing)
    return {"val_loss": out.loss.item(), "val_accuracy": out.accuracy.item(), "val_margin": out.margin.item()}
