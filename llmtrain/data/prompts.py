"""Prompts for RL: rows -> the conversation the policy answers -> token ids ready for generation.

A row is a plain prompt (`{"prompt": "..."}`), a prompt as a message list, a chat conversation
(`{"messages": [...]}` or ShareGPT's `{"conversations": [...]}`, answered after its last user turn;
later turns are dropped, so SFT data works as prompt data too) or an Alpaca record
(`{"instruction", "input"}`). Other keys are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.data.chat import BadRows, conversation_key, convert_rows, hub_rows, local_rows, message_list
from llmtrain.data.prepare import SKIPPED, prepare_columns, raise_first_error
from llmtrain.data.template import chat_format
from llmtrain.errors import LLMTrainError

PROMPT_SHAPES = (
    'Accepted prompt rows: {"prompt": "..."}; {"prompt": [{"role": "system"|"user", "content": "..."}, ...]} ending '
    'with a user turn; {"messages": [...]} or ShareGPT {"conversations": [{"from": "human", "value": "..."}, ...]} '
    '(the conversation up to its last user turn); or Alpaca {"instruction": "...", "input": "..."}.'
)


def load_prompts(
    spec: str,
    split: str = "train",
    dataset_config: str | None = None,
    max_rows: int | None = None,
    bad_rows: BadRows | None = None,
) -> list[list[dict]]:
    """Read a local .jsonl/.json/.parquet file, a folder of them, or a Hub data set; one conversation per row."""
    rows = local_rows(spec) if Path(spec).exists() else hub_rows(spec, split, dataset_config, max_rows)
    return convert_rows(rows, to_prompt, spec, max_rows, bad_rows)


def to_prompt(row: Any, where: str) -> list[dict]:
    """One row as the message list the policy answers (it ends with a user turn); `where` names the row."""
    if not isinstance(row, dict):
        raise LLMTrainError(f"{where}: a row must be a JSON object, found a {type(row).__name__}. {PROMPT_SHAPES}")
    if row.get("prompt") is not None:
        value = row["prompt"]
        messages = (
            [{"role": "user", "content": value}]
            if isinstance(value, str)
            else message_list(value, where, "prompt", PROMPT_SHAPES)
        )
    elif key := conversation_key(row):
        messages = message_list(row[key], where, key, PROMPT_SHAPES)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise LLMTrainError(f"{where}: the conversation has no user turn, so there is nothing to answer.")
        messages = messages[: users[-1] + 1]
    elif isinstance(row.get("instruction"), str):
        extra = row.get("input") or ""
        messages = [
            {"role": "user", "content": f"{row['instruction']}\n\n{extra}" if extra.strip() else row["instruction"]}
        ]
    else:
        keys = ", ".join(map(repr, row)) or "none"
        raise LLMTrainError(f"{where}: unrecognised prompt row (keys: {keys}). {PROMPT_SHAPES}")
    for m in messages:
        if not isinstance(m["content"], str):
            raise LLMTrainError(f"{where}: the prompt must be a string, found {type(m['content']).__name__}.")
    if messages[-1]["role"] != "user":
        raise LLMTrainError(
            f"{where}: the prompt ends with a '{messages[-1]['role']}' turn; it must end with the user turn the "
            "policy answers. Drop the trailing turns or put the question last."
        )
    if not messages[-1]["content"].strip():
        raise LLMTrainError(f"{where}: the prompt is empty. Fill in the question or delete the row.")
    return messages


def question_of(messages: list[dict]) -> str:
    """The last user turn: what a reward function or answer checker is given as the prompt."""
    return messages[-1]["content"]


@dataclass
class PromptStats:
    rows: int = 0
    dropped: int = 0  # longer than the prompt budget (max_length - max_new_tokens)


def tokenize_prompts(
    tokenizer,
    conversations: list[list[dict]],
    max_prompt_tokens: int,
    source: str = "the prompts",
    *,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
    min_rows: int | None = None,
) -> tuple[list[list[int]], list[list[dict]], PromptStats]:
    """Render each conversation with the chat template plus the assistant header; drop those over the budget.
    Returns the kept token rows, their conversations, and the counts. From `min_rows` conversations on (default
    `prepare.MIN_CACHED_ROWS`) they are tokenized with `datasets.map` in `num_proc` processes and cached under
    `cache_dir` (before the budget is applied, so the cache does not depend on it); see `llmtrain.data.prepare`."""
    stats = PromptStats(rows=len(conversations))
    chat_format(tokenizer)  # a template that cannot be used is an error before any row
    columns = prepare_columns(
        "prompts", tokenizer, conversations, _prompt_columns, _PROMPT_SCHEMA, {}, num_proc, cache_dir, min_rows
    )
    raise_first_error(columns, source)
    ids, kept = [], []
    for row, messages in zip(columns["input_ids"], conversations):
        if len(row) > max_prompt_tokens:
            stats.dropped += 1
            continue
        ids.append(row)
        kept.append(messages)
    return ids, kept, stats


_PROMPT_SCHEMA = {"error": "str", "input_ids": "ids"}


def _prompt_columns(conversations: list[list[dict]], tokenizer) -> dict[str, list]:
    """The prompt ids of each conversation, or the error that refused it (the rows after a refused one are
    skipped; the refusal is what the caller raises)."""
    fmt = chat_format(tokenizer)
    columns: dict[str, list] = {"error": [], "input_ids": []}
    refused = False
    for messages in conversations:
        row, error = [], SKIPPED if refused else ""
        if not refused:
            try:
                row = fmt.prompt_ids(messages)
            except LLMTrainError as e:
                error, refused = str(e), True
        columns["error"].append(error)
        columns["input_ids"].append(row)
    return columns
