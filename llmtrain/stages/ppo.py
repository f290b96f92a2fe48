"""PPO: tune a causal LM (the policy) to raise a reward, held near its SFT parent by a per-token KL penalty.

Read top to bottom: accelerator and run folder, the models (policy, frozen reference, critic, reward),
the prompts, the parent's held-out answers, the loop, the end (evaluate, keep the best, the test prompts once,
save, register). Each evaluation answers the validation prompts and, the same way, a fixed sample of training
prompts; the fit verdict watches the reward against task accuracy (reward hacking). Each step:

1. rollouts: this process's share of the step's prompts, answered by sampling from the policy (KV
   cache, left-padded prompts, each row's sample a pure function of seed, step and row), cut after the
   first end-of-turn token;
2. scoring: the log-probs of policy and reference (the logits divided by the sampling temperature),
   the critic's values, and the score, read at the last real token (a reward model) or computed from
   the text (a reward function), minus a penalty when the response never ended;
3. advantages: per-token rewards -kl_coef * (log pi - log ref) with the score added at the last token,
   GAE, whitened with statistics of the whole global batch (or group-relative, GRPO-style);
4. training: `ppo_epochs` passes over `num_mini_batches` minibatches with the clipped policy and value
   losses (`llmtrain.rl`), each averaged over the global minibatch's tokens, and gradient clipping.

Every model stays in eval mode (no dropout), so the log-probs of the rollout and of the first
training pass agree exactly. The details follow "The N+ implementation details of RLHF with PPO"
(Huang et al. 2024) and OpenRLHF.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmtrain.config import PpoConfig
from llmtrain.data.prompts import load_prompts, question_of, tokenize_prompts
from llmtrain.data.schedule import batch_indices
from llmtrain.data.splits import (
    held_out_counts,
    tokenize_splits,
    tokenize_test,
    train_and_eval_rows,
    trainset_sample,
)
from llmtrain.distributed import micro_step, prepare_frozen, root_gathered, sum_across
from llmtrain.errors import LLMTrainError
from llmtrain.evaluate import evaluate_answers, item_scores, resolve_checker
from llmtrain.loop import Loop, open_run, prepare
from llmtrain.lora import add_lora
from llmtrain.models import (
    ScoreHead,
    disable_dropout,
    load_causal_lm,
    load_policy,
    load_reward_model,
    parent_model,
    save_policy,
    token_scores,
)
from llmtrain.optim import param_groups
from llmtrain.rewards import RewardSource, load_reward, reward_model_source
from llmtrain.rl import (
    KLController,
    entropy_of,
    explained_variance,
    gae,
    group_advantages,
    kl_penalty_rewards,
    logprobs_of,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from llmtrain.rollout import Rollout, generate_rollout
from llmtrain.run_dir import Run
from llmtrain.tokenizer import load_tokenizer

PLOT_CURVES = {
    "reward": ["reward_mean", "rlhf_reward"],
    "KL to the reference (per response)": ["kl"],
    "held-out": ["task_accuracy", "val_reward", "val_check_reward"],
    "policy update": ["clip_frac", "approx_kl", "entropy"],
    "critic": ["value_loss", "explained_variance"],
    "response length (tokens)": ["response_length"],
}
SAMPLES = "samples.jsonl"


def run(cfg: PpoConfig) -> Path:
    """Tune per `cfg`; returns the finished run directory."""
    accelerator, init, run = open_run(cfg, "ppo", parent_stage="sft")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    tokenizer = load_tokenizer(init.path, cfg.chat_template, cfg.trust_remote_code)
    reward = load_reward(cfg, tokenizer)
    if reward.path:
        run.pin_parent("reward_model", cfg.reward_model, reward.path)
    # A second reward model that only scores the validation answers: a measure PPO does not optimize.
    check = (
        reward_model_source(cfg.val_reward_model, cfg, tokenizer, "--val_reward_model")
        if cfg.val_reward_model
        else None
    )
    if check is not None:
        run.pin_parent("val_reward_model", cfg.val_reward_model, check.path)
        check.model = prepare_frozen(check.model, accelerator)

    # ---- models: the policy and its critic (one module), the frozen reference and reward model; no dropout
    actor_critic, reference = _build_models(cfg, init, tokenizer, reward, accelerator)
    critic_kind = actor_critic.critic_kind

    # ---- prompts
    train_rows, eval_rows, test_set = train_and_eval_rows(
        cfg, run, load_prompts, "prompts_train.jsonl", "prompts_val.jsonl"
    )
    prompt_budget = cfg.max_length - cfg.max_new_tokens
    (prompt_ids, prompts, stats), (_, eval_kept, eval_stats) = tokenize_splits(
        tokenize_prompts, tokenizer, train_rows, eval_rows, prompt_budget, cfg, accelerator
    )
    eval_prompts = eval_kept[: cfg.task_eval_rows]
    checker = resolve_checker(cfg.task, [question_of(p) for p in eval_prompts])
    global_batch = cfg.batch_size * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(prompt_ids) / global_batch))

    trainset_prompts = trainset_sample(prompts, len(eval_prompts))
    replies: list[str] = []

    def evaluate(show: int = 0, on=eval_prompts, policy=None) -> dict[str, float]:
        """Greedy answers to prompts (the held-out ones): task accuracy and mean reward; of the policy, or of
        `policy`. The replies are kept in `replies`."""
        # The policy is called outside its actor-critic, whose forward alone Accelerate runs in mixed precision.
        with root_gathered(raw), accelerator.autocast():
            policy = policy if policy is not None else raw.policy
            metrics, replies[:] = evaluate_answers(
                policy, tokenizer, on, cfg.max_new_tokens, accelerator, checker, reward, show
            )
            if check is not None and replies:
                metrics["val_check_reward"] = sum(check.score_texts(on, replies)) / len(replies)
        return metrics

    groups = param_groups(actor_critic.policy, cfg.lr, cfg.weight_decay)
    if actor_critic.critic is not None:
        groups += param_groups(actor_critic.critic, cfg.value_lr, cfg.weight_decay)
    actor_critic, optimizer, raw = prepare(accelerator, cfg, actor_critic, groups)
    if accelerator.is_fsdp2:
        # FSDP2 takes the first unit to run forward as its root; generation runs the policy alone first, so
        # run the whole actor-critic once (one token) to make it the root.
        with torch.no_grad():
            one = torch.ones(1, 1, dtype=torch.long, device=device)
            actor_critic(one, one, one - 1)
    loop = Loop.begin(cfg, accelerator, run, actor_critic, optimizer, total_steps)
    loop.sync_every_step = True  # each step reads its rollouts on the host anyway (texts, rewards, the KL)
    loop.metric, loop.kl_bound = "val_reward", cfg.hacking_kl
    loop.guards = ("task_accuracy",) * (checker is not None) + ("val_check_reward",) * (check is not None)
    loop.guard_rows = len(eval_prompts)
    if cfg.keep_best == "auto":  # with a checker, the saved policy is the evaluation with the best task accuracy
        loop.keep_best = "task_accuracy" if checker is not None else None
    if loop.step == 0:
        parent_metrics, parent_trainset = evaluate(), evaluate(on=trainset_prompts)
        loop.state = {"parent_metrics": parent_metrics, "parent_trainset": parent_trainset}
        loop.state |= {"reward_shift": None, "kl_coef": cfg.kl_coef}
    parent = loop.state["parent_metrics"]
    kl_ctl = KLController(loop.state["kl_coef"], cfg.target_kl, cfg.kl_horizon)
    loop.start(
        f"PPO ({cfg.advantage}, critic {critic_kind}) of {init.spec} with reward {reward.spec} on "
        f"{len(prompt_ids):,} prompts ({stats.dropped} too long), {total_steps} steps of "
        f"{global_batch * cfg.num_generations} responses; parent "
        + (", ".join(f"{k} {v:.4f}" for k, v in parent.items()) or "-"),
        init=init,
        parents=[init.label] + ([reward.label] if reward.model is not None else []),
        model={
            "reference": "adapter-disabled base" if cfg.lora else "copy",
            "critic": critic_kind,
            "advantage": cfg.advantage,
            "reward": {"kind": "function" if reward.fn else "model", "spec": reward.spec, "tokens": reward.same_tokens},
        },
        data={
            "train": cfg.data,
            "eval": cfg.eval_data,
            "test": test_set.source if test_set else None,
            "prompts": len(prompt_ids),
            "dropped_too_long": stats.dropped,
            "held_out": held_out_counts(eval_stats, len(eval_prompts)),
        },
        parent_metrics=parent,
    )

    # ---- the loop (every model stays in eval mode: no dropout, so rollout and training log-probs agree)
    reduce = sum_across(accelerator)
    with loop.training():
        for _ in loop.steps():
            t0 = time.perf_counter()
            # 1. rollouts, sampled in the run's precision (see evaluate)
            idx = batch_indices(len(prompt_ids), global_batch, cfg.seed, loop.step)[rank::world]
            with root_gathered(raw), accelerator.autocast():
                rollout = generate_rollout(raw.policy, tokenizer, prompt_ids, prompts, idx, cfg, loop.step, rank, world)
            t_generated = time.perf_counter()

            # 2. scoring
            with torch.no_grad(), accelerator.autocast():
                old_logprobs, ref_logprobs, old_values = score_rollout(raw, reference, rollout, cfg)
                raw_scores = reward.score(rollout, _micro_size(cfg))
            # The first rollout is the starting policy's: the scores are centered on it from then on.
            if loop.state["reward_shift"] is None:
                everyone = torch.ones_like(raw_scores)
                shift = float(masked_mean(raw_scores, everyone, reduce)) if cfg.center_rewards else 0.0
                loop.state["reward_shift"] = shift
            scores = raw_scores - loop.state["reward_shift"] - cfg.missing_eos_penalty * (~rollout.ended).float()
            t_scored = time.perf_counter()

            # 3. advantages
            advantages, returns, kl = _advantages(
                scores, old_logprobs, ref_logprobs, old_values, rollout.mask, kl_ctl.value, cfg, reduce
            )

            # 4. PPO epochs over minibatches
            sums = ppo_update(loop, rollout, old_logprobs, old_values, advantages, returns)
            t_trained = time.perf_counter()

            loop.reduce(tokens=rollout.attention_mask.sum())
            metrics = _step_metrics(rollout, raw_scores, scores, kl, old_values, returns, sums, kl_ctl, reduce)
            kl_ctl.update(metrics["kl"], global_batch * cfg.num_generations)
            loop.state["kl_coef"] = kl_ctl.value
            metrics |= {
                "time_generate_s": t_generated - t0,
                "time_score_s": t_scored - t_generated,
                "time_train_s": t_trained - t_scored,
                "rollout_tokens_per_s": metrics.pop("_tokens") / max(t_generated - t0, 1e-9),
            }
            loop.log(metrics)
            if cfg.sample_every and (loop.step % cfg.sample_every == 0 or loop.step == 1):
                _show_samples(run, loop.step, rollout, raw_scores, cfg, accelerator)
            if loop.due(cfg.eval_every):
                loop.evaluated(evaluate(), evaluate(on=trainset_prompts))
            loop.checkpoint()

        # ---- the end: held-out answers (the best evaluation's with --keep_best), the test prompts once, save,
        # register
        final = evaluate(show=cfg.num_samples)
        loop.evaluated(final, evaluate(on=trainset_prompts))
        if loop.restore_best():
            final = evaluate()
        test = parent_test = items = None
        tested = tokenize_test(tokenize_prompts, tokenizer, test_set, prompt_budget, cfg, accelerator)
        if tested is not None:
            _, (_, test_prompts, _) = tested
            test_prompts = test_prompts[: cfg.task_eval_rows]
            test = evaluate(on=test_prompts)
            ours = list(replies)
            with parent_model(init, cfg, accelerator, raw.policy, reference) as parent_policy:
                parent_test = evaluate(on=test_prompts, policy=parent_policy)
            if checker is not None:
                items = item_scores(test_prompts, ours, replies, checker)
        state_dict = loop.full_state_dict()
        policy_state = {k.removeprefix("policy."): v for k, v in (state_dict or {}).items() if k.startswith("policy.")}
        save_policy(raw.policy, policy_state, tokenizer, run.path, cfg, accelerator)
        final |= {k: loop.last[k] for k in ("reward_mean", "kl", "response_length") if k in loop.last}
        final |= {"reward_shift": loop.state["reward_shift"], "kl_coef": kl_ctl.value}
        gains = ", ".join(f"{k} {parent[k]:.4f} -> {final[k]:.4f}" for k in final if k in parent)
        loop.finish(final, PLOT_CURVES, gains, test=test, parent_test=parent_test, test_items=items, kl=final.get("kl"))
    return run.path


# ---------------------------------------------------------------- models


class ActorCritic(nn.Module):
    """The policy and its critic in one module, so that one DDP wrapper and one checkpoint hold both.

    The critic is a sequence classifier read at every token (`critic_kind` reward or policy), a linear
    value head on the policy's last hidden state (`head`), or nothing (group advantages)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None, critic_kind: str):
        super().__init__()
        self.policy, self.critic, self.critic_kind = policy, critic, critic_kind
        # The decoder-layer classes of both models: FSDP makes each such layer a sharded unit of its own.
        self._no_split_modules = sorted(
            {name for model in (policy, critic) for name in getattr(model, "_no_split_modules", None) or []}
        )

    def tie_weights(self, *args, **kwargs) -> None:
        """Re-tie each model's tied weights (input and output embeddings): Accelerate calls this after FSDP2
        has moved the model between devices, which unties them."""
        for model in (self.policy, self.critic):
            if hasattr(model, "tie_weights"):
                model.tie_weights(*args, **kwargs)

    def forward(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.critic_kind == "head"
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=head,
        )
        if self.critic is None:
            return out.logits, None
        if head:
            return out.logits, self.critic(out.hidden_states[-1]).squeeze(-1).float()
        return out.logits, token_scores(self.critic, input_ids, attention_mask, position_ids)


