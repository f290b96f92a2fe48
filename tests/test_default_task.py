"""The default task's checker and its embedded data set under data/."""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmtrain.data.default_task import (
    Problem,
    answer_of,
    check_answer,
    generate,
    parse_prompt,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
TRAIN_FILES = ("sft_train.jsonl", "prefs_train.jsonl", "prompts_train.jsonl")
VAL_FILES = ("sft_val.jsonl", "prefs_val.jsonl", "prompts_val.jsonl")
TEST_FILES = ("sft_test.jsonl", "prefs_test.jsonl", "prompts_test.jsonl")
SAMPLE_FILES = (
    "corpus.txt",
    "corpus.jsonl",
    "corpus.parquet",
    "sft_prompt_response.jsonl",
    "sft_messages.jsonl",
    "sft_alpaca.jsonl",
    "prefs.jsonl",
    "prefs_messages.jsonl",
    "prefs_hh.jsonl",
    "prompts.jsonl",
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def files_under(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two fresh generations with the default seed."""
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    counts = generate(first)
    assert counts == generate(second)
    return first, second


def fact_keys(name: str) -> set[tuple[int, int]]:
    return {parse_prompt(r["prompt"]).fact_key for r in read_jsonl(DATA_DIR / name)}


@pytest.fixture(scope="module")
def held_out_keys() -> set[tuple[int, int]]:
    """The fact families of the validation and the test problems: none may reach a training file."""
    return fact_keys("prompts_val.jsonl") | fact_keys("prompts_test.jsonl")


# ------------------------------------------------------------------------------ checker


def test_checker_accepts_right_and_rejects_wrong_answers() -> None:
    assert check_answer("What is 23 + 45?", "23 + 45 = 68")
    assert check_answer("What is 23 + 45?", "68")
    assert check_answer("What is 52 - 17?", "52 - 17 = 35.")
    assert check_answer("What is 45 - 45?", "45 - 45 = 0")
    # The question can sit inside a chat transcript; the last one is being answered.
    assert check_answer("<|user|>\nWhat is 10 + 10?<|end|><|user|>\nWhat is 58 + 27?", "85")
    assert not check_answer("What is 58 + 27?", "58 + 27 = 75")
    assert not check_answer("What is 52 - 17?", "52 - 17 = 45")
    assert not check_answer("What is 23 + 45?", "")
    assert not check_answer("What is 23 + 45?", "68 or maybe 69")
    assert not check_answer("What is 45 + 23?", "45 - 23 = -22")
    assert answer_of("What is 99 + 99?") == 198
    assert answer_of("What is 60 - 13?") == 47


@pytest.mark.parametrize(
    "prompt",
    ["Hello there", "", "What is 5 + 3?", "What is 23 - 45?", "What is 123 + 4?", "23 + 45"],
)
def test_checker_rejects_prompts_outside_the_task(prompt: str) -> None:
    with pytest.raises(ValueError, match="not a default-task prompt"):
        check_answer(prompt, "68")


# ------------------------------------------------------------------- generator and data


def test_generate_is_deterministic(runs: tuple[Path, Path]) -> None:
    first, second = runs
    assert files_under(first) == files_under(second)
    for rel in files_under(first):
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


def test_committed_data_matches_the_generator(runs: tuple[Path, Path]) -> None:
    fresh = runs[0]
    for rel in files_under(fresh):
        committed = DATA_DIR / rel
        assert committed.is_file(), f"{rel} missing: run python -m llmtrain.data.default_task"
        if rel.suffix == ".parquet":
            # Parquet bytes carry the writer's version, so compare the contents.
            assert pq.read_table(committed).to_pydict() == pq.read_table(fresh / rel).to_pydict()
        else:
            assert committed.read_bytes() == (fresh / rel).read_bytes(), f"{rel} drifted"


def test_training_files_hold_6000_rows_and_held_out_files_the_same_400_prompts() -> None:
    for name in ("sft_train.jsonl", "prefs_train.jsonl"):
        assert len(read_jsonl(DATA_DIR / name)) == 6000
    for files in (VAL_FILES, TEST_FILES):
        prompts = [r["prompt"] for r in read_jsonl(DATA_DIR / files[-1])]
        assert len(prompts) == len(set(prompts)) == 400
        assert sum(parse_prompt(p).op == "+" for p in prompts) == 200
        for name in files:
            assert [r["prompt"] for r in read_jsonl(DATA_DIR / name)] == prompts


def test_validation_and_test_problems_share_no_fact_family() -> None:
    assert len(fact_keys("prompts_val.jsonl")) == len(fact_keys("prompts_test.jsonl")) == 400
    assert not fact_keys("prompts_val.jsonl") & fact_keys("prompts_test.jsonl")


def test_no_held_out_problem_in_any_training_file(held_out_keys: set[tuple[int, int]]) -> None:
    assert len(held_out_keys) == 800
    # Training rows, and the samples (someone may train on those too).
    row_files = [DATA_DIR / name for name in TRAIN_FILES]
    row_files += sorted((DATA_DIR / "samples").glob("*.jsonl"))
    for path in row_files:
        text = path.read_text(encoding="utf-8")
        for a, op, b in re.findall(r"(\d+) ([+-]) (\d+)", text):
            assert Problem(int(a), op, int(b)).fact_key not in held_out_keys, (path, a, op, b)

    corpus = (DATA_DIR / "corpus.txt").read_text(encoding="ascii")
    corpus += (DATA_DIR / "samples" / "corpus.txt").read_text(encoding="ascii")
    # Every "A op B" written in the corpus...
    for a, op, b in re.findall(r"(\d+) ([+-]) (\d+)", corpus):
        assert Problem(int(a), op, int(b)).fact_key not in held_out_keys, (a, op, b)
    # ...and every fact stated in words: a sentence holding x, y and x + y.
    for sentence in re.split(r"(?<=[.?!])\s+", corpus):
        numbers = [int(n) for n in re.findall(r"\d+", sentence)]
        for x, y in combinations(numbers, 2):
            if x + y in numbers:
                assert (min(x, y), max(x, y)) not in held_out_keys, sentence


def test_corpus_is_ascii_one_line_documents_of_three_to_eight_sentences() -> None:
    raw = (DATA_DIR / "corpus.txt").read_bytes()
    assert 1_000_000 <= len(raw) <= 1_500_000
    text = raw.decode("ascii")
    assert "\n\n\n" not in text and text.endswith("\n") and not text.endswith("\n\n")
    documents = text.rstrip("\n").split("\n\n")
    assert len(documents) > 5000
    for doc in documents:
        assert doc.strip() and "\n" not in doc
        assert 3 <= len(re.findall(r"[.?!](?=\s|$)", doc)) <= 8, doc
    assert text.count("What is ") > 5000  # the task's own wording is common


def test_preference_pairs_are_labelled_by_the_checker() -> None:
    for name in ("prefs_train.jsonl", "prefs_val.jsonl", "samples/prefs.jsonl"):
        for row in read_jsonl(DATA_DIR / name):
            assert row["chosen"] != row["rejected"]
            assert check_answer(row["prompt"], row["chosen"]), row
            assert not check_answer(row["prompt"], row["rejected"]), row


def test_sloppy_annotator_drops_about_35_percent_of_carries() -> None:
    carry_wrong = carry_total = 0
    for row in read_jsonl(DATA_DIR / "sft_train.jsonl"):
        problem = parse_prompt(row["prompt"])
        right = check_answer(row["prompt"], row["response"])
        if problem.needs_carry:
            carry_total += 1
            carry_wrong += not right
            if not right:
                assert row["response"] == problem.response(problem.sloppy_result)
        else:
            assert right, row
    assert carry_total > 1000
    assert 0.27 <= carry_wrong / carry_total <= 0.43
    for row in read_jsonl(DATA_DIR / "sft_val.jsonl"):
        assert check_answer(row["prompt"], row["response"]), row


def test_samples_cover_every_input_format() -> None:
    samples = DATA_DIR / "samples"
    for name in SAMPLE_FILES:
        path = samples / name
        if name.endswith(".parquet"):
            rows = pq.read_table(path).column("text").to_pylist()
        elif name.endswith(".txt"):
            rows = path.read_text(encoding="ascii").rstrip("\n").split("\n\n")
        else:
            rows = read_jsonl(path)
        assert 5 <= len(rows) <= 20, name
    messages = read_jsonl(samples / "sft_messages.jsonl")
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in messages)
    for row in read_jsonl(samples / "prefs_hh.jsonl"):
        assert row["chosen"].startswith("\n\nHuman: ")
        cut = row["chosen"].rindex("\n\nAssistant: ") + len("\n\nAssistant: ")
        assert row["rejected"][:cut] == row["chosen"][:cut]
