"""Which examples make up each batch, as a pure function of (seed, batch number).

Resuming at any step reproduces the uninterrupted order, and the global batch is drawn once and
sliced by rank, so N processes see exactly the examples 1 process would see with N times the batch.
"""

from __future__ import annotations

import numpy as np


def batch_indices(n: int, global_batch: int, seed: int, j: int) -> np.ndarray:
    """Indices of global batch j in an endless stream of per-epoch shuffles of range(n)."""
    positions = np.arange(j * global_batch, (j + 1) * global_batch)
    epochs, offsets = positions // n, positions % n
    out = np.empty(global_batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out