def _critic_kind(cfg: PpoConfig, reward: RewardSource) -> str | None:
    if cfg.advantage == "group":
        return None
    kind = cfg.value_model
    if kind == "auto":
        kind = "reward" if reward.model is not None and reward.same_tokens else "policy"
    if kind == "reward" and reward.model is None:
        raise LLMTrainError(
            "--value_model reward initialises the critic from the reward model, but the reward comes from "
            f"--reward_fn {cfg.reward_fn}. Use --value_model policy (or head, or auto)."
        )
    if kind == "reward" and not reward.same_tokens:
        raise LLMTrainError(
            f"--value_model reward: the reward model '{reward.spec}' uses another tokenizer (or chat template) than "
            "the policy, so it cannot read the policy's tokens as a critic. Use --value_model policy or head."
        )
    return kind


def _build_models(cfg: PpoConfig, init, tokenizer, reward: RewardSource, accelerator) -> tuple[ActorCritic, Any]:
    """The policy (LoRA optional) and its critic in one ActorCritic, and the frozen reference (None with LoRA: the
    reference is then the policy with its adapter disabled); the reward model is placed too. Dropout off everywhere."""
    policy = load_policy(init, tokenizer, cfg, accelerator, use_cache=True)  # rollouts sample with the KV cache
    reference = None
    if not cfg.lora:
        reference = load_causal_lm(init, cfg.runs_dir, cfg.attn_implementation, cfg.trust_remote_code)
    kind = _critic_kind(cfg, reward)
    critic = None
    if kind == "head":
        critic = ScoreHead(policy.config.hidden_size, 1)  # values in fp32 whatever the autocast
        nn.init.zeros_(critic.weight)
        nn.init.zeros_(critic.bias)
    elif kind is not None:
        path, spec = (reward.path, reward.spec) if kind == "reward" else (init.path, init.spec)
        critic = load_reward_model(path, tokenizer, spec, cfg.attn_implementation, cfg.trust_remote_code)
    if cfg.lora and kind in ("reward", "policy"):
        critic = add_lora(critic, cfg, "SEQ_CLS", accelerator)
    actor_critic = ActorCritic(policy, critic, kind)
    for model in (actor_critic, reference, reward.model):
        if model is not None:
            disable_dropout(model)
    if reward.model is not None:
        reward.model = prepare_frozen(reward.model, accelerator)
    return actor_critic, prepare_frozen(reference, accelerator) if reference is not None else None


