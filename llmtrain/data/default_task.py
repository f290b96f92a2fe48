"""The default task (two-digit addition and subtraction) and its embedded data set.

A problem is ``(a, op, b)`` with ``a, b`` in 10..99 and ``op`` in ``{"+", "-"}``;
subtraction only appears with ``a >= b`` so every result is non-negative. The prompt
is ``What is 23 + 45?`` and the correct response is ``23 + 45 = 68``.

Everything under ``data/`` is produced by :func:`generate`, deterministically from a
seed, so the committed files can always be rebuilt (and a test checks that they are)::

    python -m llmtrain.data.default_task --out data

Two design rules make the later stages measurable:

* Held-out problems never reach training. 400 problems are set aside for validation and
  appear only in the ``*_val.jsonl`` files, and 400 others for the test set, only in the
  ``*_test.jsonl`` files. Every problem of the same fact family (``23 + 45``, ``45 + 23``,
  ``68 - 23``, ``68 - 45``) is kept out of every other file too, so held-out accuracy
  cannot be earned by recalling a rewording.
* The SFT training answers come from a "sloppy annotator" who drops the carry (or the
  borrow) in about 35% of the problems that need one. The preference pairs are labelled
  by :func:`check_answer`, so DPO/PPO have a real, honest gain to show over SFT.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_OPERAND = 10
MAX_OPERAND = 99
OPS = ("+", "-")

HELD_OUT_PER_OP = 200
SFT_TRAIN_ROWS = 6000
PREFS_TRAIN_ROWS = 6000
PROMPTS_TRAIN_ROWS = 2000
SAMPLE_ROWS = 10
SAMPLE_DOCUMENTS = 8
SAMPLE_FILES = (
    "corpus.txt",
    "corpus.jsonl",
    "corpus.parquet",
    "sft_prompt_response.jsonl",
    "sft_messages.jsonl",
    "sft_alpaca.jsonl",
    "sft_sharegpt.jsonl",
    "prefs.jsonl",
    "prefs_messages.jsonl",
    "prefs_hh.jsonl",
    "prefs_ultrafeedback.jsonl",
    "prompts.jsonl",
)
# The shapes of popular Hub data sets are shown on a few rows of the files above, written again.
HUB_SHAPE_SFT_ROWS = 3
HUB_SHAPE_PREFS_ROWS = 2
# ShareGPT's speaker names for the roles.
SHAREGPT_SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}

# Share of carry/borrow problems whose SFT training answer drops the carry/borrow.
SLOPPY_RATE = 0.35
# Share of preference pairs on carry/borrow problems whose rejected answer is exactly
# the sloppy one: that is the mistake the preference stage is there to fix.
DROPPED_CARRY_REJECTED_RATE = 0.5

# Corpus size: large enough for a tiny model to learn the facts, small enough to ship.
CORPUS_TARGET_BYTES = 1_250_000
SENTENCES_PER_DOCUMENT = (3, 8)
# Share of corpus facts written in the exact task wording ("What is A + B? A + B = C."),
# so the tokenizer and the pretrained model already know the format SFT will use.
QA_SHARE = 0.35
INTRO_RATE = 0.3
FILLER_RATE = 0.05

SYSTEM_PROMPT = "You are a careful arithmetic tutor. Answer with the full equation."

_QUESTION_RE = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
# An integer, with its minus sign only when the sign is not a subtraction between
# two numbers ("52-17" reads as 52 and 17, "= -3" reads as -3).
_INTEGER_RE = re.compile(r"(?<!\d)-?\d+")


@dataclass(frozen=True, order=True)
class Problem:
    """One task problem: ``a op b``."""

    a: int
    op: str
    b: int

    @property
    def result(self) -> int:
        """The correct answer."""
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def prompt(self) -> str:
        """The question as the task asks it."""
        return f"What is {self.a} {self.op} {self.b}?"

    def response(self, value: int | None = None) -> str:
        """The answer in the task's wording; ``value`` overrides the (correct) result."""
        return f"{self.a} {self.op} {self.b} = {self.result if value is None else value}"

    @property
    def needs_carry(self) -> bool:
        """True when the ones column carries (addition) or borrows (subtraction)."""
        if self.op == "+":
            return self.a % 10 + self.b % 10 >= 10
        return self.a % 10 < self.b % 10

    @property
    def sloppy_result(self) -> int:
        """The answer of someone who forgets the carry (or the borrow) into the tens.

        ``58 + 27`` gives 75 instead of 85; ``52 - 17`` gives 45 instead of 35.
        Only meaningful when :attr:`needs_carry` is true.
        """
        return self.result - 10 if self.op == "+" else self.result + 10

    @property
    def fact_key(self) -> tuple[int, int]:
        """The two addends of the underlying fact ``x + y = z``.

        ``23 + 45``, ``45 + 23``, ``68 - 23`` and ``68 - 45`` all share the key
        ``(23, 45)``: knowing one of them is knowing them all.
        """
        x, y = (self.a, self.b) if self.op == "+" else (self.b, self.result)
        return (min(x, y), max(x, y))


