"""Chat, preference and prompt data tokenized through datasets.map and cached: the same results as the row loop."""

import copy

import pytest

import llmtrain.data.chat as chat
import llmtrain.data.preferences as preferences
from llmtrain.data import prepare
from llmtrain.data.chat import load_chat_rows, tokenize_dataset
from llmtrain.data.corpus import REPO_DATA_DIR
from llmtrain.data.preferences import PreferencePair, load_preference_pairs, tokenize_pairs
from llmtrain.data.prompts import load_prompts, tokenize_prompts
from llmtrain.data.template import ChatFormat
from llmtrain.errors import LLMTrainError
from llmtrain.tokenizer import CHAT_TEMPLATE, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread

ROWS = 300
LOOP = {"min_rows": 10**9}  # the plain loop in this process
LONG = "What is 12 + 34? " * 6
# Answers holding UNV are rendered as 'unv': their spans cannot be verified (a controlled share of the rows).
UNVERIFIABLE_TEMPLATE = CHAT_TEMPLATE.replace(
    "message['content'] + '<|end|>' }}{% endgeneration %}",
    "(message['content'] | replace('UNV', 'unv')) + '<|end|>' }}{% endgeneration %}",
)
REFUSING_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- for message in messages -%}",
    "{%- for message in messages -%}{%- if 'FORBIDDEN' in message['content'] -%}"
    "{{ raise_exception('FORBIDDEN is not allowed') }}{%- endif -%}",
)


@pytest.fixture(scope="module")
def tok():
    lines = (REPO_DATA_DIR / "corpus.txt").read_text().splitlines()[:300]
    return train_tokenizer(lines, vocab_size=400)


def _with_template(tok, template: str):
    other = copy.deepcopy(tok)
    other.chat_template = template
    return other


@pytest.fixture(scope="module")
def chats() -> list[list[dict]]:
    """The embedded task's first rows, with some long prompts (dropped at max_length 26), two-turn chats and
    answers marked UNV (unverifiable under UNVERIFIABLE_TEMPLATE)."""
    rows = load_chat_rows(str(REPO_DATA_DIR / "sft_train.jsonl"), max_rows=ROWS)
    for i in range(7, ROWS, 60):
        rows[i] = [{"role": "user", "content": LONG}, rows[i][1]]
    for i in range(11, ROWS, 50):
        rows[i] = rows[i] + rows[i + 1]
    for i in range(13, ROWS, 75):
        rows[i] = [rows[i][0], {"role": "assistant", "content": rows[i][1]["content"] + " UNV"}]
    return rows


@pytest.fixture(scope="module")
def pairs() -> list[PreferencePair]:
    pairs = load_preference_pairs(str(REPO_DATA_DIR / "prefs_train.jsonl"), max_rows=ROWS)
    for i in range(5, ROWS, 60):
        pairs[i] = PreferencePair([{"role": "user", "content": LONG}], pairs[i].chosen, pairs[i].rejected)
    for i in range(9, ROWS, 100):
        answer = [{"role": "assistant", "content": pairs[i].chosen[0]["content"] + " UNV"}]
        pairs[i] = PreferencePair(pairs[i].prompt, answer, pairs[i].rejected)
    return pairs


@pytest.fixture(scope="module")
def prompts() -> list[list[dict]]:
    rows = load_prompts(str(REPO_DATA_DIR / "prompts_train.jsonl"), max_rows=ROWS)
    for i in range(3, ROWS, 40):
        rows[i] = [{"role": "user", "content": LONG}]
    return rows


def _entries(cache) -> list[str]:
    root = cache / "prepared"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# ---------------------------------------------------------------- the same results, once tokenized