def _micro_size(cfg: PpoConfig) -> int:
    return cfg.batch_size * cfg.num_generations // (cfg.num_mini_batches * cfg.grad_accum)


def _response_logits(logits: torch.Tensor, prompt_len: int) -> torch.Tensor:
    # The logits at position t predict token t + 1: those of the response tokens start at the prompt's last.
    return logits[:, prompt_len - 1 : -1]


def _model_inputs(inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    # By name: GPT-2's second positional argument is its cache, not the attention mask.
    return dict(zip(("input_ids", "attention_mask", "position_ids"), inputs))


@torch.no_grad()
def score_rollout(raw: ActorCritic, reference, rollout: Rollout, cfg: PpoConfig):
    """Log-probs of the responses under the policy and the reference, and the critic's values (or None)."""
    policy_lp, ref_lp, values = [], [], []
    micro, p = _micro_size(cfg), rollout.prompt_len
    for s in range(0, len(rollout.texts), micro):
        sl = slice(s, s + micro)
        inputs = (rollout.input_ids[sl], rollout.attention_mask[sl], rollout.position_ids[sl])
        tokens = rollout.responses[sl]
        logits, v = raw(*inputs)
        policy_lp.append(logprobs_of(_response_logits(logits, p), tokens, cfg.temperature))
        if v is not None:
            values.append(_response_logits(v, p))
        if reference is None:  # LoRA: the reference is the base model with the adapter disabled
            with raw.policy.disable_adapter(), root_gathered(raw):
                ref_logits = raw.policy(**_model_inputs(inputs), use_cache=False).logits
        else:
            ref_logits = reference(**_model_inputs(inputs), use_cache=False).logits
        ref_lp.append(logprobs_of(_response_logits(ref_logits, p), tokens, cfg.temperature))
    mask = rollout.mask
    old_values = torch.cat(values) * mask if values else None
    return torch.cat(policy_lp) * mask, torch.cat(ref_lp) * mask, old_values


# ---------------------------------------------------------------- advantages and the update


def _advantages(scores, old_logprobs, ref_logprobs, old_values, mask, kl_coef: float, cfg: PpoConfig, reduce):
    """Per-token rewards (the KL penalty, plus the score at the last token) and their advantages: GAE whitened over
    the global batch, with its returns; or group-relative (GRPO-style, no critic and no returns). Also the KL."""
    rewards, kl = kl_penalty_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef)
    if cfg.advantage == "group":
        sequence_rewards = scores - kl_coef * kl.sum(-1)
        return group_advantages(sequence_rewards, cfg.num_generations)[:, None] * mask, None, kl
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=reduce)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    return masked_whiten(advantages, mask, all_reduce=reduce), returns, kl