def is_task_problem(problem: Problem) -> bool:
    """Whether ``problem`` is inside the task: operands in range, no negative result."""
    in_range = all(MIN_OPERAND <= n <= MAX_OPERAND for n in (problem.a, problem.b))
    return in_range and problem.op in OPS and problem.result >= 0


def all_problems() -> list[Problem]:
    """Every task problem, in a fixed order (8100 additions, 4095 subtractions)."""
    operands = range(MIN_OPERAND, MAX_OPERAND + 1)
    problems = [Problem(a, op, b) for op in OPS for a in operands for b in operands]
    return [p for p in problems if is_task_problem(p)]


def parse_prompt(prompt: str) -> Problem:
    """Read the task question out of ``prompt``.

    The question may sit inside a longer text (a chat template, an earlier turn); the
    last ``What is A op B?`` wins because it is the one being answered.

    Raises:
        ValueError: if ``prompt`` holds no task question.
    """
    matches = _QUESTION_RE.findall(prompt)
    if not matches:
        raise ValueError(
            "not a default-task prompt: expected a question like 'What is 23 + 45?' "
            f"or 'What is 68 - 45?', got {_shorten(prompt)!r}"
        )
    a, op, b = matches[-1]
    problem = Problem(int(a), op, int(b))
    if not is_task_problem(problem):
        raise ValueError(
            f"not a default-task prompt: {problem.prompt!r} is outside the task "
            f"(operands {MIN_OPERAND}..{MAX_OPERAND}, subtraction only with a >= b)"
        )
    return problem


def answer_of(prompt: str) -> int:
    """The correct answer to the task question in ``prompt`` (ValueError if none)."""
    return parse_prompt(prompt).result


def last_integer(text: str) -> int | None:
    """The last integer written in ``text``, or None if there is none."""
    found = _INTEGER_RE.findall(text)
    return int(found[-1]) if found else None


def check_answer(prompt: str, response: str) -> bool:
    """Whether the last integer in ``response`` is the answer to ``prompt``'s question.

    Only the last integer counts, so ``23 + 45 = 68`` and ``68`` are both right, and a
    response that trails off into other numbers is judged on where it ended.

    Raises:
        ValueError: if ``prompt`` is not a task question.
    """
    expected = answer_of(prompt)
    return last_integer(response) == expected


def answer_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward function for RL (``--reward_fn llmtrain.data.default_task:answer_reward``): 1.0 for each
    response :func:`check_answer` accepts, else 0.0."""
    return [float(check_answer(p, r)) for p, r in zip(prompts, responses)]


def split_problems(seed: int = 0) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Split the task into (training pool, held-out problems, test problems).

    The held-out (validation) and test problems are each balanced between ``+`` and ``-`` and come from
    distinct fact families, none shared between them; the training pool excludes every problem of those
    families. The validation problems are chosen first, so adding the test set left them as they were.
    """
    rng = _rng(seed, "held-out")
    problems = all_problems()
    order = problems.copy()
    rng.shuffle(order)
    taken: set[tuple[int, int]] = set()

    def pick() -> list[Problem]:
        chosen: list[Problem] = []
        per_op = dict.fromkeys(OPS, 0)
        for problem in order:
            if per_op[problem.op] < HELD_OUT_PER_OP and problem.fact_key not in taken:
                chosen.append(problem)
                taken.add(problem.fact_key)
                per_op[problem.op] += 1
        return chosen

    held_out = pick()
    test = pick()
    train_pool = [p for p in problems if p.fact_key not in taken]
    return train_pool, held_out, test


