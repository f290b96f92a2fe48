"""Training, validation and test rows for the fine-tuning stages, chosen the same way in each.

`--data default` uses the embedded task's own files (its validation and test files have problems no other
file holds); otherwise `--eval_data` names the validation rows, or a seeded `val_fraction` of `--data` is
held out. The test rows (`--test_data`, else a `test_fraction` of `--data`) are evaluated once, at the end:
a test file is not even opened before then, and rows held out of `--data` for the test are set aside unread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from llmtrain.data.chat import BadRows
from llmtrain.data.corpus import default_data_dir
from llmtrain.errors import LLMTrainError
from llmtrain.run_dir import BAD_ROWS, Run
from llmtrain.runtime import cache_dir

Row = TypeVar("Row")
# Above this share of rows dropped for length, a stage says so (its metrics then describe the short rows only).
LENGTH_DROP_WARNING = 0.05


# The test rows held out of --data are the same whatever --seed: runs at several seeds meet one test set.
TEST_SPLIT_SEED = 0


@dataclass
class TestSet(Generic[Row]):
    """The test rows of a run, read only when the final evaluation asks for them (`rows()`)."""

    source: str  # what the manifest records: the file, or the share of --data set aside
    _load: Callable[[], list[Row]]

    def rows(self) -> list[Row]:
        return self._load()


def train_and_eval_rows(
    cfg: Any, run: Run, load: Callable[..., list[Row]], default_train: str, default_eval: str
) -> tuple[list[Row], list[Row], TestSet[Row] | None]:
    """Load the training and validation rows, and say where the test rows are (None: no test set); `load(spec,
    split, dataset_config, max_rows, bad_rows)` reads one source. Rows skipped under `max_bad_rows` are summarised
    here and listed in the run's bad_rows.jsonl."""
    default_dir = default_data_dir(cache_dir(cfg.cache_dir))
    train_spec = str(default_dir / default_train) if cfg.data == "default" else cfg.data
    bad_train, bad_eval = BadRows(cfg.max_bad_rows), BadRows(cfg.max_bad_rows)
    rows = _nonempty(load(train_spec, cfg.dataset_split, cfg.dataset_config, cfg.max_rows, bad_train), train_spec)
    rows, test = _test_set(cfg, load, rows, default_dir / default_eval.replace("_val.", "_test."))
    if cfg.eval_data == "default" and cfg.data == "default":
        held_out = load(str(default_dir / default_eval))
    elif cfg.eval_data not in (None, "default"):
        held_out = _nonempty(load(cfg.eval_data, cfg.eval_split, cfg.dataset_config, None, bad_eval), cfg.eval_data)
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(rows))
        held = set(order[: max(1, round(cfg.val_fraction * len(rows)))].tolist())
        rows, held_out = [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
    for spec, bad in ((train_spec, bad_train), (cfg.eval_data, bad_eval)):
        if bad.skipped and run.is_main:
            print(
                f"Skipped {len(bad.skipped):,} rows of {spec} that cannot be used (--max_bad_rows "
                f"{cfg.max_bad_rows:g}); the first: {bad.skipped[0]['reason']} Each is listed in "
                f"{run.path / BAD_ROWS}.",
                flush=True,
            )
    run.bad_rows = bad_train.skipped + bad_eval.skipped
    if not rows:
        raise LLMTrainError(
            f"No training rows are left of {train_spec} once the validation and test rows are held out; give more "
            "rows, or lower --val_fraction and --test_fraction."
        )
    return rows, held_out, test


def _test_set(cfg: Any, load: Callable[..., list[Row]], rows: list[Row], default_file) -> tuple[list[Row], Any]:
    """The training rows left once the test rows are set aside, and the test set (None when there is none)."""
    if cfg.test_data in (None, "none"):
        return rows, None
    if cfg.test_data != "default":
        spec, split, config = cfg.test_data, cfg.test_split, cfg.dataset_config
        return rows, TestSet(spec, lambda: _nonempty(load(spec, split, config, None, BadRows(cfg.max_bad_rows)), spec))
    if cfg.data == "default":
        return rows, TestSet(default_file.name, lambda: load(str(default_file)))
    n_test = round(cfg.test_fraction * len(rows))
    if n_test == 0:
        return rows, None  # too few rows (or --test_fraction 0) for a test set
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(len(rows))
    held = set(order[:n_test].tolist())
    test_rows = [rows[i] for i in sorted(held)]
    source = f"{n_test} rows of {cfg.data} (--test_fraction {cfg.test_fraction:g})"
    return [r for i, r in enumerate(rows) if i not in held], TestSet(source, lambda: test_rows)


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
    limit = f"max_length={cfg.max_length}" if budget == cfg.max_length else f"max_length - max_new_tokens = {budget}"
    if not train[0]:
        raise LLMTrainError(f"No row of {cfg.data} fits in {limit} tokens; raise --max_length.")
    for name, stats in (("training", train[-1]), ("held-out", held_out[-1])):
        if stats.rows and stats.dropped > LENGTH_DROP_WARNING * stats.rows and accelerator.is_main_process:
            print(
                f"Warning: {stats.dropped:,} of the {stats.rows:,} {name} rows ({stats.dropped / stats.rows:.0%}) are "
                f"longer than {limit} tokens and were dropped"
                + (
                    f"; held-out metrics are computed on the {stats.rows - stats.dropped:,} that fit"
                    if name[0] == "h"
                    else ""
                )
                + ". Raise --max_length to keep them.",
                flush=True,
            )
    return train, held_out


# The fixed sample of training rows each evaluation also measures (for the fit diagnosis): as many rows as
# validation has, at most this many.
TRAINSET_CAP = 200


def trainset_sample(items: list[Row], n_val: int) -> list[Row]:
    """A fixed sample of training items (the same at every evaluation and every seed), as many as validation has
    up to TRAINSET_CAP: the validation metric measured on it says how well the run fits its own data."""
    k = min(n_val, TRAINSET_CAP, len(items))
    chosen = np.random.default_rng(TEST_SPLIT_SEED).choice(len(items), k, replace=False)
    return [items[i] for i in sorted(chosen.tolist())]


def tokenize_test(tokenize: Callable[..., tuple], tokenizer, test: TestSet | None, budget: int, cfg: Any, accelerator):
    """The test rows, read and tokenized only now (the final evaluation): (rows, tokenize's result), or None."""
    if test is None:
        return None
    rows = test.rows()
    with accelerator.main_process_first():
        tokenized = tokenize(
            tokenizer, rows, budget, f"{test.source} (test)", num_proc=cfg.num_proc, cache_dir=cfg.cache_dir
        )
    return rows, tokenized


def held_out_counts(stats: Any, answered: int | None = None) -> dict[str, int]:
    """How many held-out rows the metrics were computed on, for the manifest: rows read, those that fit the length
    limit (the held-out losses and preference metrics), those dropped for length, and prompts answered."""
    counts = {"rows": stats.rows, "fit": stats.rows - stats.dropped, "dropped_for_length": stats.dropped}
    return counts | ({"answered": answered} if answered is not None else {})
