"""Text corpus -> cleaned documents -> cached token shards.

A corpus is a .txt file (one document per blank-line-separated paragraph), a .jsonl/.json file
(one document per row, in a text field), a .parquet file, a folder of these, or a Hub data set.
It is read with `datasets`, cleaned (empty documents dropped, exact duplicates removed), split into
train/validation by document, tokenized once with `map(batched=True, num_proc=...)`, and written as
flat token files (uint16 when the vocabulary fits) with an EOS after every document. The result is
cached under a key made of the data's fingerprint, the tokenizer's and the cleaning options.

`llmtrain prepare` (`prepare_pretrain_data`) does this once before a launch, for exactly the key a `pretrain`
with the same options looks up (`find_pretrain_data`). A launch of several processes prepares only a small
corpus itself; for a large one it stops at once with that command (`check_inline_preparation`), because its
other processes would wait in a barrier, past the process group's timeout, while the main one tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtrain.errors import LLMTrainError
from llmtrain.runtime import process_alive
from llmtrain.tokenizer import load_tokenizer, plain_backend, save_tokenizer, train_tokenizer

if TYPE_CHECKING:
    from llmtrain.config import PretrainConfig
    from llmtrain.registry import ModelSource

TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REPO_DATA_DIR = Path(__file__).resolve().parents[2] / "data"
_VAL_BUCKETS = 1_000_000
_HASH_MASK = (1 << 63) - 1  # doc hashes fit a signed int64 Arrow column
# A launch of several processes prepares a local corpus up to this size itself (the embedded one is 1.25 MB);
# a larger one, or any Hub data set, is prepared beforehand with `llmtrain prepare`.
INLINE_PREPARE_MAX_BYTES = 64 * 2**20
# Documents cleaned and tokenized per step of a preparation: the work an interruption can lose.
CHUNK_DOCUMENTS = 1_000_000


@dataclass
class CorpusStats:
    """What data hygiene did, reported in the manifest."""

    documents_read: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    train_documents: int = 0
    val_documents: int = 0
    test_documents: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    test_tokens: int = 0
    train_bytes: int = 0
    val_bytes: int = 0
    test_bytes: int = 0

    def describe(self) -> str:
        """One line for the run's summary and `llmtrain prepare`."""
        return (
            f"{self.documents_read} documents read, {self.empty_dropped} empty and {self.duplicates_dropped} "
            f"duplicates dropped; train {self.train_tokens:,} tokens ({self.train_documents} docs), "
            f"val {self.val_tokens:,} tokens ({self.val_documents} docs), "
            f"test {self.test_tokens:,} tokens ({self.test_documents} docs)"
        )


@dataclass
class CorpusSource:
    """A resolved --data value: local files (grouped by loader) or a Hub data set."""

    spec: str
    files: dict[str, list[Path]]  # loader name ("text", "json", "parquet") -> files; empty for the Hub
    hub_id: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.hub_id is not None

    @property
    def local_bytes(self) -> int:
        """The size of the local files on disk (0 for the Hub)."""
        return sum(f.stat().st_size for files in self.files.values() for f in files)


def default_data_dir(cache_dir: Path) -> Path:
    """The embedded default data: data/ in a source checkout, otherwise regenerated into the cache."""
    if (REPO_DATA_DIR / "corpus.txt").is_file():
        return REPO_DATA_DIR
    target = cache_dir / "default-data"
    if not (target / "sft_test.jsonl").is_file():  # data generated before the test files came is made again
        from llmtrain.data.default_task import generate

        generate(target)
    return target


def resolve_corpus(spec: str, cache_dir: Path) -> CorpusSource:
    """Turn --data into files to read (or a Hub id), failing early on a missing or unreadable path."""
    if spec == "default":
        spec = str(default_data_dir(cache_dir) / "corpus.txt")
    path = Path(spec)
    if path.is_file():
        return CorpusSource(spec, {_loader_for(path): [path]})
    if path.is_dir():
        files: dict[str, list[Path]] = {}
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES):
            files.setdefault(TEXT_SUFFIXES[f.suffix], []).append(f)
        if not files:
            raise LLMTrainError(
                f"Data folder {path} holds no corpus files; expected {', '.join(sorted(TEXT_SUFFIXES))} files."
            )
        return CorpusSource(spec, files)
    looks_local = spec.startswith((".", "/", "~")) or Path(spec).suffix in TEXT_SUFFIXES or os.sep * 2 in spec
    if looks_local or spec.count("/") > 1:
        raise LLMTrainError(f"Data file {spec} does not exist. Check the path given to --data.")
    return CorpusSource(spec, {}, hub_id=spec)


