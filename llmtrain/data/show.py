"""`llmtrain show-data`: rows as the model sees them, with the trained tokens marked, and what was dropped."""

from __future__ import annotations

import sys
from itertools import islice

from llmtrain.data.chat import (
    ACCEPTED_SHAPES,
    CONVERSATION_KEYS,
    TokenizeStats,
    Unreadable,
    hub_rows,
    local_rows,
    to_messages,
    tokenize_chat,
)
from llmtrain.data.preferences import PairStats, to_pair, tokenize_pairs
from llmtrain.data.prompts import to_prompt, tokenize_prompts
from llmtrain.data.template import IGNORE_INDEX, chat_format
from llmtrain.errors import LLMTrainError

KINDS = ("auto", "sft", "pairs", "prompts")


def show_data(tokenizer, spec: str, kind: str = "auto", rows: int = 3, max_rows: int = 1000, max_length: int = 2048):
    """Print the first `rows` rows rendered with the chat template, trained tokens marked, then the counts of
    the first `max_rows` rows: kept, truncated, dropped for length, dropped as unverifiable."""
    from pathlib import Path

    raw = local_rows(spec) if Path(spec).exists() else hub_rows(spec, "train", None, max_rows)
    raw = list(islice(raw, max_rows))
    for row, _ in raw:
        if isinstance(row, Unreadable):  # a line that is not UTF-8 or not JSON: the first one stops the showing
            raise LLMTrainError(row.reason)
    if not raw:
        raise LLMTrainError(f"{spec} holds no rows. {ACCEPTED_SHAPES}")
    kind = _kind(raw[0][0]) if kind == "auto" else kind
    fmt = chat_format(tokenizer)
    mark = _marker(sys.stdout.isatty())
    end = tokenizer.convert_ids_to_tokens(fmt.end_of_turn_id)
    how = "its {% generation %} markers" if fmt.marked else "its rendering (no {% generation %} markers)"
    print(f"chat template: answers located by {how}; end of turn {end!r} (id {fmt.end_of_turn_id})")
    if fmt.folds_system:
        print("the template has no system role: a system turn is folded into the first user turn")
    print(f"trained tokens are shown {mark[2]}\n")
    if kind == "pairs":
        pairs = [to_pair(row, where) for row, where in raw]
        kept, stats = tokenize_pairs(tokenizer, pairs, max_length, spec, strict=False)
        for (_, where), pair in islice(zip(raw, kept), rows):
            print(f"{where}, chosen:\n{_marked(tokenizer, pair.chosen.input_ids, pair.chosen.labels, mark)}\n")
            print(f"{where}, rejected:\n{_marked(tokenizer, pair.rejected.input_ids, pair.rejected.labels, mark)}\n")
        print(_counts(stats, max_length))
    elif kind == "prompts":
        conversations = [to_prompt(row, where) for row, where in raw]
        ids, _, stats = tokenize_prompts(tokenizer, conversations, max_length, spec)
        for (_, where), row in islice(zip(raw, ids), rows):
            print(f"{where} (the policy continues after the last token):\n{tokenizer.decode(row)}\n")
        print(f"{stats.rows} prompts; {stats.dropped} longer than {max_length} tokens")
    else:
        stats = TokenizeStats()
        shown = 0
        for row, where in raw:
            example = tokenize_chat(tokenizer, to_messages(row, where), max_length, stats)
            if example is not None and shown < rows:
                print(f"{where}:\n{_marked(tokenizer, example.input_ids, example.labels, mark)}\n")
                shown += 1
        print(_counts(stats, max_length))


def _kind(row) -> str:
    if isinstance(row, dict) and "chosen" in row:
        return "pairs"
    if isinstance(row, dict) and any(k in row for k in ("response", "completion", "output", *CONVERSATION_KEYS)):
        return "sft"
    return "prompts"


def _marker(tty: bool) -> tuple[str, str, str]:
    if tty:
        return "\x1b[1;32m", "\x1b[0m", "in bold green"
    return "[[", "]]", "between [[ and ]]"


def _marked(tokenizer, ids: list[int], labels: list[int], mark: tuple[str, str, str]) -> str:
    """The decoded tokens, each run of trained tokens wrapped in the markers."""
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or (labels[t] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False)
            out.append(f"{mark[0]}{text}{mark[1]}" if labels[start] != IGNORE_INDEX else text)
            start = t
    return "".join(out)


def _counts(stats: TokenizeStats | PairStats, max_length: int) -> str:
    line = stats.summary(max_length)
    if stats.unverified:
        line += (
            "\nRows whose assistant spans cannot be verified are left out of training; more than 2% of a data set "
            "is an error. Fix those rows, or train with another template (chat_template: a .jinja file or llmtrain)."
        )
    return line
