"""Where a reward comes from: a reward model (a sequence classifier read at the answer's last token) or a Python
function of the text. PPO scores its rollouts with one; evaluation scores held-out answers with the same."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmtrain.data.prompts import question_of
from llmtrain.errors import LLMTrainError, refuse_without_remote_code
from llmtrain.models import load_reward_model, score_conversations, token_scores
from llmtrain.registry import hub_snapshot, latest_run, resolve_model
from llmtrain.rl import last_token_index
from llmtrain.rollout import Rollout
from llmtrain.tokenizer import load_tokenizer


@dataclass
class RewardSource:
    """Where scores come from: a reward model (read at the last real token) or a Python function of the text."""

    spec: str
    path: str | None = None
    label: str | None = None  # how the manifest names it: a run's name, a Hub id or a folder
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
        conversations = [c + [{"role": "assistant", "content": r}] for c, r in zip(conversations, replies)]
        return score_conversations(self.model, self.tokenizer, conversations)


def load_reward(cfg: Any, policy_tokenizer) -> RewardSource:
    """The reward function named by `cfg.reward_fn`, else the reward model of `cfg.reward_model`."""
    if cfg.reward_fn:
        return RewardSource(cfg.reward_fn, fn=load_reward_fn(cfg.reward_fn))
    latest = latest_run(cfg.runs_dir, "reward") if cfg.reward_model == "latest" else None
    if cfg.reward_model == "latest" and latest is None:
        raise LLMTrainError(
            f"--reward_model latest: there is no finished reward run in {cfg.runs_dir}. Train one with "
            "`accelerate launch recipes/reward.py`, give --reward_model a run or a sequence-classification "
            "checkpoint, or score with a function: --reward_fn llmtrain.data.default_task:answer_reward."
        )
    return reward_model_source(latest["_dir"] if latest else cfg.reward_model, cfg, policy_tokenizer)


def reward_model_source(spec: str, cfg: Any, policy_tokenizer, option: str = "--reward_model") -> RewardSource:
    """The reward model `spec` names (a run, a sequence-classification folder or a Hub id), loaded and checked;
    `option` names it in messages."""
    source = resolve_model(spec, cfg.runs_dir)
    if source.kind == "preset":
        raise LLMTrainError(f"{option} {spec} is a preset with random weights; give a reward model.")
    source = hub_snapshot(source, cfg.runs_dir, option)
    _check_reward_checkpoint(source, cfg.trust_remote_code, option)
    tokenizer = load_tokenizer(source.path, trust_remote_code=cfg.trust_remote_code)
    model = load_reward_model(source.path, tokenizer, source.spec, cfg.attn_implementation, cfg.trust_remote_code)
    model.requires_grad_(False)
    same = (tokenizer.get_vocab(), tokenizer.chat_template) == (
        policy_tokenizer.get_vocab(),
        policy_tokenizer.chat_template,
    )
    return RewardSource(source.spec, source.path, source.label, model, tokenizer, same)


def _check_reward_checkpoint(source, trust_remote_code: bool = False, option: str = "--reward_model") -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        refuse_without_remote_code(source.spec, e)
        raise LLMTrainError(f"Could not load the reward model '{source.spec}': {str(e).splitlines()[0]}") from None
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise LLMTrainError(
            f"{option} {source.spec} is not a sequence classifier (its config lists {architectures or 'none'}); "
            "a reward model gives one score per sequence. Train one with `accelerate launch recipes/reward.py`, or "
            "score with --reward_fn module:function."
        )
    if config.num_labels != 1:
        raise LLMTrainError(
            f"{option} {source.spec} has {config.num_labels} outputs; a reward model must have exactly one score."
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
