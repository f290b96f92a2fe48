"""The arithmetic of RL fine-tuning (PPO, and GRPO-style group advantages), written once and tested by hand.

Tensors are [batch, response tokens] with a 0/1 `mask` over the real response tokens (the stop token
included, right padding excluded). Conventions follow "The N+ implementation details of RLHF with PPO"
(Huang et al. 2024) and OpenRLHF: the per-token reward is the KL penalty -beta * (log pi - log ref) (k1),
with the sequence score added at the last real token; advantages come from token-level GAE and are
whitened; the policy and value losses are clipped.

Statistics that must cover the whole global batch (whitening) take `all_reduce`, a function that sums
a tensor over processes (identity in one process), so N processes whiten exactly as one process would.

Everything here computes in fp32 (or wider) whatever the autocast: half-precision inputs (bf16 model outputs)
are widened first, and log-probabilities are taken from the logits in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmtrain.losses import over_positions

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 when it is in a half precision (bf16, fp16); fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = _identity) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (over every process with `all_reduce`)."""
    x = fp32(x)
    sums = all_reduce(torch.stack([(x * mask).sum(), mask.sum()]).double())
    return (sums[0] / sums[1].clamp(min=1)).to(x.dtype)


def masked_mean_var(
    x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = _identity
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (Bessel-corrected) variance of `x` where `mask` is 1, across processes."""
    x, m = x.double(), mask.double()
    sums = all_reduce(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]))
    n = sums[2].clamp(min=1)
    mean = sums[0] / n
    var = (sums[1] / n - mean * mean).clamp(min=0)
    if sums[2] > 1:
        var = var * sums[2] / (sums[2] - 1)
    return mean, var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_reduce: AllReduce = _identity
) -> torch.Tensor:
    """(x - mean) / std over the masked positions; with shift_mean=False the mean is added back (for rewards)."""
    mean, var = masked_mean_var(x, mask, all_reduce)
    whitened = (x.double() - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return (whitened * mask).to(fp32(x).dtype)


# ---------------------------------------------------------------- rewards


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a right-padded 0/1 mask (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def kl_penalty_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * (log pi - log ref), plus each sequence's score at its last real token.

    Returns (rewards, kl) with kl the per-token k1 estimate log pi - log ref, zero on padding; its sum
    over a response estimates KL(pi || ref) of that response, and is positive on average.
    """
    kl = (fp32(logprobs) - fp32(ref_logprobs)) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns = advantages + values).

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}; the state after the last
    real token is terminal (V = 0), and padding contributes nothing.
    """
    rewards, values = fp32(rewards) * mask, fp32(values) * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO-style advantages: each score minus the mean of its group (consecutive `group_size` rows), divided
    by the group's standard deviation when `scale`; a group whose scores are all equal gets zeros."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.double().view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + 1e-4)
    return centred.view(-1).to(fp32(scores).dtype)


# ---------------------------------------------------------------- losses


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # sum over masked tokens / `normaliser`
    clip_fraction: torch.Tensor  # share of tokens whose ratio left [1 - eps, 1 + eps] in the direction that matters
    approx_kl: torch.Tensor  # mean of 0.5 (log ratio)^2, an estimate of KL(old || new)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    normaliser: torch.Tensor | float | None = None,
) -> PolicyLossOutput:
    """PPO's clipped surrogate: max(-A r, -A clip(r, 1 - eps, 1 + eps)) per token with r = pi / pi_old.

    The loss is the masked sum divided by `normaliser` (default: this batch's token count; the stage passes
    the global minibatch's count so every token weighs the same however the batch is split).
    """
    logprobs, old_logprobs, advantages = fp32(logprobs), fp32(old_logprobs), fp32(advantages)
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    n = mask.sum().clamp(min=1)
    normaliser = n if normaliser is None else normaliser
    with torch.no_grad():
        clip_fraction = ((clipped > unclipped).float() * mask).sum() / n
        approx_kl = (0.5 * log_ratio**2 * mask).sum() / n
    return PolicyLossOutput((per_token * mask).sum() / normaliser, clip_fraction, approx_kl)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
    normaliser: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, +-eps);
    returns (loss, clip fraction)."""
    values, old_values, returns = fp32(values), fp32(old_values), fp32(returns)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_loss, clipped_loss)
    n = mask.sum().clamp(min=1)
    normaliser = n if normaliser is None else normaliser
    with torch.no_grad():
        clip_fraction = ((clipped_loss > unclipped_loss).float() * mask).sum() / n
    return (per_token * mask).sum() / normaliser, clip_fraction


# ---------------------------------------------------------------- log-probabilities and diagnostics


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`, in fp32: the log-probability the sampler gave each token."""
    # log_softmax, not the picked logit minus logsumexp: the same in exact arithmetic, and logsumexp allocates a
    # vocabulary-sized temporary too; the two round differently, and PPO's sampled trajectory follows the bits.
    return over_positions(functools.partial(_logprobs_at, temperature=temperature), logits, tokens)


def _logprobs_at(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = F.log_softmax(fp32(logits) / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position."""
    logits = fp32(logits) / temperature
    return torch.logsumexp(logits, -1) - (F.softmax(logits, -1) * logits).sum(-1)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = _identity
) -> float:
    """1 - Var(returns - values) / Var(returns) over masked tokens: 1 is a perfect critic, <= 0 a useless one."""
    _, var_returns = masked_mean_var(returns, mask, all_reduce)
    _, var_error = masked_mean_var(returns - values, mask, all_reduce)
    return float("nan") if var_returns == 0 else (1 - var_error / var_returns).item()


def truncate_after_stop(
    responses: torch.Tensor, stop_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token: (responses padded after it, mask, ended).

    The mask covers the tokens up to and including the first stop token (all tokens when none came);
    `ended` says whether the response stopped by itself rather than at the length limit.
    """
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    # Positions strictly after the first stop token: the running count of stops, shifted by one.
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    mask = (~after).long()
    return responses.masked_fill(after, pad_id), mask, is_stop.any(-1)


# ---------------------------------------------------------------- KL coefficient


@dataclass
class KLController:
    """The KL penalty coefficient: fixed, or adaptive (Ziegler et al. 2019) when `target` is set.

    Adaptive: after each step, kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_responses / horizon,
    so the coefficient rises while the measured KL is above the target and falls while it is below.
    """

    value: float
    target: float | None = None
    horizon: int = 10_000

    def update(self, kl: float, n_responses: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_responses / self.horizon
