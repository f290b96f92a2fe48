"""AdamW with decay on weight matrices only, and the learning-rate schedules."""

from __future__ import annotations

import inspect
import math

import torch

from llmtrain.config import SCHEDULES


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The trainable parameters of `model` in two groups: weight matrices decay, norms and biases (1-D) do not.
    Each group keeps its peak lr as `base_lr`, which the schedule scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr, "base_lr": lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr, "base_lr": lr},
    ]


def build_optimizer(
    model: torch.nn.Module | list[dict],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW, fused where the build supports it, over a model's `param_groups` or over groups given (one
    optimizer for several models with their own lr: DeepSpeed drives one optimizer per engine)."""
    groups = param_groups(model, lr, weight_decay) if isinstance(model, torch.nn.Module) else model
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_at(
    step: int,
    total_steps: int,
    lr: float,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate for `step` (0-based): linear warmup, then cosine, warmup-stable-decay or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    # wsd: hold the peak, then decay linearly to min_lr over the last decay_fraction of the steps
    decay_start = total_steps - int(decay_fraction * total_steps)
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return lr + progress * (min_lr - lr)