def _loader_for(path: Path) -> str:
    if path.suffix not in TEXT_SUFFIXES:
        raise LLMTrainError(
            f"Cannot read {path}: unknown file type '{path.suffix}'. Use one of {', '.join(sorted(TEXT_SUFFIXES))}."
        )
    return TEXT_SUFFIXES[path.suffix]


def fingerprint_corpus(source: CorpusSource, **options: Any) -> str:
    """A hash of the local files' names, sizes and modification times (or the Hub id), plus the reading options.

    Hashing every byte would cost each process of each launch a full read of the corpus (3 s a GB). Writing a file
    in any way (an edit, a new download, a copy without its times) sets its mtime, so a changed file gets a new
    fingerprint; only a tool that puts the old time back on changed content of the same size would go unseen. A file
    merely touched is prepared again: time lost, never stale shards."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    if source.is_hub:
        h.update(f"hub:{source.hub_id}".encode())
    for files in source.files.values():
        for f in files:
            stat = f.stat()
            h.update(f"{f.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_documents(
    source: CorpusSource,
    text_field: str = "text",
    dataset_config: str | None = None,
    split: str = "train",
    streaming: bool | None = None,
    max_documents: int | None = None,
):
    """A `datasets` Dataset (or IterableDataset when streaming) with one column, 'text'."""
    import datasets

    datasets.disable_progress_bars()
    if source.is_hub:
        stream = True if streaming is None else streaming
        try:
            ds = datasets.load_dataset(source.hub_id, dataset_config, split=split, streaming=stream)
        except Exception as e:  # noqa: BLE001 - the Hub raises many kinds; the user needs one message
            raise LLMTrainError(
                f"Could not load '{source.spec}': it is not a local file or folder, and loading it as a Hub "
                f"data set failed ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})."
            ) from None
        ds = _select_text(ds, text_field, source.spec)
    else:
        parts = [_load_local(loader, files, text_field) for loader, files in source.files.items()]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if streaming:
            ds = ds.to_iterable_dataset()
    if max_documents is not None:
        ds = (
            ds.take(max_documents)
            if isinstance(ds, datasets.IterableDataset)
            else ds.select(range(min(max_documents, len(ds))))
        )
    return ds


def _load_local(loader: str, files: list[Path], text_field: str):
    import datasets

    kwargs = {"sample_by": "paragraph"} if loader == "text" else {}
    for f in files if loader in ("text", "json") else []:
        _check_utf8(f)
    try:
        ds = datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - pinpoint the bad line ourselves
        if loader == "json":
            for f in files:
                _check_jsonl(f, text_field)
        raise LLMTrainError(f"Could not read {', '.join(map(str, files))}: {e}") from None
    if loader == "text":
        return ds
    if text_field not in ds.column_names:
        if loader == "json":
            for f in files:
                _check_jsonl(f, text_field)
        raise LLMTrainError(
            f"{', '.join(map(str, files))} has no '{text_field}' field (columns: {', '.join(ds.column_names)}). "
            f"Name the field that holds the text with --text_field."
        )
    ds = _select_text(ds, text_field, ", ".join(map(str, files)))
    if loader == "json" and None in set(ds.unique("text")):
        for f in files:
            _check_jsonl(f, text_field)
    return ds


def _select_text(ds, text_field: str, where: str):
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise LLMTrainError(
            f"{where} has no '{text_field}' field (columns: {', '.join(columns)}). "
            f"Name the field that holds the text with --text_field."
        )
    if text_field != "text":
        if columns is not None and "text" in columns:
            ds = ds.remove_columns("text")
        ds = ds.rename_column(text_field, "text")
    if columns is not None:
        ds = ds.select_columns(["text"])
    return ds


def _check_utf8(path: Path) -> None:
    """Stop on a local text file that is not UTF-8, naming the line and the byte: a corpus is never trained with
    replacement characters in it. Read in blocks of whole lines; only a block that fails is split into lines."""
    with open(path, "rb") as f:
        line, pending = 1, b""
        for chunk in iter(lambda: f.read(1 << 22), b""):
            data = pending + chunk
            cut = data.rfind(b"\n") + 1
            _decode_lines(data[:cut], path, line)
            line, pending = line + data.count(b"\n", 0, cut), data[cut:]
        _decode_lines(pending, path, line)


def _decode_lines(block: bytes, path: Path, first_line: int) -> None:
    from llmtrain.data.chat import utf8_text  # the chat data's check, whose error names the line and the encoding

    try:
        block.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError:
        for i, raw in enumerate(block.split(b"\n")):
            utf8_text(raw, path, first_line + i)


def _check_jsonl(path: Path, text_field: str) -> None:
    """Find the first line of a JSON-lines file that is not JSON or lacks a string `text_field`."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LLMTrainError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg}). Fix or delete that line."
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise LLMTrainError(
                    f"{path}, line {lineno}: no string field '{text_field}' in this row. Every line must be an object "
                    f'like {{"{text_field}": "..."}}; set --text_field if the text lives under another name.'
                )