def mistakes(problem: Problem) -> list[int]:
    """Typical wrong answers to ``problem``, without duplicates.

    Dropped carry/borrow, off by one or ten, the last two result digits swapped, the
    wrong operation; never the right answer and never negative.
    """
    right = problem.result
    candidates = [right - 1, right + 1, right - 10, right + 10]
    if problem.needs_carry:
        candidates.insert(0, problem.sloppy_result)
    digits = str(right)
    # Swap the last two digits; skip a trailing zero, which would write a leading zero.
    if len(digits) >= 2 and digits[-1] != "0":
        candidates.append(int(digits[:-2] + digits[-1] + digits[-2]))
    candidates.append(problem.a - problem.b if problem.op == "+" else problem.a + problem.b)
    wrong: list[int] = []
    for value in candidates:
        if value >= 0 and value != right and value not in wrong:
            wrong.append(value)
    return wrong


def preference_pair(problem: Problem, rng: random.Random) -> dict[str, str]:
    """A ``{prompt, chosen, rejected}`` row; chosen passes the checker, rejected fails."""
    if problem.needs_carry and rng.random() < DROPPED_CARRY_REJECTED_RATE:
        wrong = problem.sloppy_result
    else:
        wrong = rng.choice(mistakes(problem))
    # The checker, not the construction, decides which side is chosen.
    candidates = [problem.response(), problem.response(wrong)]
    good = [r for r in candidates if check_answer(problem.prompt, r)]
    bad = [r for r in candidates if not check_answer(problem.prompt, r)]
    if len(good) != 1 or len(bad) != 1:
        raise RuntimeError(f"cannot label a pair for {problem.prompt!r}: {candidates}")
    return {"prompt": problem.prompt, "chosen": good[0], "rejected": bad[0]}


def sloppy_response(problem: Problem, rng: random.Random) -> str:
    """The sloppy annotator's answer: drops the carry/borrow at :data:`SLOPPY_RATE`."""
    if problem.needs_carry and rng.random() < SLOPPY_RATE:
        return problem.response(problem.sloppy_result)
    return problem.response()


# ----------------------------------------------------------------------------- corpus

_NAMES = (
    ("Tom", "he"),
    ("Ann", "she"),
    ("Sam", "he"),
    ("Mia", "she"),
    ("Ben", "he"),
    ("Lily", "she"),
    ("Max", "he"),
    ("Eva", "she"),
)
_ITEMS = ("apples", "books", "coins", "shells", "stamps", "marbles", "cards", "pens")

# Each template states one fact in one sentence, so a sentence never mixes two facts.
_ADD_TEMPLATES = (
    "{a} plus {b} is {c}.",
    "{a} plus {b} equals {c}.",
    "{a} + {b} = {c}.",
    "The sum of {a} and {b} is {c}.",
    "Adding {b} to {a} gives {c}.",
    "If you add {a} and {b} you get {c}.",
    "{c} is {a} plus {b}.",
    "{c} minus {b} is {a}.",
    "If you take {b} from {c} you get {a}.",
    "{name} had {a} {items} and found {b} more, so now {pron} has {c} {items}.",
    "There were {a} {items} in a box and {b} more were added, making {c} in all.",
    "{name} read {a} pages on Monday and {b} pages on Tuesday, {c} pages in total.",
)
_SUB_TEMPLATES = (
    "{a} minus {b} is {c}.",
    "{a} minus {b} equals {c}.",
    "{a} - {b} = {c}.",
    "The difference between {a} and {b} is {c}.",
    "Subtracting {b} from {a} gives {c}.",
    "If you take {b} from {a} you get {c}.",
    "{c} plus {b} is {a}.",
    "{a} is {b} more than {c}.",
    "{name} had {a} {items} and gave away {b}, so now {pron} has {c} {items}.",
    "There were {a} {items} on the table and {b} were taken, leaving {c}.",
    "{name} had {a} {items} and lost {b} of them, so {pron} has {c} left.",
)
_INTROS = (
    "Here are some sums.",
    "Let us practice adding and taking away.",
    "These are facts about two-digit numbers.",
    "Read each fact and remember it.",
    "Here is some practice with numbers.",
)
# No digits here: filler must never state a fact the held-out check could miss.
_FILLER = (
    "Practice makes arithmetic easy.",
    "Adding numbers means putting two groups together.",
    "Subtracting means taking some away.",
    "To add two numbers, add the ones first and then the tens.",
    "When the ones add up to ten or more, carry one to the tens.",
    "When the top ones digit is smaller, borrow one ten.",
    "Always check your answer.",
    "A careful student writes the whole equation.",
)


