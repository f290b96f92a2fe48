"""Preference losses, written once and tested against hand-computed values before any loop uses them, and the one
way vocabulary-wide functions of a large batch of logits are computed (`over_positions`).

Log-probabilities are summed over the response tokens of each sequence (per example, shape [B]). The losses
compute in fp32 whatever the autocast: a bf16 input (a score straight from a model) is widened first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmtrain.config import DPO_LOSS_TYPES


@dataclass
class DpoOutput:
    loss: torch.Tensor  # mean over the batch
    chosen_rewards: torch.Tensor  # beta * (log pi(y_w|x) - log ref(y_w|x)), per example
    rejected_rewards: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        return (self.chosen_rewards - self.rejected_rewards).mean()

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DpoOutput:
    """DPO (Rafailov et al. 2023) and two variants on the log-ratio difference
    h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]:

    - sigmoid: -log sigmoid(beta h)
    - conservative (label-smoothed, cDPO): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    - ipo (Azar et al. 2023): (h - 1 / (2 beta))^2
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        eps = label_smoothing if loss_type == "conservative" else 0.0
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return DpoOutput(losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Reward-model loss: -log sigmoid(r(y_w) - r(y_l) - margin), averaged over the batch."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float() - margin).mean()


# Positions x vocabulary entries that a vocabulary-wide function computes at once (256 MiB in fp32); a larger input
# is split into chunks of positions.
VOCAB_CHUNK_ELEMENTS = 1 << 26


def over_positions(fn, logits: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """fn(logits, targets) -> one value per position, [B, T], for a function that works on each position's row of
    the vocabulary alone (cross entropy, a token's log-probability). A large input goes in chunks of positions, each
    under non-reentrant checkpointing: the backward pass recomputes a chunk's fp32 copy and log-softmax instead of
    keeping them, which with a 150k-token vocabulary would be 8 bytes per position and vocabulary entry beside the
    logits. Each position's value and gradient are the same either way."""
    chunk = chunk or VOCAB_CHUNK_ELEMENTS
    if logits.numel() <= chunk:
        return fn(logits, targets)
    from torch.utils.checkpoint import checkpoint

    rows = max(1, chunk // logits.size(-1))
    per_sequence = []
    for logits_b, targets_b in zip(logits, targets):
        spans = [slice(t, t + rows) for t in range(0, logits_b.size(0), rows)]
        chunks = [checkpoint(fn, logits_b[s], targets_b[s], use_reentrant=False) for s in spans]
        per_sequence.append(torch.cat(chunks))
    return torch.stack(per_sequence)
