"""PPO: tune a causal LM (the policy) to raise a reward, held near its SFT parent by a per-token KL penalty.

Read top to bottom: accelerator and run folder, the models (policy, frozen reference, critic, reward),
the prompts, the parent's held-out answers, the loop, the end (evaluate, save, register). Each step:

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

import importlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmtrain.config import PpoConfig, config_to_dict
from llmtrain.data.prompts import load_prompts, question_of, tokenize_prompts
from llmtrain.data.schedule import batch_indices
from llmtrain.data.splits import train_and_eval_rows
from llmtrain.distributed import full_state_dict, micro_step, prepare_frozen, process_share, root_gathered
from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.evaluate import resolve_checker
from llmtrain.flops import parameter_count
from llmtrain.generate import chat_replies, sample_tokens, stop_token_ids
from llmtrain.optim import SCHEDULES, build_optimizer, lr_at, param_groups
from llmtrain.registry import latest_run, load_causal_lm, parent_manifest, resolve_init, resolve_model
from llmtrain.rl import (
    KLController,
    entropy_of,
    explained_variance,
    gae,
    group_advantages,
    kl_penalty_rewards,
    last_token_index,
    logprobs_of,
    masked_mean,
    masked_whiten,
    policy_loss,
    truncate_after_stop,
    value_loss,
)
from llmtrain.run_dir import Run
from llmtrain.runtime import (
    end_run,
    install_signal_handlers,
    make_accelerator,
    print_main,
    progress_bar,
    restore_signal_handlers,
)
from llmtrain.stages.sft import save_policy
from llmtrain.tokenizer import load_tokenizer

PLOT_CURVES = {
    "reward": ["reward_mean", "rlhf_reward"],
    "KL to the reference (per response)": ["kl"],
    "held-out": ["task_accuracy", "val_reward"],
    "policy update": ["clip_frac", "approx_kl", "entropy"],
    "critic": ["value_loss", "explained_variance"],
    "response length (tokens)": ["response_length"],
}
VALUE_MODELS = ("auto", "reward", "policy", "head")
ADVANTAGES = ("gae", "group")
SAMPLES = "samples.jsonl"


def run(cfg: PpoConfig) -> Path:
    """Tune per `cfg`; returns the finished run directory."""
    _check_config(cfg)
    accelerator = make_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    init = resolve_init(cfg.init, cfg.runs_dir, "sft")
    tokenizer = load_tokenizer(init.path, cfg.chat_template)
    reward = load_reward(cfg, tokenizer)
    critic_kind = _critic_kind(cfg, reward)
    run = Run.open(cfg, "ppo", parent_manifest(init).get("preset") or Path(init.spec).name, accelerator)

    # ---- models: policy (LoRA optional), frozen reference, critic, reward; dropout off everywhere
    policy = load_causal_lm(init, cfg.runs_dir, attn_implementation=cfg.attn_implementation)
    if len(tokenizer) > policy.get_input_embeddings().num_embeddings:
        raise LLMTrainError(f"The tokenizer of '{cfg.init}' has more tokens than the model's embedding.")
    reference = None
    if not cfg.lora:  # with LoRA the reference is the same weights with the adapter disabled
        reference = load_causal_lm(init, cfg.runs_dir, attn_implementation=cfg.attn_implementation)
    critic = _load_critic(critic_kind, init, reward, tokenizer, policy, cfg.attn_implementation)
    if cfg.lora:
        from llmtrain.lora import add_lora

        policy = add_lora(policy, cfg, "CAUSAL_LM", accelerator)
        if critic_kind in ("reward", "policy"):
            critic = add_lora(critic, cfg, "SEQ_CLS", accelerator)
    actor_critic = ActorCritic(policy, critic, critic_kind)
    for model in (actor_critic, reference, reward.model):
        if model is not None:
            disable_dropout(model)
    reference = prepare_frozen(reference, accelerator) if reference is not None else None
    if reward.model is not None:
        reward.model = prepare_frozen(reward.model, accelerator)

    # ---- prompts
    train_rows, eval_rows = train_and_eval_rows(cfg, load_prompts, "prompts_train.jsonl", "prompts_val.jsonl")
    prompt_budget = cfg.max_length - cfg.max_new_tokens
    prep = dict(num_proc=cfg.num_proc, cache_dir=cfg.cache_dir)
    with accelerator.main_process_first():  # the main process tokenizes and caches; the others then load the cache
        prompt_ids, prompts, stats = tokenize_prompts(tokenizer, train_rows, prompt_budget, cfg.data, **prep)
        eval_kept = tokenize_prompts(tokenizer, eval_rows, prompt_budget, f"{cfg.eval_data} (held out)", **prep)[1]
    if not prompt_ids:
        raise LLMTrainError(
            f"No prompt of {cfg.data} fits in max_length - max_new_tokens = {prompt_budget} tokens; raise --max_length."
        )
    eval_prompts = eval_kept[: cfg.task_eval_rows]
    checker = resolve_checker(cfg.task, [question_of(p) for p in eval_prompts])
    global_batch = cfg.batch_size * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(prompt_ids) / global_batch))

    groups = param_groups(actor_critic.policy, cfg.lr, cfg.weight_decay)
    if actor_critic.critic is not None:
        groups += param_groups(actor_critic.critic, cfg.value_lr, cfg.weight_decay)
    optimizer = build_optimizer(groups, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if cfg.compile:
        actor_critic.compile()
    actor_critic, optimizer = accelerator.prepare(actor_critic, optimizer)
    raw = accelerator.unwrap_model(actor_critic)
    if accelerator.is_fsdp2:
        # FSDP2 takes the first unit to run forward as its root; generation runs the policy alone first, so
        # run the whole actor-critic once (one token) to make it the root.
        with torch.no_grad():
            one = torch.ones(1, 1, dtype=torch.long, device=device)
            actor_critic(one, one, one - 1)

    step, train_time, parent, shift, kl_coef = 0, 0.0, {}, None, cfg.kl_coef
    if run.resume_from is not None:
        state = run.load_checkpoint(accelerator)
        step, train_time, parent = state["step"], state["train_time_s"], state["parent_metrics"]
        shift, kl_coef = state["reward_shift"], state["kl_coef"]
        run.truncate_metrics(step)
        print_main(accelerator, f"Resuming {run.name} from step {step}.")
    else:
        with root_gathered(raw):
            parent = _evaluate(raw.policy, tokenizer, eval_prompts, checker, reward, cfg, accelerator)
    kl_ctl = KLController(kl_coef, cfg.target_kl, cfg.kl_horizon)
    run.start(
        config_to_dict(cfg),
        parent=init.run_name or init.path,
        parents=[init.run_name or init.path] + ([reward.run_name or reward.path] if reward.model is not None else []),
        preset=parent_manifest(init).get("preset"),
        model={
            "source": init.kind,
            "spec": init.spec,
            "lora": cfg.lora,
            "trainable_parameters": parameter_count(raw, trainable_only=True),
            "reference": "adapter-disabled base" if cfg.lora else "copy",
            "critic": critic_kind,
            "advantage": cfg.advantage,
            "reward": {"kind": "function" if reward.fn else "model", "spec": reward.spec, "tokens": reward.same_tokens},
        },
        data={"train": cfg.data, "eval": cfg.eval_data, "prompts": len(prompt_ids), "dropped_too_long": stats.dropped},
        parent_metrics=parent,
        world_size=world,
    )
    if cfg.tracker:
        accelerator.init_trackers(run.name, config=config_to_dict(cfg))
    print_main(
        accelerator,
        f"run {run.name}: PPO ({cfg.advantage}, critic {critic_kind}) of {init.spec} with reward {reward.spec} on "
        f"{len(prompt_ids):,} prompts ({stats.dropped} too long), {total_steps} steps of "
        f"{global_batch * cfg.num_generations} responses; parent "
        + (", ".join(f"{k} {v:.4f}" for k, v in parent.items()) or "-"),
    )

    # ---- the loop
    stop_signal = install_signal_handlers()
    progress = progress_bar(accelerator, total_steps, step, "ppo")
    stop, metrics = "max_steps", {}
    reduce = _sum_across(accelerator)
    try:
        while step < total_steps:
            if cfg.max_time_s and train_time >= cfg.max_time_s:
                stop = "max_time_s"
                break
            t0 = time.perf_counter()
            factor = lr_at(step, total_steps, 1.0, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor

            # 1. rollouts
            idx = batch_indices(len(prompt_ids), global_batch, cfg.seed, step)[rank::world]
            with root_gathered(raw):
                rollout = generate_rollout(raw.policy, tokenizer, prompt_ids, prompts, idx, cfg, step, rank, world)
            t_generated = time.perf_counter()

            # 2. scoring
            with torch.no_grad(), accelerator.autocast():
                old_logprobs, ref_logprobs, old_values = score_rollout(raw, reference, rollout, cfg)
                raw_scores = reward.score(rollout, _micro_size(cfg))
            if shift is None:  # the first rollout is the starting policy's: center the scores on it
                everyone = torch.ones_like(raw_scores)
                shift = float(masked_mean(raw_scores, everyone, reduce)) if cfg.center_rewards else 0.0
            scores = raw_scores - shift - cfg.missing_eos_penalty * (~rollout.ended).float()
            t_scored = time.perf_counter()

            # 3. advantages
            mask = rollout.mask
            rewards, kl = kl_penalty_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value)
            if cfg.advantage == "group":
                sequence_rewards = scores - kl_ctl.value * kl.sum(-1)
                advantages = group_advantages(sequence_rewards, cfg.num_generations)[:, None] * mask
                returns = None
            else:
                if cfg.whiten_rewards:
                    rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=reduce)
                advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                advantages = masked_whiten(advantages, mask, all_reduce=reduce)

            # 4. PPO epochs over minibatches
            sums = ppo_update(
                actor_critic, optimizer, rollout, old_logprobs, old_values, advantages, returns, cfg, step, accelerator
            )
            step += 1
            t_trained = time.perf_counter()

            flags = torch.tensor([float(stop_signal[0])], device=device)
            signalled = (reduce(flags) if world > 1 else flags).item() > 0
            metrics = _step_metrics(rollout, raw_scores, scores, kl, old_values, returns, sums, kl_ctl, reduce)
            if not all(math.isfinite(metrics.get(k, 0.0)) for k in ("policy_loss", "value_loss", "reward_mean")):
                raise LLMTrainError(
                    f"The PPO losses became {metrics['policy_loss']} (policy) / {metrics.get('value_loss')} (value) at "
                    f"step {step}; the run stopped. The last good checkpoint is kept in {run.path}. Lower --lr and "
                    "--value_lr, or check the reward for NaN or huge values."
                )
            kl_ctl.update(metrics["kl"], global_batch * cfg.num_generations)
            dt = t_trained - t0
            train_time += dt
            metrics |= {
                "lr": cfg.lr * factor,
                "time_generate_s": t_generated - t0,
                "time_score_s": t_scored - t_generated,
                "time_train_s": t_trained - t_scored,
                "rollout_tokens_per_s": metrics.pop("_tokens") / max(t_generated - t0, 1e-9),
            }
            progress.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                run.log_metrics(step, metrics, accelerator)
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}", refresh=False)
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
                _show_samples(run, step, rollout, raw_scores, cfg, accelerator)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                with root_gathered(raw):
                    val = _evaluate(raw.policy, tokenizer, eval_prompts, checker, reward, cfg, accelerator)
                run.log_metrics(step, val)
            state = {"train_time_s": train_time, "parent_metrics": parent, "reward_shift": shift}
            state["kl_coef"] = kl_ctl.value
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

    # ---- the end: held-out answers, save, register
    with root_gathered(raw):
        final = _evaluate(raw.policy, tokenizer, eval_prompts, checker, reward, cfg, accelerator, show=True)
    run.log_metrics(step, final, accelerator)
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, actor_critic)
    policy_state = {k.removeprefix("policy."): v for k, v in (state_dict or {}).items() if k.startswith("policy.")}
    save_policy(raw.policy, policy_state, tokenizer, run, cfg, accelerator)
    last = {k: metrics[k] for k in ("reward_mean", "kl", "response_length") if k in metrics}
    summary = {**final, **last, "reward_shift": shift, "kl_coef": kl_ctl.value, "steps": step}
    summary |= {"train_time_s": round(train_time, 2), "stop_reason": stop}
    summary |= {f"parent_{k}": v for k, v in parent.items()}
    run.update(status="finished", metrics=summary)
    run.plot(PLOT_CURVES)
    run.remove_checkpoints()
    end_run(accelerator)
    gains = ", ".join(f"{k} {parent[k]:.4f} -> {final[k]:.4f}" for k in final if k in parent)
    print_main(accelerator, f"\nFinished {run.name}: {gains}; {train_time:.1f} s training. Saved to {run.path}")
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


def token_scores(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """A sequence classifier's score at every position, [B, T] (its usual output is the one at the last token)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model
    backbone = getattr(base, base.base_model_prefix)
    head = getattr(base, "score", None) or getattr(base, "classifier", None)
    if head is None:
        raise LLMTrainError(f"The sequence classifier {type(base).__name__} has no 'score' head to read values from.")
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return head(hidden).squeeze(-1).float()


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in every layer, and eval mode: sampling, scoring and training see the same function."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.eval()


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