def ppo_update(loop: Loop, rollout: Rollout, old_logprobs, old_values, advantages, returns) -> torch.Tensor:
    """`ppo_epochs` passes of clipped updates over minibatches; returns this process's summed statistics."""
    cfg, accelerator, actor_critic, step = loop.cfg, loop.accelerator, loop.model, loop.step
    world, device = accelerator.num_processes, accelerator.device
    n = len(rollout.texts)
    size, micro, p = n // cfg.num_mini_batches, _micro_size(cfg), rollout.prompt_len
    mask = rollout.mask
    # policy loss, value loss, clipped tokens, value-clipped tokens, approx KL, entropy, tokens (all token sums)
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    # Gradient checkpointing acts in training mode only; with dropout off (`disable_dropout`) the modes compute alike.
    actor_critic.train(cfg.gradient_checkpointing)
    for epoch in range(cfg.ppo_epochs):
        order = np.random.default_rng([cfg.seed, step, epoch]).permutation(n)
        for mb in range(cfg.num_mini_batches):
            mb_idx = order[mb * size : (mb + 1) * size]
            # Every token of the global minibatch weighs the same, however it is split across micro-steps and
            # processes; DDP averages gradients over processes, hence the factor `world` below.
            n_tokens = mask[mb_idx].sum()
            n_global = (accelerator.reduce(n_tokens.clone(), reduction="sum") if world > 1 else n_tokens).clamp(min=1)
            for m in range(0, size, micro):
                i = torch.as_tensor(mb_idx[m : m + micro], device=device)
                last = m + micro >= size
                with micro_step(accelerator, actor_critic, last):
                    logits, values = actor_critic(
                        rollout.input_ids[i], rollout.attention_mask[i], rollout.position_ids[i]
                    )
                    logits = _response_logits(logits, p)
                    logprobs = logprobs_of(logits, rollout.responses[i], cfg.temperature)
                    pl = policy_loss(logprobs, old_logprobs[i], advantages[i], mask[i], cfg.clip_range, n_global)
                    loss, vl, vclip = pl.loss, torch.zeros((), device=device), torch.zeros((), device=device)
                    if values is not None:
                        values = _response_logits(values, p)
                        vl, vclip = value_loss(
                            values, old_values[i], returns[i], mask[i], cfg.clip_range_value, n_global
                        )
                        loss = loss + cfg.vf_coef * vl
                    accelerator.backward(loss * world)
                with torch.no_grad():
                    k = mask[i].sum()
                    entropy = (entropy_of(logits, cfg.temperature) * mask[i]).sum()
                    sums += torch.stack(
                        [
                            pl.loss.detach() * n_global,
                            vl.detach() * n_global,
                            pl.clip_fraction * k,
                            vclip * k,
                            pl.approx_kl * k,
                            entropy,
                            k,
                        ]
                    ).double()
            raw = accelerator.unwrap_model(actor_critic)
            loop.optimizer_step(*(m.parameters() for m in (raw.policy, raw.critic) if m is not None))
    actor_critic.eval()
    return sums


