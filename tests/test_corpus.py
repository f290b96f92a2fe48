import json

import numpy as np
import pytest

from llmtrain.data.corpus import (
    build_token_shards,
    decode_documents,
    fingerprint_corpus,
    load_documents,
    resolve_corpus,
)
from llmtrain.errors import LLMTrainError
from llmtrain.tokenizer import train_tokenizer

DOCS = [f"Document {i}: {i} plus {i + 1} is {2 * i + 1}. Some words, here and there." for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, vocab_size=300)


def shards_for(path, tokenizer, cache, **kwargs):
    source = resolve_corpus(str(path), cache)
    ds = load_documents(source, **{k: v for k, v in kwargs.items() if k == "text_field"})
    opts = {k: v for k, v in kwargs.items() if k != "text_field"}
    return build_token_shards(ds, tokenizer, cache / "tokens", fingerprint_corpus(source), **opts)


def test_shards_decode_back_to_the_cleaned_documents(tmp_path, tokenizer):
    corpus = tmp_path / "c.txt"
    # A duplicate, an empty paragraph (extra blank lines) and surrounding whitespace are cleaned away.
    corpus.write_text("\n\n".join(DOCS + [DOCS[3]]) + "\n\n\n\n  \n\n" + "  padded doc  \n")
    shards = shards_for(corpus, tokenizer, tmp_path, val_fraction=0.1)
    decoded = decode_documents(shards.tokens("train"), tokenizer) + decode_documents(shards.tokens("val"), tokenizer)
    assert sorted(decoded) == sorted(DOCS + ["padded doc"])
    s = shards.stats
    assert s.duplicates_dropped == 1 and s.empty_dropped == 1 and s.documents_read == 123
    assert s.val_documents == round(0.1 * 121) and s.train_documents + s.val_documents == 121
    assert s.train_tokens == len(shards.tokens("train")) and shards.dtype == "uint16"
    assert s.val_bytes == sum(len(d.encode()) for d in decode_documents(shards.tokens("val"), tokenizer))


def test_dedup_can_be_switched_off(tmp_path, tokenizer):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(DOCS[:20] * 2))
    shards = shards_for(corpus, tokenizer, tmp_path, dedup=False)
    assert shards.stats.duplicates_dropped == 0
    assert shards.stats.train_documents + shards.stats.val_documents == 40


def test_shards_are_cached_by_data_and_tokenizer(tmp_path, tokenizer):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(DOCS))
    first = shards_for(corpus, tokenizer, tmp_path)
    (first.path / "marker").write_text("still here")
    again = shards_for(corpus, tokenizer, tmp_path)
    assert again.path == first.path and (again.path / "marker").exists()
    corpus.write_text("\n\n".join(DOCS[:-1]))
    assert shards_for(corpus, tokenizer, tmp_path).path != first.path


def test_jsonl_parquet_and_folders_are_read_alike(tmp_path, tokenizer):
    import datasets

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[:60])))
    datasets.Dataset.from_dict({"text": DOCS[60:]}).to_parquet(str(folder / "b.parquet"))
    shards = shards_for(folder, tokenizer, tmp_path)
    decoded = decode_documents(shards.tokens("train"), tokenizer) + decode_documents(shards.tokens("val"), tokenizer)
    assert sorted(decoded) == sorted(DOCS)


def test_a_custom_text_field_is_used(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS[:30]))
    shards = shards_for(path, tokenizer, tmp_path, text_field="body")
    assert shards.stats.documents_read == 30


def test_bad_json_line_is_named_with_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "fine too"}) + "\n{not json\n")
    with pytest.raises(LLMTrainError, match=r"c\.jsonl, line 3: not valid JSON"):
        shards_for(path, tokenizer, tmp_path)


@pytest.mark.parametrize("name", ["c.txt", "c.jsonl"])
def test_a_corpus_that_is_not_utf8_is_refused_naming_the_line_and_the_encoding(tmp_path, tokenizer, name):
    path = tmp_path / name
    rows = ['{"text": "fine"}', '{"text": "Café au lait"}'] if name.endswith(".jsonl") else ["fine", "Café au lait"]
    path.write_bytes("".join(f"{row}\n" for row in rows).encode("latin-1"))  # é is the one byte 0xe9 there
    with pytest.raises(LLMTrainError, match=rf"{name}, line 2: not UTF-8 text \(byte 0xe9.*iconv -f LATIN1"):
        shards_for(path, tokenizer, tmp_path)
    path.write_bytes("fine".encode("utf-16"))
    with pytest.raises(LLMTrainError, match="is UTF-16 text.*iconv -f UTF-16"):
        shards_for(path, tokenizer, tmp_path)


