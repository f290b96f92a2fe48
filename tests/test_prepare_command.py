"""`llmtrain prepare`: a corpus prepared before the launch, found by the stage, refused inline when large."""

import os
import re
import shlex
import socket
from pathlib import Path

import datasets
import pytest
from helpers import manifest, tiny_config

from llmtrain.cli import main
from llmtrain.data import corpus as corpus_module
from llmtrain.data.corpus import (
    build_token_shards,
    cached_token_shards,
    check_inline_preparation,
    fingerprint_corpus,
    load_documents,
    resolve_corpus,
    shards_key,
)
from llmtrain.errors import LLMTrainError
from llmtrain.stages import pretrain
from llmtrain.tokenizer import train_tokenizer


def test_prepare_makes_the_shards_pretrain_reads_without_tokenizing_again(
    tmp_path, small_corpus, monkeypatch, capsys, one_thread
):
    cfg = tiny_config(tmp_path / "runs", small_corpus, cache_dir=str(tmp_path / "cache"), max_steps=3, eval_every=0)
    corpus = resolve_corpus(cfg.data, tmp_path)
    # The command a launch of several processes gives for a corpus too large to prepare inline ...
    with pytest.raises(LLMTrainError) as refused:
        check_inline_preparation(cfg, corpus, world=2, max_bytes=corpus.local_bytes - 1)
    command = re.search(r"`(llmtrain prepare [^`]+)`", str(refused.value)).group(1)
    assert main(shlex.split(command)[1:]) == 0
    (prepared,) = (tmp_path / "cache" / "tokens").iterdir()
    out = capsys.readouterr().out
    assert "prepared in" in out and str(prepared) in out and "600 documents read" in out
    assert main(shlex.split(command)[1:]) == 0 and "already prepared" in capsys.readouterr().out

    # ... makes exactly the shards the stage looks up: it reads no document and tokenizes nothing.
    def no_reading(*args, **kwargs):
        raise AssertionError("the prepared corpus was read again")

    monkeypatch.setattr(corpus_module, "load_documents", no_reading)
    run_dir = pretrain.run(cfg)
    assert manifest(run_dir)["data"]["shards"] == str(prepared)
    assert f"token shards found prepared: {prepared}" in capsys.readouterr().out


def test_only_several_processes_on_a_large_local_corpus_or_a_hub_data_set_are_refused(tmp_path, small_corpus):
    cfg = tiny_config(tmp_path, small_corpus)
    local = resolve_corpus(cfg.data, tmp_path)
    check_inline_preparation(cfg, local, world=1, max_bytes=0)  # one process prepares any corpus itself
    check_inline_preparation(cfg, local, world=8, max_bytes=local.local_bytes)  # a small corpus too
    with pytest.raises(LLMTrainError, match=r"corpus.txt \(\d+ MB\) has no prepared token shards.*7 processes"):
        check_inline_preparation(cfg, local, world=8, max_bytes=local.local_bytes - 1)
    hub = tiny_config(tmp_path, "HuggingFaceFW/fineweb", dataset_config="sample-10BT", dedup=False)
    with pytest.raises(LLMTrainError) as refused:
        check_inline_preparation(hub, resolve_corpus(hub.data, tmp_path), world=2)
    assert "the Hub data set HuggingFaceFW/fineweb has no prepared" in str(refused.value)
    assert "llmtrain prepare --data HuggingFaceFW/fineweb --dataset_config sample-10BT --dedup false" in str(
        refused.value
    )


def test_a_launch_that_finds_no_shards_asks_before_it_tokenizes(tmp_path, small_corpus, monkeypatch):
    # As if the corpus were large and two processes ran: the stage stops with the command, having tokenized nothing.
    as_if_large = lambda cfg, corpus, world: check_inline_preparation(cfg, corpus, world + 1, max_bytes=0)  # noqa: E731
    monkeypatch.setattr(pretrain, "check_inline_preparation", as_if_large)
    cfg = tiny_config(tmp_path / "runs", small_corpus, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(LLMTrainError, match="llmtrain prepare --data"):
        pretrain.run(cfg)
    assert not (tmp_path / "cache" / "tokens").exists() and not (tmp_path / "cache" / "tokenizers").exists()


def test_a_file_gets_a_new_fingerprint_when_its_size_or_time_changes_and_is_not_read(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("one\n\ntwo\n")
    source = resolve_corpus(str(path), tmp_path)
    with monkeypatch.context() as m:
        m.setattr("builtins.open", lambda *a, **k: pytest.fail("the fingerprint read the file"))
        first = fingerprint_corpus(source)
    assert fingerprint_corpus(source) == first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    touched = fingerprint_corpus(source)
    path.write_text("one\n\ntwo, three\n")
    assert len({first, touched, fingerprint_corpus(source)}) == 3


def test_an_interrupted_preparation_leaves_no_shards_and_keeps_its_finished_chunks(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"Document {i}: {i} plus {i + 1} is {2 * i + 1}." for i in range(2500)))
    source = resolve_corpus(str(path), tmp_path)
    docs, fingerprint = load_documents(source), fingerprint_corpus(source)
    tokenizer = train_tokenizer(docs[:200]["text"], vocab_size=300)
    root, key = tmp_path / "tokens", shards_key(tokenizer, fingerprint, True, 0.02)
    # What killed preparations left: the partial folder of a dead process of this machine goes, the others stay.
    partial = f"{key}.tmp-{socket.gethostname()}-"
    kept = [f"{partial}{os.getppid()}", f"{key}.tmp-othermachine-1"]
    for name in [f"{partial}999999999", *kept]:
        (root / name).mkdir(parents=True)
    monkeypatch.setattr(corpus_module, "CHUNK_DOCUMENTS", 1000)  # 3 chunks, cleaned then tokenized
    cache_folder = Path(docs.cache_files[0]["filename"]).parent
    chunk_files = lambda: len(list(cache_folder.glob("cache-*")))  # noqa: E731
    calls, maps, batches = [], datasets.Dataset.map, datasets.Dataset.iter

    def stopped_at_the_fifth_chunk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return maps(self, *args, **kwargs)

    def stopped_after_a_batch(self, *args, **kwargs):
        yield next(batches(self, *args, **kwargs))
        raise KeyboardInterrupt

    for stop, method, finished_chunks in ((stopped_at_the_fifth_chunk, "map", 4), (stopped_after_a_batch, "iter", 6)):
        with monkeypatch.context() as m:
            m.setattr(datasets.Dataset, method, stop)
            with pytest.raises(KeyboardInterrupt):
                build_token_shards(docs, tokenizer, root, fingerprint)
        assert cached_token_shards(root, key) is None and not (root / key).exists()
        assert chunk_files() == finished_chunks  # each finished chunk is kept, none is computed twice

    shards = build_token_shards(docs, tokenizer, root, fingerprint)
    assert shards.path == root / key and shards.stats.train_documents + shards.stats.val_documents == 2500
    assert chunk_files() == 6
    assert sorted(p.name for p in root.iterdir()) == sorted([key, *kept])