def _doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & _HASH_MASK


def documents_for_tokenizer(ds, max_chars: int = 1_000_000_000) -> Iterator[str]:
    """Stripped, non-empty documents, up to `max_chars` characters, to train a tokenizer on."""
    seen = 0
    for batch in ds.iter(batch_size=1000):
        for text in batch["text"]:
            text = (text or "").strip()
            if text:
                yield text
                seen += len(text)
                if seen >= max_chars:
                    return


# ---------------------------------------------------------------- token shards


@dataclass
class TokenShards:
    """Cached token files of a corpus: train.bin, val.bin and test.bin plus meta.json."""

    path: Path
    dtype: str
    stats: CorpusStats
    fingerprint: str

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")


def build_token_shards(
    ds,
    tokenizer,
    cache_root: Path,
    data_fingerprint: str,
    dedup: bool = True,
    val_fraction: float = 0.02,
    num_proc: int | None = None,
    test_fraction: float = 0.0,
) -> TokenShards:
    """Clean, split (train, validation, test: by document) and tokenize `ds` once; later calls with the same
    inputs reuse the cached shards."""
    key = shards_key(tokenizer, data_fingerprint, dedup, val_fraction, test_fraction)
    cached = cached_token_shards(cache_root, key)
    if cached is not None:
        return cached
    out = cache_root / key
    backend = plain_backend(tokenizer)

    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= np.iinfo(np.uint16).max + 1 else "uint32"
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LLMTrainError("The tokenizer has no EOS token; documents are separated by EOS in pretraining.")

    stats = CorpusStats()
    ds = _clean(ds, stats, dedup, num_proc)
    streaming = not hasattr(ds, "__len__")
    if streaming:
        val_threshold = int(val_fraction * _VAL_BUCKETS)
        test_threshold = val_threshold + int(test_fraction * _VAL_BUCKETS)

        def split_of(h: int) -> str:
            bucket = h % _VAL_BUCKETS
            return "val" if bucket < val_threshold else "test" if bucket < test_threshold else "train"

    else:
        # With the documents counted, hold out exactly max(1, fraction * n) of them for validation: those with the
        # smallest content hashes, so the split is by document and does not depend on file order; the test
        # documents are the next round(test_fraction * n).
        hashes = np.sort(np.asarray(ds["hash"], dtype=np.int64))
        k = max(1, round(val_fraction * len(hashes))) if len(hashes) > 1 else 0
        k_test = round(test_fraction * len(hashes)) if len(hashes) > 2 else 0
        val_set, test_set = set(hashes[:k].tolist()), set(hashes[k : k + k_test].tolist())

        def split_of(h: int) -> str:
            return "val" if h in val_set else "test" if h in test_set else "train"

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        # The Rust tokenizer directly: batched, and no warnings about documents longer than the context.
        ids = [e.ids for e in backend.encode_batch(batch["text"], add_special_tokens=False)]
        return {
            "ids": [x + [eos] for x in ids],
            "n_bytes": [len(t.encode("utf-8")) for t in batch["text"]],
        }

    if streaming:
        tokenized = ds.map(tokenize, batched=True, batch_size=1000, remove_columns=_CLEAN_COLUMNS)
    else:
        tokenized = _map_in_chunks(ds, tokenize, num_proc, remove_columns=_CLEAN_COLUMNS, desc="tokenizing")

    # Written into a folder of its own, renamed to `out` only when complete: a preparation that dies half way
    # never leaves shards that a later run would take for finished ones.
    _remove_dead_partials(out)
    tmp = out.with_name(f"{out.name}{_partial_suffix()}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with (
            open(tmp / "train.bin", "wb") as ftrain,
            open(tmp / "val.bin", "wb") as fval,
            open(tmp / "test.bin", "wb") as ftest,
        ):
            files = {"train": ftrain, "val": fval, "test": ftest}
            for batch in tokenized.iter(batch_size=1000):
                for ids, h, n_bytes in zip(batch["ids"], batch["hash"], batch["n_bytes"]):
                    split = split_of(h)
                    files[split].write(np.asarray(ids, dtype=dtype).tobytes())
                    setattr(stats, f"{split}_documents", getattr(stats, f"{split}_documents") + 1)
                    setattr(stats, f"{split}_tokens", getattr(stats, f"{split}_tokens") + len(ids))
                    setattr(stats, f"{split}_bytes", getattr(stats, f"{split}_bytes") + n_bytes)
        if stats.train_documents + stats.val_documents + stats.test_documents == 0:
            raise LLMTrainError(
                f"The corpus is empty: {stats.documents_read} documents read, all of them empty"
                f"{' or duplicates' if stats.duplicates_dropped else ''}. Give --data a corpus with text in it."
            )
        meta = {"dtype": dtype, "stats": asdict(stats), "tokenizer": _tokenizer_fingerprint(backend)}
        (tmp / "meta.json").write_text(json.dumps(meta | {"data": data_fingerprint}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # another process finished first; keep its copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return TokenShards(out, dtype, stats, key)


def shards_key(tokenizer, data_fingerprint: str, dedup: bool, val_fraction: float, test_fraction: float = 0.0) -> str:
    """The cache key of a corpus's token shards: its fingerprint, the tokenizer's and the cleaning options."""
    tok_fp = _tokenizer_fingerprint(plain_backend(tokenizer))
    split = f"{val_fraction}|{test_fraction}" if test_fraction else f"{val_fraction}"
    return hashlib.sha256(f"{data_fingerprint}|{tok_fp}|{dedup}|{split}".encode()).hexdigest()[:20]


def cached_token_shards(cache_root: Path, key: str) -> TokenShards | None:
    """The finished shards cached under `key`, or None (a folder only becomes `key` once complete)."""
    meta_file = cache_root / key / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    return TokenShards(meta_file.parent, meta["dtype"], CorpusStats(**meta["stats"]), key)


def _tokenizer_fingerprint(backend) -> str:
    return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]


def _partial_suffix() -> str:
    """Names a folder being written on this machine: `.tmp-HOST-` then the writer's process id."""
    return f".tmp-{socket.gethostname()}-"


def _remove_dead_partials(out: Path) -> None:
    """Delete the partial folders of `out` that a killed preparation on this machine left (their writer is gone),
    which can be as large as the shards; those of live processes and of other machines stay."""
    prefix = out.name + _partial_suffix()
    for partial in out.parent.iterdir() if out.parent.is_dir() else []:
        pid = partial.name[len(prefix) :]
        if partial.name.startswith(prefix) and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _map_in_chunks(ds, fn, num_proc: int | None, **kwargs: Any):
    """`ds.map(fn, batched=True)` over CHUNK_DOCUMENTS documents at a time, each in `num_proc` processes. `datasets`
    caches each finished chunk, so a preparation that is stopped starts again at the chunk it was in; one map over
    the whole corpus would split it among the processes, which all finish at the end, and lose everything."""
    import datasets

    chunks = [
        ds.select(range(start, min(start + CHUNK_DOCUMENTS, len(ds)))) if len(ds) > CHUNK_DOCUMENTS else ds
        for start in range(0, max(len(ds), 1), CHUNK_DOCUMENTS)
    ]
    done = [c.map(fn, batched=True, batch_size=1000, num_proc=_num_proc(num_proc, len(c)), **kwargs) for c in chunks]
    return done[0] if len(done) == 1 else datasets.concatenate_datasets(done)


def _num_proc(requested: int | None, n_docs: int) -> int | None:
    n = requested if requested is not None else (os.cpu_count() or 1)
    n = min(n, max(1, n_docs // 10_000))  # worker start-up costs more than it saves on small corpora
    return n if n > 1 else None


def _clean(ds, stats: CorpusStats, dedup: bool, num_proc: int | None = None):
    """Strip documents, drop empty ones and (optionally) exact duplicates; add a 'hash' column."""

    def add_hash(batch: dict[str, list]) -> dict[str, list]:
        texts = [(t or "").strip() for t in batch["text"]]
        return {"text": texts, "hash": [_doc_hash(t) for t in texts], "n_chars": [len(t) for t in texts]}

    if hasattr(ds, "__len__"):
        stats.documents_read = len(ds)
        ds = _map_in_chunks(ds, add_hash, num_proc)
        hashes = np.asarray(ds["hash"], dtype=np.int64)
        keep = np.asarray(ds["n_chars"]) > 0
        stats.empty_dropped = int((~keep).sum())
        if dedup:
            _, first = np.unique(np.where(keep, hashes, -1), return_index=True)
            unique = np.zeros_like(keep)
            unique[first] = True
            stats.duplicates_dropped = int((keep & ~unique).sum())
            keep &= unique
        return ds.select(np.flatnonzero(keep)) if not keep.all() else ds

    seen: set[int] = set()

    def keep_doc(row: dict[str, Any]) -> bool:
        stats.documents_read += 1
        if not row["text"]:
            stats.empty_dropped += 1
            return False
        if dedup:
            if row["hash"] in seen:
                stats.duplicates_dropped += 1
                return False
            seen.add(row["hash"])
        return True

    return ds.map(add_hash, batched=True, batch_size=1000).filter(keep_doc)


# Columns _clean adds that tokenizing drops.
_CLEAN_COLUMNS = ["text", "n_chars"]


# ---------------------------------------------------------------- the data of a pretraining config


@dataclass
class PretrainData:
    """What a pretraining config reads: the corpus and its fingerprint, and once prepared its tokenizer and shards."""

    corpus: CorpusSource
    fingerprint: str
    tokenizer: Any = None
    shards: TokenShards | None = None
    prepared_now: bool = False  # tokenized by this call, not found in the cache


def find_pretrain_data(cfg: PretrainConfig, model: ModelSource, cache: Path) -> PretrainData:
    """The corpus of `cfg`, with its tokenizer and token shards when `llmtrain prepare` or an earlier run made
    them. Reads no document: cheap enough for every process of every launch."""
    corpus = resolve_corpus(cfg.data, cache)
    data = PretrainData(corpus, fingerprint_corpus(corpus, **_read_options(cfg)))
    data.tokenizer = pretrain_tokenizer(cfg, model, data.fingerprint, cache)
    if data.tokenizer is not None:
        key = shards_key(data.tokenizer, data.fingerprint, cfg.dedup, cfg.val_fraction, cfg.test_fraction)
        data.shards = cached_token_shards(cache / "tokens", key)
    return data


def prepare_pretrain_data(cfg: PretrainConfig, model: ModelSource, cache: Path) -> PretrainData:
    """Read, clean and tokenize the corpus of `cfg` into cached shards (training its tokenizer first when it needs
    one), in `cfg.num_proc` processes; what is already prepared is returned as found."""
    data = find_pretrain_data(cfg, model, cache)
    if data.shards is None:
        docs = load_documents(data.corpus, streaming=cfg.streaming, **_read_options(cfg))
        if data.tokenizer is None:
            data.tokenizer = pretrain_tokenizer(cfg, model, data.fingerprint, cache, docs)
        data.shards = build_token_shards(
            docs,
            data.tokenizer,
            cache / "tokens",
            data.fingerprint,
            cfg.dedup,
            cfg.val_fraction,
            cfg.num_proc,
            cfg.test_fraction,
        )
        data.prepared_now = True
    return data


def pretrain_tokenizer(cfg: PretrainConfig, model: ModelSource, data_fp: str, cache: Path, docs=None):
    """--tokenizer if given; else the tokenizer of the model we continue from; else the one trained on this data,
    cached (trained now on `docs`; None if it is not cached and no `docs` are given)."""
    if cfg.tokenizer:
        from llmtrain.registry import resolve_model

        tok_source = resolve_model(cfg.tokenizer, cfg.runs_dir) if not Path(cfg.tokenizer).is_dir() else None
        path = tok_source.path if tok_source and tok_source.path else cfg.tokenizer
        return load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    if model.kind != "preset":
        return load_tokenizer(model.path, trust_remote_code=cfg.trust_remote_code)
    out = cache / "tokenizers" / f"{data_fp}-v{cfg.vocab_size}-c{cfg.tokenizer_train_chars}"
    if (out / "tokenizer.json").is_file():
        return load_tokenizer(out)
    if docs is None:
        return None
    tokenizer = train_tokenizer(
        documents_for_tokenizer(docs, cfg.tokenizer_train_chars), cfg.vocab_size, model_max_length=cfg.seq_len
    )
    if len(tokenizer) <= 256 + 7:
        raise LLMTrainError(f"The corpus {cfg.data} has no text to train a tokenizer on; it is empty.")
    # Saved whole or not at all, as the shards are: into a folder of this process, then renamed (a kill mid-save
    # leaves no half a tokenizer that the next run would load).
    _remove_dead_partials(out)
    partial = out.with_name(f"{out.name}{_partial_suffix()}{os.getpid()}")
    try:
        save_tokenizer(tokenizer, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.replace(partial, out)
    except OSError:  # another process saved the same tokenizer first
        shutil.rmtree(partial, ignore_errors=True)
    return tokenizer


def check_inline_preparation(
    cfg: PretrainConfig, corpus: CorpusSource, world: int, max_bytes: int = INLINE_PREPARE_MAX_BYTES
) -> None:
    """Refuse, before any process waits on another, to prepare a large corpus (or a Hub data set) inside a launch
    of several processes: the others would wait in a barrier while the main one tokenizes, and a launch whose wait
    outlasts the process group's timeout dies. One process, or a small local corpus, is prepared inline."""
    if world <= 1 or (not corpus.is_hub and corpus.local_bytes <= max_bytes):
        return
    what = f"the Hub data set {corpus.hub_id}" if corpus.is_hub else f"{cfg.data} ({corpus.local_bytes / 1e6:,.0f} MB)"
    raise LLMTrainError(
        f"{what} has no prepared token shards, and preparing it here would keep the other {world - 1} processes "
        f"waiting, possibly past the process group's timeout. Prepare it once before the launch, in parallel over "
        f"the machine's cores (resumable, and cached where this launch will look): `{prepare_command(cfg)}` "
        f"(on every machine if they do not share the cache folder), then launch again with the same options."
    )


# The options of a pretraining config that decide which shards it reads (and the tokenizer it trains).
_PREPARE_OPTIONS = (
    "data",
    "text_field",
    "dataset_config",
    "dataset_split",
    "streaming",
    "max_documents",
    "dedup",
    "val_fraction",
    "test_fraction",
    "tokenizer",
    "vocab_size",
    "tokenizer_train_chars",
    "seq_len",
    "preset",
    "runs_dir",
    "cache_dir",
)


def prepare_command(cfg: PretrainConfig) -> str:
    """The `llmtrain prepare` command line that makes the shards `cfg` reads: --data, and each option that
    decides them where it differs from its default."""
    default = type(cfg)()
    args = ["llmtrain", "prepare"]
    for name in _PREPARE_OPTIONS:
        value = getattr(cfg, name)
        if name == "data" or value != getattr(default, name):
            args += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(args)


def _read_options(cfg: PretrainConfig) -> dict[str, Any]:
    return dict(
        text_field=cfg.text_field,
        dataset_config=cfg.dataset_config,
        split=cfg.dataset_split,
        max_documents=cfg.max_documents,
    )


def decode_documents(tokens: Iterable[int], tokenizer) -> list[str]:
    """Split a token stream at EOS and decode each document (for checks and tests)."""
    docs, current = [], []
    for t in tokens:
        if t == tokenizer.eos_token_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(int(t))
    return docs