def _load_critic(
    kind: str | None, init, reward: RewardSource, tokenizer, policy, attn_implementation: str
) -> nn.Module | None:
    from llmtrain.stages.reward import load_reward_model

    if kind is None:
        return None
    if kind == "head":
        head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head
    path, spec = (reward.path, reward.spec) if kind == "reward" else (init.path, init.spec)
    return load_reward_model(path, tokenizer, spec, attn_implementation)


# ---------------------------------------------------------------- rewards


@dataclass
class RewardSource:
    """Where scores come from: a reward model (read at the last real token) or a Python function of the text."""

    spec: str
    path: str | None = None
    run_name: str | None = None
    model: Any = None
    tokenizer: Any = None  # the reward model's own
    same_tokens: bool = False  # whether the reward model reads the policy's tokens as they are
    fn: Callable[[list[str], list[str]], list[float]] | None = None

    @torch.no_grad()
    def score(self, rollout: Rollout, micro: int) -> torch.Tensor:
        """One score per response of the rollout."""
        device = rollout.input_ids.device
        if not (self.model is not None and self.same_tokens):
            return torch.tensor(self.score_texts(rollout.conversations, rollout.texts), device=device)
        scores = []
        for s in range(0, len(rollout.texts), micro):
            sl = slice(s, s + micro)
            per_token = token_scores(
                self.model, rollout.input_ids[sl], rollout.attention_mask[sl], rollout.position_ids[sl]
            )
            last = rollout.prompt_len + last_token_index(rollout.mask[sl])
            scores.append(per_token[torch.arange(len(last), device=device), last])
        return torch.cat(scores)

    def score_texts(self, conversations: list[list[dict]], replies: list[str]) -> list[float]:
        """Scores of text replies (held-out answers, or rollouts for a function or a reward model of its own tokens)."""
        if self.fn is not None:
            questions = [question_of(c) for c in conversations]
            try:
                scores = self.fn(questions, replies)
                values = [float(s) for s in scores]
            except Exception as e:  # noqa: BLE001 - the user's function may raise anything; say whose it is
                raise LLMTrainError(f"--reward_fn {self.spec} failed: {e.__class__.__name__}: {e}") from None
            if len(values) != len(replies):
                raise LLMTrainError(
                    f"--reward_fn {self.spec} returned {len(values)} scores for {len(replies)} responses; it must "
                    "return one float per response."
                )
            return values
        from llmtrain.stages.reward import score_conversations

        conversations = [c + [{"role": "assistant", "content": r}] for c, r in zip(conversations, replies)]
        return score_conversations(self.model, self.tokenizer, conversations)