def fact_sentence(problem: Problem, rng: random.Random) -> str:
    """One corpus sentence stating ``problem``'s fact in a random wording."""
    templates = _ADD_TEMPLATES if problem.op == "+" else _SUB_TEMPLATES
    name, pron = rng.choice(_NAMES)
    return rng.choice(templates).format(
        a=problem.a,
        b=problem.b,
        c=problem.result,
        name=name,
        pron=pron,
        items=rng.choice(_ITEMS),
    )


def document(rng: random.Random, next_problem: Callable[[], Problem]) -> str:
    """One paragraph of 3-8 sentences, mostly arithmetic facts, on a single line."""
    target = rng.randint(*SENTENCES_PER_DOCUMENT)
    sentences: list[str] = []
    if rng.random() < INTRO_RATE:
        sentences.append(rng.choice(_INTROS))
    while len(sentences) < target:
        left = target - len(sentences)
        if rng.random() < FILLER_RATE:
            sentences.append(rng.choice(_FILLER))
            continue
        problem = next_problem()
        if left >= 2 and rng.random() < QA_SHARE:
            # The exact task wording: question, then the full equation.
            sentences += [problem.prompt, problem.response() + "."]
        else:
            sentences.append(fact_sentence(problem, rng))
    return " ".join(sentences)


def corpus_documents(problems: list[Problem], rng: random.Random, target_bytes: int) -> list[str]:
    """Documents about ``problems`` until the corpus reaches ``target_bytes``.

    Problems are dealt from a reshuffled deck rather than sampled independently, so
    every training fact is stated about equally often.
    """
    deck: list[Problem] = []

    def next_problem() -> Problem:
        if not deck:
            deck.extend(problems)
            rng.shuffle(deck)
        return deck.pop()

    documents: list[str] = []
    size = 0
    while size < target_bytes:
        documents.append(document(rng, next_problem))
        size += len(documents[-1]) + 2  # the text plus the blank line after it
    return documents


# ------------------------------------------------------------------------- generation


def generate(out_dir: Path, seed: int = 0) -> dict[str, int]:
    """Write the default data set under ``out_dir``; the same seed gives the same bytes.

    Returns the number of rows (or documents, or bytes) of each file written.
    """
    out_dir = Path(out_dir)
    train_pool, held_out, test = split_problems(seed)
    counts: dict[str, int] = {}

    rng = _rng(seed, "corpus")
    documents = corpus_documents(train_pool, rng, CORPUS_TARGET_BYTES)
    counts["corpus_documents"] = len(documents)
    counts["corpus_bytes"] = _write_text(out_dir / "corpus.txt", documents)

    rng = _rng(seed, "sft")
    sft = [
        {"prompt": p.prompt, "response": sloppy_response(p, rng)}
        for p in _balanced_sample(train_pool, SFT_TRAIN_ROWS, rng)
    ]
    counts["sft_train"] = _write_jsonl(out_dir / "sft_train.jsonl", sft)
    sft_val = [{"prompt": p.prompt, "response": p.response()} for p in held_out]
    counts["sft_val"] = _write_jsonl(out_dir / "sft_val.jsonl", sft_val)
    sft_test = [{"prompt": p.prompt, "response": p.response()} for p in test]
    counts["sft_test"] = _write_jsonl(out_dir / "sft_test.jsonl", sft_test)

    rng = _rng(seed, "prefs")
    prefs = [preference_pair(p, rng) for p in _balanced_sample(train_pool, PREFS_TRAIN_ROWS, rng)]
    counts["prefs_train"] = _write_jsonl(out_dir / "prefs_train.jsonl", prefs)
    prefs_val = [preference_pair(p, rng) for p in held_out]
    counts["prefs_val"] = _write_jsonl(out_dir / "prefs_val.jsonl", prefs_val)
    prefs_test = [preference_pair(p, rng) for p in test]
    counts["prefs_test"] = _write_jsonl(out_dir / "prefs_test.jsonl", prefs_test)

    rng = _rng(seed, "prompts")
    prompts = [{"prompt": p.prompt} for p in _balanced_sample(train_pool, PROMPTS_TRAIN_ROWS, rng)]
    counts["prompts_train"] = _write_jsonl(out_dir / "prompts_train.jsonl", prompts)
    counts["prompts_val"] = _write_jsonl(out_dir / "prompts_val.jsonl", [{"prompt": p.prompt} for p in held_out])
    counts["prompts_test"] = _write_jsonl(out_dir / "prompts_test.jsonl", [{"prompt": p.prompt} for p in test])

    counts["samples"] = _write_samples(out_dir / "samples", train_pool, _rng(seed, "samples"))
    return counts


