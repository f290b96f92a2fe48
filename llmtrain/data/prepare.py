"""Chat, preference and prompt rows tokenized once: `datasets.map(batched=True, num_proc)`, cached on disk.

Each kind of data has one function that tokenizes a list of rows (given as JSON-able values) into columns:
the token ids, the row's share of the statistics, and an `error` message for a row the template refuses.
Small inputs (fewer than MIN_CACHED_ROWS rows) run it directly in this process. Larger ones become a
`datasets.Dataset` of JSON strings that is mapped with it in `num_proc` processes, and the result is saved
(Arrow, `save_to_disk`) under `<cache_dir>/prepared/<kind>-<key>`, written to a temporary folder and renamed,
so a second call with the same inputs, in this launch or the next, in this process or another, loads it
instead of tokenizing. The key (`cache_key`) hashes the rows' content, the tokenizer (its serialized
backend, special tokens and class), the chat template text, the kind's parameters (max_length), the code
that prepares (this package's data modules) and the versions of transformers, tokenizers and jinja2. A
result with a refused row is not cached: its error is raised, with the row number, every time.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from llmtrain.errors import LLMTrainError

# Bump when what the preparing functions produce changes in a way the hashed sources below do not show.
FORMAT_VERSION = 1
# Below this many rows the rows are tokenized by a plain loop in this process (the same per-row function, no
# datasets, no cache entry): measured with a small tokenizer on 2 CPU cores, rows tokenize at ~5,000/s, a cold
# map-and-save adds ~15 ms to a call and a cache hit costs ~5 ms, so caching pays from ~100 rows on; tiny inputs
# (tests, one-off calls) are not worth an entry.
MIN_CACHED_ROWS = 200
# Rows per worker process when num_proc is not given. Starting datasets' worker pool costs ~0.3 s; on 2 idle
# cores, two processes took 0.57 s for 2,000 short chat rows (one mapping process 0.85 s, the plain loop 0.59 s),
# 1.2 s for the embedded task's 6,000 SFT rows (1.4 s), and were 1.75x the plain loop on 100,000.
ROWS_PER_PROCESS = 2000
BATCH_SIZE = 500
# The error written for the rows after a refused one in the same batch: they are not tokenized, since the
# refusal is what the caller raises.
SKIPPED = "not tokenized: an earlier row was refused"
# The modules whose code decides what a prepared row holds; their text is part of the key.
_SOURCES = ("template.py", "chat.py", "preferences.py", "prompts.py", "prepare.py")

Columns = dict[str, list]
ColumnsFn = Callable[..., Columns]
_TYPES = {"ids": None, "int": "int64", "bool": "bool", "str": "string"}


def stats_schema(stats_cls) -> dict[str, str]:
    """The schema of a stats dataclass's fields as per-row columns: its text fields str, its counts int."""
    return {f.name: "str" if f.type == "str" else "int" for f in fields(stats_cls)}


def prepare_columns(
    kind: str,
    tokenizer,
    items: Sequence[Any],
    columns_fn: ColumnsFn,
    schema: dict[str, str],
    params: dict[str, Any] | None = None,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
    min_rows: int | None = None,
) -> Columns:
    """`columns_fn(items, tokenizer, **params)` for JSON-able `items`, one entry per item in every column, in order:
    directly for fewer than `min_rows` items (default MIN_CACHED_ROWS), otherwise mapped and cached (see the module
    docstring). `schema` names each column's type: ids (a list of token ids), int, bool or str; `columns_fn` must
    return an `error` (str) column, and a module-level function so that worker processes can pickle it."""
    items, params = list(items), params or {}
    threshold = MIN_CACHED_ROWS if min_rows is None else min_rows
    if not items or len(items) < threshold:
        return columns_fn(items, tokenizer, **params)

    key = cache_key(kind, tokenizer, items, params)
    out = _cache_root(cache_dir) / f"{kind}-{key}"
    cached = _load(out, schema)
    if cached is not None and len(cached["error"]) == len(items):
        return cached

    import datasets

    rows = [json.dumps(item) for item in items]  # ASCII: any string survives Arrow and the round trip
    procs = _num_proc(num_proc, len(rows))
    work = _work_dir(out)
    # Several workers write their shards to files (sending them back through pipes took twice as long); one
    # process keeps its result in memory.
    to_files = {"cache_file_name": str(work / "map" / "shard.arrow")} if procs and work is not None else {}
    try:
        with _no_progress_bars():
            mapped = datasets.Dataset.from_dict({"row": rows}).map(
                _map_batch,
                batched=True,
                batch_size=BATCH_SIZE,
                num_proc=procs,
                fn_kwargs={"columns_fn": columns_fn, "tokenizer": tokenizer, "params": params},
                remove_columns=["row"],
                features=_features(schema),
                new_fingerprint=key,  # datasets would otherwise hash the tokenizer for a fingerprint of its own
                **to_files,
            )
            columns = _to_python(mapped, schema)
            if work is not None and not any(columns["error"]):
                meta = {"kind": kind, "rows": len(rows), "params": params, "format": FORMAT_VERSION}
                _save(mapped, work / "entry", out, meta)
            del mapped  # release the shard files before they are removed
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return columns