def load_reward(cfg: PpoConfig, policy_tokenizer) -> RewardSource:
    """The reward function named by --reward_fn, else the reward model of --reward_model."""
    if cfg.reward_fn:
        return RewardSource(cfg.reward_fn, fn=load_reward_fn(cfg.reward_fn))
    latest = latest_run(cfg.runs_dir, "reward") if cfg.reward_model == "latest" else None
    if cfg.reward_model == "latest" and latest is None:
        raise LLMTrainError(
            f"--reward_model latest: there is no finished reward run in {cfg.runs_dir}. Train one with "
            "`accelerate launch recipes/reward.py`, give --reward_model a run or a sequence-classification "
            "checkpoint, or score with a function: --reward_fn llmtrain.data.default_task:answer_reward."
        )
    source = resolve_model(latest["_dir"] if latest else cfg.reward_model, cfg.runs_dir)
    if source.kind == "preset":
        raise LLMTrainError(f"--reward_model {cfg.reward_model} is a preset with random weights; give a reward model.")
    _check_reward_checkpoint(source)
    from llmtrain.stages.reward import load_reward_model

    tokenizer = load_tokenizer(source.path)
    model = load_reward_model(source.path, tokenizer, source.spec, cfg.attn_implementation).requires_grad_(False)
    same = (tokenizer.get_vocab(), tokenizer.chat_template) == (
        policy_tokenizer.get_vocab(),
        policy_tokenizer.chat_template,
    )
    return RewardSource(source.spec, source.path, source.run_name, model, tokenizer, same)


