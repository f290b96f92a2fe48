"""Chat data for supervised fine-tuning: rows -> messages -> masked token examples -> batches.

A row is a prompt/response pair, a `messages` conversation or an Alpaca record; every shape becomes
one message list. The loss is on assistant tokens only (each assistant turn with its end-of-turn
token), found through the `{% generation %}` markers of the chat template. Examples are batched
either padded to the batch's longest example or packed several to a row with restarting
`position_ids`, which `transformers` turns into a block-diagonal causal mask when the model gets
no attention mask and no cache (`use_cache=False`).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmtrain.errors import LLMTrainError
from llmtrain.tokenizer import CHAT_TEMPLATE

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")
ACCEPTED_SHAPES = (
    'Accepted row shapes: {"prompt": "...", "response": "..."} ("completion" may replace "response", and prompt '
    'and completion may be message lists); {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", '
    '"content": "..."}, ...]} with roles system, user and assistant; or Alpaca '
    '{"instruction": "...", "input": "...", "output": "..."}.'
)


# ---------------------------------------------------------------- rows -> messages


def load_chat_rows(
    spec: str, split: str = "train", dataset_config: str | None = None, max_rows: int | None = None
) -> list[list[dict]]:
    """Read a local .jsonl/.json/.parquet file, a folder of them, or a Hub data set; one message list per row."""
    rows = _local_rows(spec) if Path(spec).exists() else _hub_rows(spec, split, dataset_config, max_rows)
    return [to_messages(row, where) for row, where in islice(rows, max_rows)]


def _local_rows(spec: str) -> Iterator[tuple[Any, str]]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CHAT_SUFFIXES)
        if not files:
            raise LLMTrainError(
                f"Data folder {path} holds no chat files; expected {', '.join(CHAT_SUFFIXES)} files with one "
                "conversation per row."
            )
    elif path.suffix in CHAT_SUFFIXES:
        files = [path]
    else:
        raise LLMTrainError(
            f"Cannot read {path}: unknown file type '{path.suffix}'. Chat data must be {', '.join(CHAT_SUFFIXES)}."
        )
    for f in files:
        if f.suffix == ".parquet":
            yield from _parquet_rows(f)
        elif f.suffix == ".json":
            yield from _json_rows(f)
        else:
            yield from _jsonl_rows(f)


def _jsonl_rows(path: Path) -> Iterator[tuple[Any, str]]:
    # Read line by line ourselves (not with `datasets`) so every error can name the exact line.
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LLMTrainError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg}). Fix or delete that line."
                ) from None
            yield row, f"{path}, line {lineno}"


def _json_rows(path: Path) -> Iterator[tuple[Any, str]]:
    # A .json file is either one array of rows or, as `datasets` also allows, JSON lines.
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError:
        yield from _jsonl_rows(path)
        return
    if not isinstance(data, list):
        raise LLMTrainError(
            f"{path}: expected a JSON array of rows (or one JSON object per line), found a {type(data).__name__}. "
            f"{ACCEPTED_SHAPES}"
        )
    for i, row in enumerate(data, 1):
        yield row, f"{path}, row {i}"


def _parquet_rows(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds; the user needs one message
        raise LLMTrainError(f"Could not read {path} as Parquet ({e.__class__.__name__}: {e}).") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield row, f"{path}, row {i}"


def _hub_rows(spec: str, split: str, dataset_config: str | None, max_rows: int | None) -> Iterator[tuple[Any, str]]:
    looks_local = spec.startswith((".", "/", "~")) or Path(spec).suffix in CHAT_SUFFIXES or os.sep * 2 in spec
    if looks_local or spec.count("/") > 1:
        raise LLMTrainError(f"Data file {spec} does not exist. Check the path given for the chat data.")
    import datasets

    datasets.disable_progress_bars()
    try:
        # Stream when only a few rows are wanted, so a large data set is not downloaded for them.
        ds = datasets.load_dataset(spec, dataset_config, split=split, streaming=max_rows is not None)
    except Exception as e:  # noqa: BLE001 - the Hub raises many kinds; the user needs one message
        first_line = str(e).splitlines()[0] if str(e) else ""
        which = f"config '{dataset_config}', split '{split}'" if dataset_config else f"split '{split}'"
        raise LLMTrainError(
            f"Could not load '{spec}': it is not a local file or folder, and loading it as a Hub data set "
            f"({which}) failed ({e.__class__.__name__}: {first_line}). Check the path, the data set id and the split."
        ) from None
    for i, row in enumerate(ds, 1):
        yield row, f"{spec} ({split}), row {i}"


def to_messages(row: dict, where: str) -> list[dict]:
    """One row (prompt/response, messages or Alpaca) as a message list; `where` names the row in errors."""
    if not isinstance(row, dict):
        raise LLMTrainError(f"{where}: a row must be a JSON object, found a {type(row).__name__}. {ACCEPTED_SHAPES}")
    if "messages" in row:
        messages = _message_list(row["messages"], where, "messages")
    elif "prompt" in row:
        messages = _prompt_completion(row, where)
    elif "instruction" in row and "output" in row:
        messages = _alpaca(row, where)
    else:
        keys = ", ".join(map(repr, row)) or "none"
        raise LLMTrainError(f"{where}: unrecognised row shape (keys: {keys}). {ACCEPTED_SHAPES}")
    if not any(m["role"] == "assistant" for m in messages):
        raise LLMTrainError(
            f"{where}: the conversation has no assistant turn, so there is nothing to train on. "
            "Add the assistant's answer or delete the row."
        )
    return messages


def _prompt_completion(row: dict, where: str) -> list[dict]:
    if "response" in row and "completion" in row:
        raise LLMTrainError(f"{where}: the row has both 'response' and 'completion'; keep one of them.")
    key = "response" if "response" in row else "completion"
    if key not in row:
        raise LLMTrainError(f"{where}: a 'prompt' row needs a 'response' (or 'completion'). {ACCEPTED_SHAPES}")
    prompt, answer = row["prompt"], row[key]
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _message_list(prompt, where, "prompt")
    if isinstance(answer, str):
        answer_messages = [{"role": "assistant", "content": _nonempty_answer(answer, where, key)}]
    else:
        answer_messages = _message_list(answer, where, key)
    return prompt_messages + answer_messages


def _alpaca(row: dict, where: str) -> list[dict]:
    instruction, extra = row["instruction"], row.get("input") or ""
    for key, value in (("instruction", instruction), ("input", extra), ("output", row["output"])):
        if not isinstance(value, str):
            raise LLMTrainError(f"{where}: '{key}' must be a string, found {type(value).__name__}. {ACCEPTED_SHAPES}")
    # The usual Alpaca rendering: the input, when there is one, follows the instruction after a blank line.
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _nonempty_answer(row["output"], where, "output")},
    ]


def _message_list(value: Any, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        expected = "a non-empty list of messages" if key == "messages" else "a string or a non-empty list of messages"
        raise LLMTrainError(f"{where}: '{key}' must be {expected}, found {type(value).__name__}. {ACCEPTED_SHAPES}")
    messages = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise LLMTrainError(
                f"{where}: message {i} of '{key}' must be an object with 'role' and 'content'. {ACCEPTED_SHAPES}"
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise LLMTrainError(
                f"{where}: message {i} of '{key}' has unknown role {role!r}; roles must be one of "
                f"{', '.join(ROLES)}. Rename it (e.g. 'human' -> 'user', 'gpt' -> 'assistant')."
            )
        if not isinstance(content, str):
            raise LLMTrainError(
                f"{where}: message {i} of '{key}' has {type(content).__name__} content; content must be a string "
                "(multi-part or tool-call content is not supported)."
            )
        if role == "assistant":
            _nonempty_answer(content, where, f"message {i} of '{key}'")
        messages.append({"role": role, "content": content})
    return messages


def _nonempty_answer(text: Any, where: str, what: str) -> str:
    if not isinstance(text, str):
        raise LLMTrainError(f"{where}: {what} must be a string, found {type(text).__name__}. {ACCEPTED_SHAPES}")
    if not text.strip():
        raise LLMTrainError(
            f"{where}: {what} is empty; an empty answer would teach the model to stop at once. "
            "Fill in the answer or delete the row."
        )
    return text


# ---------------------------------------------------------------- messages -> examples


@dataclass
class Example:
    """One tokenized conversation: labels are the token id where trained, -100 where masked."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizeStats:
    """What tokenizing did under the length rule; `tokens`/`trained_tokens` count the kept examples."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self, max_length: int) -> str:
        """A one-line account of the length rule, for the run log."""
        return (
            f"{self.rows} conversations -> {self.rows - self.dropped} examples, {self.tokens} tokens "
            f"({self.trained_tokens} trained); max_length={max_length}: {self.truncated} truncated on the right, "
            f"{self.dropped} dropped (no assistant token left after truncation)"
        )


def ensure_chat_template(tokenizer) -> Any:
    """Give `tokenizer` the project's chat template if it has none; returns the tokenizer."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenize_chat(
    tokenizer, messages: list[dict], max_length: int, stats: TokenizeStats | None = None
) -> Example | None:
    """Render and tokenize one conversation with loss on assistant tokens; None if truncation leaves none trained."""
    if tokenizer.chat_template is None:
        raise LLMTrainError("The tokenizer has no chat template. Call ensure_chat_template(tokenizer) first.")
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        if any(m["role"] == "assistant" for m in messages):
            raise LLMTrainError(
                "The chat template marks no assistant tokens, so the loss mask is empty: the template does not wrap "
                "assistant turns in {% generation %} ... {% endgeneration %}. Use the project's template "
                "(llmtrain.tokenizer.CHAT_TEMPLATE, e.g. set tokenizer.chat_template = CHAT_TEMPLATE) or add those "
                "markers around the assistant content and its end-of-turn token."
            )
        raise LLMTrainError("A conversation without an assistant turn has nothing to train on; see to_messages.")
    labels = [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask)]
    # Nothing precedes the first token, so it is never a target; this also keeps packed examples apart.
    labels[0] = IGNORE_INDEX
    truncated = len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    trained = sum(label != IGNORE_INDEX for label in labels)
    if stats is not None:
        stats.rows += 1
        if trained == 0:
            stats.dropped += 1
        else:
            stats.truncated += truncated
            stats.tokens += len(input_ids)
            stats.trained_tokens += trained
    return Example(input_ids, labels) if trained else None


