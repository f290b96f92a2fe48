"""Training and held-out rows for the fine-tuning stages, chosen the same way in each.

`--data default` uses the embedded task's own files (its held-out file has problems no training file
holds); otherwise `--eval_data` names the held-out rows, or a seeded `val_fraction` of `--data` is held out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from llmtrain.data.corpus import default_data_dir
from llmtrain.errors import LLMTrainError
from llmtrain.runtime import cache_dir

Row = TypeVar("Row")


def train_and_eval_rows(
    cfg: Any, load: Callable[..., list[Row]], default_train: str, default_eval: str
) -> tuple[list[Row], list[Row]]:
    """Load the training rows and the held-out rows; `load(spec, split, dataset_config, max_rows)` reads one source."""
    default_dir = default_data_dir(cache_dir(cfg.cache_dir))
    train_spec = str(default_dir / default_train) if cfg.data == "default" else cfg.data
    rows = _nonempty(load(train_spec, cfg.dataset_split, cfg.dataset_config, cfg.max_rows), train_spec)
    if cfg.eval_data == "default" and cfg.data == "default":
        return rows, load(str(default_dir / default_eval))
    if cfg.eval_data not in (None, "default"):
        return rows, _nonempty(load(cfg.eval_data, cfg.eval_split, cfg.dataset_config), cfg.eval_data)
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    held = set(order[: max(1, round(cfg.val_fraction * len(rows)))].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _nonempty(rows: list[Row], spec: str) -> list[Row]:
    if not rows:
        raise LLMTrainError(f"{spec} holds no rows (the file is empty, or only blank lines). Give a file with rows.")
    return rows


def tokenize_splits(
    tokenize: Callable[..., tuple], tokenizer, train_rows: list, eval_rows: list, budget: int, cfg: Any, accelerator
):
    """`tokenize(tokenizer, rows, budget, source, num_proc, cache_dir)` the training and the held-out rows: the
    main process tokenizes and caches, the other processes then load the cache. Stops when no training row fits."""
    prep = dict(num_proc=cfg.num_proc, cache_dir=cfg.cache_dir)
    with accelerator.main_process_first():
        train = tokenize(tokenizer, train_rows, budget, cfg.data, **prep)
        held_out = tokenize(tokenizer, eval_rows, budget, f"{cfg.eval_data} (held out)", **prep)
    if not train[0]:
        limit = (
            f"max_length={cfg.max_length}" if budget == cfg.max_length else f"max_length - max_new_tokens = {budget}"
        )
        raise LLMTrainError(f"No row of {cfg.data} fits in {limit} tokens; raise --max_length.")
    return train, held_out