def _check_reward_checkpoint(source) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError) as e:
        raise LLMTrainError(f"Could not load the reward model '{source.spec}': {str(e).splitlines()[0]}") from None
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise LLMTrainError(
            f"--reward_model {source.spec} is not a sequence classifier (its config lists {architectures or 'none'}); "
            "a reward model gives one score per sequence. Train one with `accelerate launch recipes/reward.py`, or "
            "score with --reward_fn module:function."
        )
    if config.num_labels != 1:
        raise LLMTrainError(
            f"--reward_model {source.spec} has {config.num_labels} outputs; a reward model must have exactly one score."
        )


def load_reward_fn(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """Import 'module:function' (prompts, responses) -> one float per response."""
    module_name, _, func_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), func_name) if module_name and func_name else None
    except (ImportError, AttributeError) as e:
        raise LLMTrainError(
            f"--reward_fn {spec}: could not import it ({e}). Give 'module:function' naming a function "
            "(prompts: list[str], responses: list[str]) -> list[float], importable from here."
        ) from None
    if not callable(fn):
        raise LLMTrainError(
            f"--reward_fn {spec}: expected 'module:function', e.g. llmtrain.data.default_task:answer_reward."
        )
    return fn


# ---------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One step's responses on this process: [left-padded prompt | response] rows and what is known of them."""

    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    responses: torch.Tensor  # [B, R], padded after the first stop token
    mask: torch.Tensor  # [B, R] float, 1 on the response's tokens (its stop token included)
    ended: torch.Tensor  # [B] bool, the response stopped by itself
    prompt_len: int  # P
    conversations: list[list[dict]]
    texts: list[str]