def test_missing_text_field_is_named_with_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(LLMTrainError, match=r"c\.jsonl, line 2: no string field 'text'"):
        shards_for(path, tokenizer, tmp_path)
    other = tmp_path / "d.jsonl"
    other.write_text(json.dumps({"body": "a"}) + "\n")
    with pytest.raises(LLMTrainError, match=r"d\.jsonl.*'text'.*--text_field"):
        shards_for(other, tokenizer, tmp_path)


def test_missing_file_and_unknown_type_are_reported(tmp_path):
    with pytest.raises(LLMTrainError, match=r"missing\.txt does not exist"):
        resolve_corpus(str(tmp_path / "missing.txt"), tmp_path)
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(LLMTrainError, match=r"unknown file type '\.csv'"):
        resolve_corpus(str(tmp_path / "c.csv"), tmp_path)


def test_empty_corpus_is_reported(tmp_path, tokenizer):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n   \n\n")
    with pytest.raises(LLMTrainError, match="The corpus is empty"):
        shards_for(path, tokenizer, tmp_path)


def test_large_vocabularies_use_uint32_tokens(tmp_path):
    class Wide:
        """A tokenizer stand-in that reports 70k tokens: only the dtype choice is under test."""

        def __init__(self, inner):
            self.inner = inner
            self.backend_tokenizer = inner.backend_tokenizer
            self.eos_token_id = inner.eos_token_id

        def __len__(self):
            return 70_000

    inner = train_tokenizer(DOCS, vocab_size=300)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(DOCS))
    shards = shards_for(corpus, Wide(inner), tmp_path)
    assert shards.dtype == "uint32" and shards.tokens("train").dtype == np.uint32


def test_a_tokenizer_saved_after_padded_batches_does_not_pad_the_corpus(tmp_path):
    from llmtrain.tokenizer import load_tokenizer, save_tokenizer

    tok = train_tokenizer(DOCS, vocab_size=300)
    tok.padding_side = "left"
    tok(["short", "a much longer text here"], padding=True)  # switches padding on in the Rust backend
    save_tokenizer(tok, tmp_path / "tok")
    reloaded = load_tokenizer(tmp_path / "tok")
    reloaded(["short", "a much longer text here"], padding=True)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(DOCS))
    shards = shards_for(corpus, reloaded, tmp_path)
    assert reloaded.pad_token_id not in set(shards.tokens("train").tolist())
    assert sorted(
        decode_documents(shards.tokens("train"), reloaded) + decode_documents(shards.tokens("val"), reloaded)
    ) == sorted(DOCS)


def test_streaming_reads_the_same_documents_as_the_in_memory_path(tmp_path, tokenizer):
    corpus = tmp_path / "c.jsonl"
    rows = DOCS + [DOCS[0], ""]  # one duplicate and one empty document
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in rows))
    source = resolve_corpus(str(corpus), tmp_path)
    stream = load_documents(source, streaming=True)
    shards = build_token_shards(stream, tokenizer, tmp_path / "stream-tokens", fingerprint_corpus(source))
    s = shards.stats
    assert (s.documents_read, s.duplicates_dropped, s.empty_dropped) == (122, 1, 1)
    decoded = decode_documents(shards.tokens("train"), tokenizer) + decode_documents(shards.tokens("val"), tokenizer)
    assert sorted(decoded) == sorted(DOCS)


def test_an_unreachable_hub_data_set_is_reported(tmp_path):
    source = resolve_corpus("someone/no-such-corpus", tmp_path)
    assert source.is_hub
    with pytest.raises(LLMTrainError, match="Could not load 'someone/no-such-corpus'.*Hub data set failed"):
        load_documents(source)


def test_a_tokenizer_save_cut_short_leaves_no_cached_tokenizer(tmp_path, monkeypatch):
    from llmtrain.config import PretrainConfig
    from llmtrain.data import corpus
    from llmtrain.registry import ModelSource

    cfg = PretrainConfig(data="c.txt", vocab_size=300, tokenizer_train_chars=10_000)
    docs = load_documents(resolve_corpus(str(write_corpus(tmp_path)), tmp_path))

    def killed_mid_save(tokenizer, folder):
        (folder / "tokenizer.json").parent.mkdir(parents=True)
        (folder / "tokenizer.json").write_text('{"truncated')
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "save_tokenizer", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        corpus.pretrain_tokenizer(cfg, ModelSource("preset", "gpt-nano"), "fp", tmp_path, docs)
    assert not list((tmp_path / "tokenizers").glob("fp-*"))  # no folder a later run would load as the cache
    monkeypatch.undo()
    first = corpus.pretrain_tokenizer(cfg, ModelSource("preset", "gpt-nano"), "fp", tmp_path, docs)
    cached = corpus.pretrain_tokenizer(cfg, ModelSource("preset", "gpt-nano"), "fp", tmp_path)  # no docs: cache
    assert cached is not None and cached.get_vocab() == first.get_vocab()


def write_corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(DOCS))
    return path
