"""Preference losses, written once and tested against hand-computed values before any loop uses them.

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