@torch.no_grad()
def generate_rollout(
    policy, tokenizer, prompt_ids: list[list[int]], prompts, idx, cfg: PpoConfig, step: int, rank: int, world: int
) -> Rollout:
    """Sample `num_generations` responses to each prompt in `idx` (this process's share of the step's batch)."""
    device = next(policy.parameters()).device
    pad, stops = tokenizer.pad_token_id, stop_token_ids(tokenizer, policy)
    rows = [int(i) for i in idx for _ in range(cfg.num_generations)]
    # A row's seed depends on its place in the global batch, not on the process or batch that samples it.
    places = [(j * world + rank) * cfg.num_generations + k for j in range(len(idx)) for k in range(cfg.num_generations)]
    seeds = [int(np.random.SeedSequence([cfg.seed, step, g]).generate_state(1)[0]) for g in places]
    width = max(len(prompt_ids[i]) for i in rows)
    query = torch.full((len(rows), width), pad, dtype=torch.long)
    query_mask = torch.zeros_like(query)
    for r, i in enumerate(rows):
        query[r, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
        query_mask[r, width - len(prompt_ids[i]) :] = 1
    query, query_mask = query.to(device), query_mask.to(device)
    new = sample_tokens(
        policy, query, query_mask, cfg.max_new_tokens, stops, pad, seeds, cfg.temperature, cfg.top_k, cfg.top_p
    )
    responses, mask, ended = truncate_after_stop(new, stops, pad)
    longest = int(mask.sum(-1).max())
    responses, mask = responses[:, :longest], mask[:, :longest]
    attention = torch.cat([query_mask, mask], dim=1)
    return Rollout(
        input_ids=torch.cat([query, responses], dim=1),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        responses=responses,
        mask=mask.float(),
        ended=ended,
        prompt_len=width,
        conversations=[prompts[i] for i in rows],
        texts=[t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)],
    )


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


# ---------------------------------------------------------------- the update