def _write_samples(out_dir: Path, pool: list[Problem], rng: random.Random) -> int:
    """Small files in every input format the toolkit reads; returns how many."""
    # Five row files take SAMPLE_ROWS distinct problems each.
    problems = _balanced_sample(pool, 5 * SAMPLE_ROWS, rng)

    def take(n: int = SAMPLE_ROWS) -> list[Problem]:
        if len(problems) < n:
            raise RuntimeError("sample problems ran out; raise the count drawn above")
        taken = problems[:n]
        del problems[:n]
        return taken

    def next_problem() -> Problem:
        return rng.choice(pool)

    docs = [document(rng, next_problem) for _ in range(3 * SAMPLE_DOCUMENTS)]
    _write_text(out_dir / "corpus.txt", docs[:SAMPLE_DOCUMENTS])
    _write_jsonl(
        out_dir / "corpus.jsonl",
        [{"text": d} for d in docs[SAMPLE_DOCUMENTS : 2 * SAMPLE_DOCUMENTS]],
    )
    _write_parquet(out_dir / "corpus.parquet", docs[2 * SAMPLE_DOCUMENTS :])

    _write_jsonl(
        out_dir / "sft_prompt_response.jsonl",
        [{"prompt": p.prompt, "response": p.response()} for p in take()],
    )
    messages = _message_rows(take())
    _write_jsonl(out_dir / "sft_messages.jsonl", messages)
    _write_jsonl(
        out_dir / "sft_sharegpt.jsonl", [_sharegpt_row(row["messages"]) for row in messages[:HUB_SHAPE_SFT_ROWS]]
    )
    _write_jsonl(
        out_dir / "sft_alpaca.jsonl",
        [
            # Both Alpaca shapes: the question in `input`, or alone in `instruction`.
            {"instruction": "Solve the arithmetic problem.", "input": p.prompt, "output": p.response()}
            if i % 2 == 0
            else {"instruction": p.prompt, "input": "", "output": p.response()}
            for i, p in enumerate(take())
        ],
    )

    pairs = [preference_pair(p, rng) for p in take()]
    _write_jsonl(out_dir / "prefs.jsonl", pairs)
    _write_jsonl(
        out_dir / "prefs_messages.jsonl",
        [
            {
                "prompt": ([_msg("system", SYSTEM_PROMPT)] if i % 3 == 0 else []) + [_msg("user", row["prompt"])],
                "chosen": [_msg("assistant", row["chosen"])],
                "rejected": [_msg("assistant", row["rejected"])],
            }
            for i, row in enumerate(pairs)
        ],
    )
    _write_jsonl(out_dir / "prefs_hh.jsonl", _hh_rows(pairs))
    _write_jsonl(
        out_dir / "prefs_ultrafeedback.jsonl", [_ultrafeedback_row(row) for row in pairs[:HUB_SHAPE_PREFS_ROWS]]
    )
    _write_jsonl(out_dir / "prompts.jsonl", [{"prompt": p.prompt} for p in take()])
    return len(SAMPLE_FILES)


