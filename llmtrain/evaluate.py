"""Evaluation: held-out loss and bits per byte, task accuracy (later stages add reward accuracy, win rate)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

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


Checker = Callable[[str, str], bool]


def resolve_checker(task: str, prompts: list[str]) -> Checker | None:
    """The answer checker for task_accuracy: 'auto' uses the default task's when every prompt is one of its
    questions, 'none' disables it, 'module:function' imports a function (prompt, response) -> bool."""
    from llmtrain.data import default_task
    from llmtrain.errors import LLMTrainError

    if task == "none" or not prompts:
        return None
    if task == "auto":
        try:
            for prompt in prompts:
                default_task.parse_prompt(prompt)
        except ValueError:
            return None
        return default_task.check_answer
    module_name, _, func_name = task.partition(":")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise LLMTrainError(
            f"--task {task}: could not import the checker ({e}). Give 'auto', 'none' or 'module:function' "
            f"naming a function (prompt: str, response: str) -> bool."
        ) from None


def task_accuracy(
    model, tokenizer, prompts: list[str], checker: Checker, max_new_tokens: int = 24, batch_size: int = 64
) -> tuple[float, list[tuple[str, str, bool]]]:
    """Share of prompts whose greedy chat answer the checker accepts, and the (prompt, answer, ok) triples."""
    from llmtrain.generate import chat_replies

    replies = chat_replies(
        model,
        tokenizer,
        [[{"role": "user", "content": p}] for p in prompts],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        greedy=True,
    )
    results = [(p, r, bool(checker(p, r))) for p, r in zip(prompts, replies)]
    return sum(ok for *_, ok in results) / max(len(results), 1), results