def ppo_update(
    actor_critic, optimizer, rollout: Rollout, old_logprobs, old_values, advantages, returns, cfg, step, accelerator
) -> torch.Tensor:
    """`ppo_epochs` passes of clipped updates over minibatches; returns this process's summed statistics."""
    world, device = accelerator.num_processes, accelerator.device
    n = len(rollout.texts)
    size, micro, p = n // cfg.num_mini_batches, _micro_size(cfg), rollout.prompt_len
    mask = rollout.mask
    # policy loss, value loss, clipped tokens, value-clipped tokens, approx KL, entropy, tokens (all token sums)
    sums = torch.zeros(7, dtype=torch.float64, device=device)
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
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(accelerator.unwrap_model(actor_critic).policy.parameters(), cfg.grad_clip)
                critic = accelerator.unwrap_model(actor_critic).critic
                if critic is not None:
                    accelerator.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return sums


def _sum_across(accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    if accelerator.num_processes == 1:
        return lambda t: t
    return lambda t: accelerator.reduce(t.clone(), reduction="sum")


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
        "reward_std": math.sqrt(max(s2 / count - mean * mean, 0.0) * count / max(count - 1, 1)),
        "rlhf_reward": rlhf / count,
        "kl": kl_total / count,
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


# ---------------------------------------------------------------- evaluation and samples


def _evaluate(policy, tokenizer, prompts, checker, reward: RewardSource, cfg, accelerator, show=False) -> dict:
    """Greedy answers to the held-out prompts (split across processes): task accuracy and mean reward."""
    from accelerate.utils import gather_object

    if not prompts:
        return {}
    mine, own = process_share(len(prompts), accelerator)
    replies = chat_replies(policy, tokenizer, [prompts[i] for i in mine], cfg.max_new_tokens, greedy=True)
    with accelerator.autocast():
        scores = reward.score_texts([prompts[i] for i in mine], replies)
    rows = list(zip(mine, replies, scores))[:own]
    rows = sorted(gather_object(rows) if accelerator.num_processes > 1 else rows)
    metrics = {"val_reward": sum(s for *_, s in rows) / len(rows)}
    if checker is not None:
        ok = [bool(checker(question_of(prompts[i]), reply)) for i, reply, _ in rows]
        metrics["task_accuracy"] = sum(ok) / len(ok)
    if show and accelerator.is_main_process:
        print("samples (held-out prompts, greedy):")
        for i, reply, score in rows[: cfg.num_samples]:
            print(f"  {question_of(prompts[i])!r} -> {reply!r} (reward {score:.3f})")
    return metrics


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


# ---------------------------------------------------------------- config checks


def _check_config(cfg: PpoConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise LLMTrainError(f"Unknown schedule '{cfg.schedule}'. Choose one of: {', '.join(SCHEDULES)}.")
    if cfg.value_model not in VALUE_MODELS:
        raise LLMTrainError(f"--value_model {cfg.value_model}: choose one of {', '.join(VALUE_MODELS)}.")
    if cfg.advantage not in ADVANTAGES:
        raise LLMTrainError(f"--advantage {cfg.advantage}: choose one of {', '.join(ADVANTAGES)}.")
    for name in ("batch_size", "grad_accum", "max_length", "ppo_epochs", "num_mini_batches", "num_generations"):
        if getattr(cfg, name) < 1:
            raise LLMTrainError(f"{name} must be at least 1, got {getattr(cfg, name)}.")
    if cfg.advantage == "group" and cfg.num_generations < 2:
        raise LLMTrainError(
            "--advantage group compares each response with the other responses to the same prompt; set "
            "--num_generations to 2 or more (4 to 8 is usual)."
        )
    rows = cfg.batch_size * cfg.num_generations
    if rows % (cfg.num_mini_batches * cfg.grad_accum):
        raise LLMTrainError(
            f"batch_size x num_generations = {rows} responses per process must split evenly into num_mini_batches "
            f"({cfg.num_mini_batches}) x grad_accum ({cfg.grad_accum}) micro-batches."
        )
    if cfg.temperature <= 0:
        raise LLMTrainError(f"--temperature must be above 0 (PPO samples), got {cfg.temperature}.")
    if not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise LLMTrainError(f"--top_p must be in (0, 1] and --top_k at least 0, got {cfg.top_p} and {cfg.top_k}.")
    if cfg.max_new_tokens < 1 or cfg.max_new_tokens >= cfg.max_length:
        raise LLMTrainError(
            f"--max_new_tokens ({cfg.max_new_tokens}) must be at least 1 and below --max_length ({cfg.max_length}), "
            "which bounds prompt and response together."
        )
