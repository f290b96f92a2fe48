from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmtrain.data.windows import TokenWindows
from llmtrain.distributed import process_share
from llmtrain.errors import LLMTrainError

CPU = torch.device("cpu")


def test_targets_are_inputs_shifted_by_one():
    windows = TokenWindows(np.arange(1000, dtype=np.uint16), seq_len=16)
    x, y = windows.random_batch(seed=0, step=3, micro=0, batch_size=4, device=CPU)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)


def test_batches_depend_only_on_seed_and_step():
    windows = TokenWindows(np.arange(1000, dtype=np.uint16), seq_len=16)
    a = windows.random_batch(0, 5, 0, 4, CPU)[0]
    b = windows.random_batch(0, 5, 0, 4, CPU)[0]
    c = windows.random_batch(0, 6, 0, 4, CPU)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_two_ranks_split_the_one_rank_batch_of_twice_the_size():
    windows = TokenWindows(np.arange(5000, dtype=np.uint16), seq_len=8)
    whole = windows.random_batch(1, 2, 0, 6, CPU)[0]
    parts = [windows.random_batch(1, 2, 0, 3, CPU, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_held_out_windows_are_the_non_overlapping_ones_from_the_start():
    windows = TokenWindows(np.arange(100, dtype=np.uint16), seq_len=10)
    assert windows.n_windows == 9
    x, y = windows.windows_at([0, 3, 8], CPU)
    assert x[:, 0].tolist() == [0, 30, 80] and torch.equal(y, x + 1)


def test_process_shares_cover_every_item_once_in_equal_counts():
    """Sharded forwards need equal counts: the short share is padded with repeats, which `own` leaves out."""

    def accelerator(rank: int, world: int):
        return SimpleNamespace(process_index=rank, num_processes=world)

    for n, world in ((9, 2), (10, 4), (1, 3), (0, 2)):
        shares = [process_share(n, accelerator(r, world)) for r in range(world)]
        assert len({len(mine) for mine, _ in shares}) == 1
        assert sorted(i for mine, own in shares for i in mine[:own]) == list(range(n))
    assert process_share(9, accelerator(1, 2)) == ([1, 3, 5, 7, 1], 4)


def test_a_split_smaller_than_one_window_is_reported():
    with pytest.raises(LLMTrainError, match=r"val split has 10 tokens, fewer than one window.*--val_fraction"):
        TokenWindows(np.arange(10, dtype=np.uint16), seq_len=16, split="val")