def _map_batch(batch: dict[str, list], columns_fn: ColumnsFn, tokenizer, params: dict[str, Any]) -> Columns:
    """What each map worker runs on a batch of JSON rows (module level, so that it pickles)."""
    return columns_fn([json.loads(row) for row in batch["row"]], tokenizer, **params)


def cache_key(kind: str, tokenizer, items: Sequence[Any], params: dict[str, Any]) -> str:
    """A hash of everything a prepared row depends on: the rows (as JSON), the tokenizer, its chat template, the
    kind and its parameters, the preparing code and the libraries that render and tokenize."""
    import jinja2
    import tokenizers
    import transformers

    h = hashlib.sha256()
    header = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "params": params,
        "chat_template": tokenizer.chat_template,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "tokenizer_class": type(tokenizer).__name__,
        "versions": [transformers.__version__, tokenizers.__version__, jinja2.__version__],
    }
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    h.update(_tokenizer_text(tokenizer).encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    h.update(json.dumps(list(items)).encode())  # one call: a third faster than one per row
    return h.hexdigest()[:24]


def _tokenizer_text(tokenizer) -> str:
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        from llmtrain.tokenizer import plain_backend

        # Without the padding and truncation state an earlier batched call may have left in the backend: rows are
        # tokenized one at a time without either, so that state changes nothing here and must not change the key.
        return plain_backend(tokenizer).to_str()
    # A tokenizer without a Rust backend: its vocabulary and added tokens.
    added = {i: str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    return json.dumps([sorted(tokenizer.get_vocab().items()), sorted(added.items())])


def default_num_proc(rows: int) -> int:
    """One process per ROWS_PER_PROCESS rows, at most one per CPU this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, rows // ROWS_PER_PROCESS))


def _num_proc(requested: int | None, rows: int) -> int | None:
    if requested is not None and requested < 1:
        raise LLMTrainError(f"num_proc must be at least 1, not {requested}.")
    n = min(requested if requested is not None else default_num_proc(rows), rows)
    return n if n > 1 else None  # None: map in this process


def add_row_stats(stats, columns: Columns) -> None:
    """Add the per-row statistics columns to the dataclass `stats`, in row order: numbers are summed, a text
    field keeps the first row's non-empty value (the example a summary quotes)."""
    for f in fields(stats):
        if f.name not in columns:
            continue
        values = columns[f.name]
        if isinstance(getattr(stats, f.name), str):
            setattr(stats, f.name, getattr(stats, f.name) or next((v for v in values if v), ""))
        else:
            setattr(stats, f.name, getattr(stats, f.name) + sum(values))


def raise_first_error(columns: Columns, source: str) -> None:
    """The first refused row's error, named by its row number (1-based), as the row-by-row loop raised it."""
    for n, error in enumerate(columns["error"], 1):
        if error:
            raise LLMTrainError(f"{source}, row {n}: {error}")


# ---------------------------------------------------------------- the cache on disk


def _cache_root(configured: str | Path | None) -> Path:
    from llmtrain.runtime import cache_dir

    return cache_dir(str(configured) if configured is not None else None) / "prepared"


def _features(schema: dict[str, str]):
    import datasets

    return datasets.Features(
        {
            name: datasets.List(datasets.Value("int32")) if kind == "ids" else datasets.Value(_TYPES[kind])
            for name, kind in schema.items()
        }
    )


def _to_python(ds, schema: dict[str, str]) -> Columns:
    table = ds.data
    with gc_paused():
        return {name: table.column(name).to_pylist() for name in schema}


def _load(out: Path, schema: dict[str, str]) -> Columns | None:
    if not (out / "llmtrain.json").is_file():
        return None
    import datasets

    try:
        with _no_progress_bars():
            return _to_python(datasets.load_from_disk(str(out)), schema)
    except Exception:  # noqa: BLE001 - a damaged entry is prepared again and replaced
        shutil.rmtree(out, ignore_errors=True)
        return None


def _work_dir(out: Path) -> Path | None:
    """A fresh folder beside the entry for map shards and the entry being written; None where none can be made
    (a read-only cache): then the data is prepared in memory and not cached."""
    work = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        (work / "map").mkdir(parents=True)
    except OSError:
        return None
    return work


def _save(ds, entry: Path, out: Path, meta: dict[str, Any]) -> None:
    """Write the entry in the work folder, then rename it: a reader sees a whole entry or none."""
    try:
        ds.save_to_disk(str(entry))
        (entry / "llmtrain.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if not out.exists():  # else another process finished first; keep its copy
            os.replace(entry, out)
    except OSError:  # a full disk, or a process that renamed first: the result stands uncached
        pass


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while millions of id lists (and the objects holding them) are built: each
    few hundred new containers would set it off again, 2-4x slower for 100k rows. They hold only ints and strings,
    so none of them can be part of a cycle."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