def tokenize_dataset(tokenizer, rows: Sequence[list[dict]], max_length: int) -> tuple[list[Example], TokenizeStats]:
    """Tokenize every conversation under the length rule (truncate right, drop if nothing trained is left)."""
    stats = TokenizeStats()
    examples = [tokenize_chat(tokenizer, messages, max_length, stats) for messages in rows]
    return [e for e in examples if e is not None], stats


# ---------------------------------------------------------------- packing and batches


@dataclass
class Packed:
    """Several examples in one row; position_ids restart at 0 for each, which keeps their attention apart."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Packed]:
    """Best-fit-decreasing packing into rows of at most `max_length` tokens; run the model with use_cache=False."""
    rows: list[Packed] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: the best fit is the first that fits
    for ex in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(ex.input_ids)
        if n > max_length:
            raise LLMTrainError(
                f"An example of {n} tokens does not fit max_length={max_length}; tokenize with the same max_length."
            )
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            space, row_index = free.pop(i)
        else:
            space, row_index = max_length, len(rows)
            rows.append(Packed())
        row = rows[row_index]
        row.input_ids += ex.input_ids
        # The first token of each example is never a target, so no loss crosses from one example into the next.
        row.labels += [IGNORE_INDEX, *ex.labels[1:]]
        row.position_ids += range(n)
        bisect.insort(free, (space - n, row_index))
    return rows


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example in this batch: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(rows: Sequence[Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows as input_ids, labels, position_ids and NO attention_mask (it would disable per-example masking)."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    # Padding restarts at position 0, so transformers sees it as one more document that nothing real attends to.
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        position_ids[i, :n] = torch.tensor(r.position_ids)
        position_ids[i, n:] = torch.arange(width - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy summed over trained tokens, and their count (average across micro-batches later)."""
    # labels[i] is the token at position i, so position t is scored on the token at t + 1.
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (targets != IGNORE_INDEX).sum()