def test_chat_examples_and_stats_are_the_loops_through_map_and_cache(tok, chats, tmp_path, monkeypatch):
    unv = _with_template(tok, UNVERIFIABLE_TEMPLATE)
    expected = tokenize_dataset(unv, chats, 26, **LOOP)
    stats = expected[1]
    assert (stats.rows, stats.unverified) == (ROWS, 4) and stats.truncated > 50 and stats.dropped == 5
    assert stats.unverified_reason and len(expected[0]) == ROWS - 4 - 5
    assert tokenize_dataset(unv, chats, 26, min_rows=0, num_proc=1, cache_dir=tmp_path) == expected
    assert len(_entries(tmp_path)) == 1 and _entries(tmp_path)[0].startswith("sft-")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(chat, "tokenize_chat", no_tokenizing)
    assert tokenize_dataset(unv, chats, 26, min_rows=0, num_proc=1, cache_dir=tmp_path) == expected
    # The default threshold caches these 300 rows too, under $LLMTRAIN_CACHE when no cache_dir is given.
    assert len(chats) >= prepare.MIN_CACHED_ROWS
    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path))
    assert tokenize_dataset(unv, chats, 26) == expected


def test_pairs_and_stats_are_the_loops_through_map_and_cache(tok, pairs, tmp_path, monkeypatch):
    unv = _with_template(tok, UNVERIFIABLE_TEMPLATE)
    expected = tokenize_pairs(unv, pairs, 26, strict=False, **LOOP)
    stats = expected[1]
    assert (stats.rows, stats.unverified, stats.dropped) == (ROWS, 3, 5) and stats.truncated > 0
    mapped = tokenize_pairs(unv, pairs, 26, strict=False, min_rows=0, num_proc=1, cache_dir=tmp_path)
    assert mapped == expected

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(preferences, "answer_example", no_tokenizing)
    assert tokenize_pairs(unv, pairs, 26, strict=False, min_rows=0, cache_dir=tmp_path) == expected
    # strict is applied after the cache: 3 of 300 unverifiable is within the 2% allowed.
    assert tokenize_pairs(unv, pairs, 26, min_rows=0, cache_dir=tmp_path) == expected
    assert len(_entries(tmp_path)) == 1


def test_prompts_are_the_loops_through_map_and_cache_whatever_the_budget(tok, prompts, tmp_path, monkeypatch):
    for budget in (40, 16):
        expected = tokenize_prompts(tok, prompts, budget, **LOOP)
        assert tokenize_prompts(tok, prompts, budget, min_rows=0, cache_dir=tmp_path) == expected
        assert expected[1][0] is prompts[0]  # the caller's own conversations come back
    assert expected[2].dropped == 8
    assert len(_entries(tmp_path)) == 1  # prompts are cached before the budget applies

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(ChatFormat, "prompt_ids", no_tokenizing)
    assert tokenize_prompts(tok, prompts, 16, min_rows=0, cache_dir=tmp_path) == expected


@pytest.mark.parametrize("kind", ["sft", "pairs", "prompts"])
def test_two_worker_processes_give_what_one_gives(tok, chats, pairs, prompts, tmp_path, kind):
    def run(num_proc):
        where = {"min_rows": 0, "num_proc": num_proc, "cache_dir": tmp_path / str(num_proc)}
        if kind == "sft":
            return tokenize_dataset(tok, chats, 26, **where)
        if kind == "pairs":
            return tokenize_pairs(tok, pairs, 26, **where)
        return tokenize_prompts(tok, prompts, 16, **where)

    assert run(2) == run(1)


def test_small_inputs_are_tokenized_in_process_without_a_cache_entry(tok, chats, tmp_path):
    assert tokenize_dataset(tok, chats[:10], 26, cache_dir=tmp_path) == tokenize_dataset(tok, chats[:10], 26, **LOOP)
    assert _entries(tmp_path) == []
    assert tokenize_dataset(tok, [], 26, min_rows=0, cache_dir=tmp_path)[0] == []
    assert prepare.default_num_proc(10) == 1 and prepare.default_num_proc(10**9) >= 1


# ---------------------------------------------------------------- the key


