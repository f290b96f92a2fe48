"""Training batches as windows cut from a memory-mapped token file: no padding, no data loader workers.

Random windows are a pure function of (seed, step, micro-step): resuming at step N draws exactly
the batches the uninterrupted run would have drawn, and the global batch is drawn once and sliced
by rank, so N processes with batch B see the same windows as 1 process with batch N x B.
"""

from __future__ import annotations

import numpy as np
import torch

from llmtrain.errors import LLMTrainError
from llmtrain.runtime import to_device


class TokenWindows:
    """Windows of seq_len + 1 tokens (inputs and next-token targets) over a flat token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train"):
        if len(tokens) < seq_len + 1:
            raise LLMTrainError(
                f"The {split} split has {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}. "
                f"Use a larger corpus or a smaller --seq_len"
                + (" (or a larger --val_fraction)." if split == "val" else ".")
            )
        self.tokens = tokens
        self.seq_len = seq_len

    def _stack(self, starts: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.seq_len + 1
        rows = np.stack([self.tokens[s : s + span] for s in starts]).astype(np.int64)
        batch = to_device(torch.from_numpy(rows), device)
        return batch[:, :-1], batch[:, 1:]

    def random_batch(
        self, seed: int, step: int, micro: int, batch_size: int, device: torch.device, rank: int = 0, world: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch for (step, micro-step): inputs and targets, [B, T] each."""
        rng = np.random.default_rng([seed, step, micro])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=batch_size * world)
        return self._stack(starts[rank * batch_size : (rank + 1) * batch_size], device)

    @property
    def n_windows(self) -> int:
        """How many non-overlapping windows the tokens hold (the held-out windows are these, from the start)."""
        return (len(self.tokens) - 1) // self.seq_len

    def windows_at(self, indices: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-overlapping windows with these indices: the same held-out tokens every time."""
        return self._stack(np.asarray(indices, dtype=np.int64) * self.seq_len, device)