def _message_rows(problems: list[Problem]) -> list[dict[str, Any]]:
    """Chat rows: with and without a system message, single and multi-turn."""
    rows: list[dict[str, Any]] = []
    for i in range(0, len(problems) - 1, 2):
        first, second = problems[i], problems[i + 1]
        turn = [_msg("user", first.prompt), _msg("assistant", first.response())]
        if i % 4 == 0:  # multi-turn, with a system message
            messages = [
                _msg("system", SYSTEM_PROMPT),
                *turn,
                _msg("user", second.prompt),
                _msg("assistant", second.response()),
            ]
            rows.append({"messages": messages})
        else:
            rows.append({"messages": turn})
            rows.append(
                {
                    "messages": [
                        _msg("system", SYSTEM_PROMPT),
                        _msg("user", second.prompt),
                        _msg("assistant", second.response()),
                    ]
                }
            )
    return rows


def _hh_rows(pairs: list[dict[str, str]]) -> list[dict[str, str]]:
    """HH-RLHF rows: one transcript per side, sharing everything up to the last answer."""
    rows = []
    for i, row in enumerate(pairs):
        prefix = f"\n\nHuman: {row['prompt']}\n\nAssistant:"
        if i % 3 == 2:  # a multi-turn transcript: an earlier exchange in the shared prefix
            earlier = pairs[i - 1]
            prefix = f"\n\nHuman: {earlier['prompt']}\n\nAssistant: {earlier['chosen']}" + prefix
        rows.append({"chosen": f"{prefix} {row['chosen']}", "rejected": f"{prefix} {row['rejected']}"})
    return rows


def _sharegpt_row(messages: list[dict[str, str]]) -> dict[str, Any]:
    """A chat row as ShareGPT data sets ship it (OpenHermes-2.5, SlimOrca): `conversations` of {from, value}."""
    return {"conversations": [{"from": SHAREGPT_SPEAKERS[m["role"]], "value": m["content"]} for m in messages]}


def _ultrafeedback_row(pair: dict[str, str]) -> dict[str, Any]:
    """A pair as HuggingFaceH4/ultrafeedback_binarized ships it: the prompt, repeated in both full conversations."""
    question = _msg("user", pair["prompt"])
    return {
        "prompt": pair["prompt"],
        "chosen": [question, _msg("assistant", pair["chosen"])],
        "rejected": [question, _msg("assistant", pair["rejected"])],
    }


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _rng(seed: int, stream: str) -> random.Random:
    """A private RNG per output, so changing one file's recipe leaves the others alone.

    String seeds are hashed with SHA-512 by :mod:`random`, so this is stable across runs
    and machines (unlike ``hash()``).
    """
    return random.Random(f"{seed}:{stream}")


def _balanced_sample(pool: list[Problem], n: int, rng: random.Random) -> list[Problem]:
    """``n`` distinct problems from ``pool``, half ``+`` and half ``-``, shuffled."""
    chosen: list[Problem] = []
    for op in OPS:
        chosen += rng.sample([p for p in pool if p.op == op], n // len(OPS))
    rng.shuffle(chosen)
    return chosen


def _write_text(path: Path, documents: list[str]) -> int:
    """Documents separated by one blank line; returns the file size in bytes."""
    data = "\n\n".join(documents) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("ascii"))
    return len(data)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """One JSON object per line, ``\\n`` line ends; returns the number of rows."""
    lines = [json.dumps(row) + "\n" for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(lines).encode("ascii"))
    return len(lines)


def _write_parquet(path: Path, texts: list[str]) -> None:
    """A one-column (``text``) parquet file, written the way `datasets` writes it."""
    import datasets  # imported here: heavy, and only the samples need it

    # Silence the progress bar for this write only, and leave the caller's setting as is.
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(path))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> None:
    """Command line: regenerate the default data set."""
    parser = argparse.ArgumentParser(
        prog="python -m llmtrain.data.default_task",
        description="Regenerate the embedded default data set (deterministic).",
    )
    parser.add_argument("--out", type=Path, default=Path("data"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    counts = generate(args.out, args.seed)
    for name, count in counts.items():
        print(f"{name:>17}: {count}")


if __name__ == "__main__":
    main()