def test_the_key_changes_with_template_tokenizer_max_length_and_data(tok, chats, tmp_path):
    def entries_after(tokenizer, rows, max_length):
        tokenize_dataset(tokenizer, rows, max_length, min_rows=0, cache_dir=tmp_path)
        return len(_entries(tmp_path))

    assert entries_after(tok, chats, 26) == 1
    assert entries_after(tok, chats, 26) == 1  # the same inputs: the same entry
    assert entries_after(tok, copy.deepcopy(chats), 26) == 1  # equal content, other objects
    # No generation markers: the same examples, derived another way, and another entry.
    plain = _with_template(tok, CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    assert tokenize_dataset(plain, chats, 26, **LOOP) == tokenize_dataset(tok, chats, 26, **LOOP)
    assert entries_after(plain, chats, 26) == 2
    added = copy.deepcopy(tok)
    added.add_tokens(["<|extra|>"])
    assert entries_after(added, chats, 26) == 3
    assert entries_after(tok, chats, 27) == 4
    edited = copy.deepcopy(chats)
    edited[-1][1]["content"] += " "
    assert entries_after(tok, edited, 26) == 5
    assert prepare.cache_key("sft", tok, chats, {"max_length": 26}) != prepare.cache_key("pairs", tok, chats, {})


# ---------------------------------------------------------------- errors keep their row numbers


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_refused_row_is_named_by_its_number_from_the_map_path(tok, chats, pairs, prompts, tmp_path, num_proc):
    refusing = _with_template(tok, REFUSING_TEMPLATE)
    bad_chats = copy.deepcopy(chats)
    bad_chats[249][0]["content"] += " FORBIDDEN"  # row 250, in the second worker's half
    bad_chats[280][0]["content"] += " FORBIDDEN"
    where = {"min_rows": 0, "num_proc": num_proc, "cache_dir": tmp_path}
    with pytest.raises(LLMTrainError) as loop_error:
        tokenize_dataset(refusing, bad_chats, 26, "chats.jsonl", **LOOP)
    with pytest.raises(LLMTrainError) as map_error:
        tokenize_dataset(refusing, bad_chats, 26, "chats.jsonl", **where)
    assert str(map_error.value) == str(loop_error.value)
    assert str(map_error.value).startswith("chats.jsonl, row 250: The chat template refuses this conversation")

    bad_pairs = copy.deepcopy(pairs)
    bad_pairs[120] = PreferencePair([{"role": "user", "content": "FORBIDDEN"}], pairs[0].chosen, pairs[0].rejected)
    with pytest.raises(LLMTrainError, match=r"^prefs.jsonl, row 121: The chat template refuses"):
        tokenize_pairs(refusing, bad_pairs, 26, "prefs.jsonl", **where)
    bad_prompts = [*prompts[:299], [{"role": "user", "content": "FORBIDDEN"}]]
    with pytest.raises(LLMTrainError, match=r"^prompts.jsonl, row 300: The chat template refuses"):
        tokenize_prompts(refusing, bad_prompts, 16, "prompts.jsonl", **where)
    assert _entries(tmp_path) == []  # a refused result is not cached


def test_too_many_unverifiable_rows_are_an_error_from_the_map_path(tok, chats, tmp_path):
    unv = _with_template(tok, UNVERIFIABLE_TEMPLATE)
    marked = copy.deepcopy(chats)
    for i in range(0, ROWS, 40):  # 8 more: 12 of 300 is over 2%
        marked[i][-1]["content"] += " UNV"
    with pytest.raises(LLMTrainError) as loop_error:
        tokenize_dataset(unv, marked, 26, "chats.jsonl", **LOOP)
    with pytest.raises(LLMTrainError) as map_error:
        tokenize_dataset(unv, marked, 26, "chats.jsonl", min_rows=0, num_proc=2, cache_dir=tmp_path)
    assert str(map_error.value) == str(loop_error.value)
    assert "could not be verified in 12 of 300 conversations" in str(map_error.value)
