"""Evaluation: held-out loss and bits per byte (later stages add task accuracy, reward accuracy, win rate)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmtrain.data.windows import TokenWindows


@torch.no_grad()
def evaluate_lm(
    model, windows: TokenWindows, token_bytes: torch.Tensor, batch_size: int, max_batches: int, accelerator
) -> dict[str, float]:
    """Mean next-token loss and bits per byte over fixed held-out windows, reduced across processes.

    Bits per byte sums the loss (in nats) over targets that stand for text and divides by the
    UTF-8 bytes of those targets, so it compares models with different tokenizers.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, tokens, text loss, bytes
    for x, y in windows.sequential_batches(
        # The same windows whatever the number of processes: eval_batches global batches.
        batch_size,
        batch_size * max_batches * accelerator.num_processes,
        accelerator.device,
        accelerator.process_index,
        accelerator.num_processes,
    ):
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nbytes = token_bytes[y.flatten()]
        sums += torch.stack(
            [loss.sum(), torch.tensor(loss.numel(), device=loss.device), (loss * (nbytes > 0)).sum(), nbytes.sum()]
        ).double()
    sums = accelerator.reduce(sums, reduction="sum")
    if was_training:
        model.train()
    loss_sum, n_tokens, text_loss, n_bytes = sums.tolist()
    return {
        "val_loss": loss_sum / max(n_tokens, 1),
        "val_bpb": text_loss / (math.log(2) * n_bytes) if n_bytes else float("nan"),
    }