def _step_metrics(rollout, raw_scores, scores, kl, old_values, returns, sums, kl_ctl, reduce) -> dict[str, float]:
    """The step's logged numbers, over the whole global batch."""
    ones = torch.ones_like(raw_scores)
    lengths = rollout.mask.sum(-1)
    kl_sum = kl.sum(-1)
    per_response = reduce(
        torch.stack(
            [
                raw_scores.sum(),
                (raw_scores**2).sum(),
                (scores - kl_ctl.value * kl_sum).sum(),
                kl_sum.sum(),
                lengths.sum(),
                rollout.ended.float().sum(),
                ones.sum(),
            ]
        ).double()
    ).tolist()
    s, s2, rlhf, kl_total, length, ended, count = per_response
    mean = s / count
    totals = reduce(sums).tolist()
    loss_p, loss_v, clipped, vclipped, approx, entropy, tokens = totals
    # The loss, clip and entropy sums run over every token of every PPO pass, and so do their averages.
    metrics = {
        "reward_mean": mean,
        "kl": kl_total / count,
        "reward_std": math.sqrt(max(s2 / count - mean * mean, 0.0) * count / max(count - 1, 1)),
        "rlhf_reward": rlhf / count,
        "kl_coef": kl_ctl.value,
        "entropy": entropy / max(tokens, 1),
        "clip_frac": clipped / max(tokens, 1),
        "approx_kl": approx / max(tokens, 1),
        "policy_loss": loss_p / tokens if tokens else float("nan"),
        "response_length": length / count,
        "ended_frac": ended / count,
        "_tokens": length,
    }
    if returns is not None:  # there is a critic
        metrics["value_loss"] = loss_v / tokens if tokens else float("nan")
        metrics["value_clip_frac"] = vclipped / max(tokens, 1)
        metrics["explained_variance"] = explained_variance(old_values, returns, rollout.mask, reduce)
    return metrics


# ---------------------------------------------------------------- samples


def _show_samples(run: Run, step: int, rollout: Rollout, scores: torch.Tensor, cfg, accelerator) -> None:
    """Print a few of this step's rollouts and append them to samples.jsonl in the run folder."""
    if not accelerator.is_main_process or cfg.num_samples <= 0:
        return
    rows = [
        {"step": step, "prompt": question_of(c), "response": t, "reward": float(s), "ended": bool(e)}
        for c, t, s, e in zip(rollout.conversations, rollout.texts, scores.tolist(), rollout.ended.tolist())
    ][: cfg.num_samples]
    with open(run.path / SAMPLES, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = "\n".join(f"  {r['prompt']!r} -> {r['response']!r} (reward {r['reward']:.3f})" for r in rows)
    print(f"\nstep {step} samples:\n{text}", flush=True)
