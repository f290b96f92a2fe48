"""Chat data for supervised fine-tuning: rows -> messages -> masked token examples -> batches.

A row is a prompt/response pair, a `messages` conversation, a ShareGPT `conversations` list or an
Alpaca record; every shape becomes one message list of {role, content} with string content. The loss
is on assistant tokens only (each assistant turn with its end-of-turn token), located in any chat
template's rendering and verified by `llmtrain.data.template`. Examples are batched
either padded to the batch's longest example or packed several to a row with restarting
`position_ids`, which `transformers` turns into a block-diagonal causal mask when the model gets
no attention mask and no cache (`use_cache=False`).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmtrain.data.prepare import SKIPPED, add_row_stats, gc_paused, prepare_columns, raise_first_error, stats_schema
from llmtrain.data.template import IGNORE_INDEX, Unverifiable, chat_format
from llmtrain.errors import LLMTrainError
from llmtrain.losses import over_positions

# A data set may lose this share of its conversations to spans that cannot be verified; more is an error.
MAX_UNVERIFIED_SHARE = 0.02
ROLES = ("system", "user", "assistant")
# Speakers whose turns are tool calls or tool results, in the OpenAI, Llama and ShareGPT (LLaMA-Factory) namings.
TOOL_ROLES = ("tool", "ipython", "function", "function_call", "observation")
# ShareGPT's `from` names as roles: the original ShareGPT dump names the assistant after the service it came from.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    **dict.fromkeys(("gpt", "assistant", "chatgpt", "bing", "bard", "model"), "assistant"),
}
# The keys a row's whole conversation may sit under: the OpenAI/TRL name, then ShareGPT's.
CONVERSATION_KEYS = ("messages", "conversations")
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")
ACCEPTED_SHAPES = (
    'Accepted row shapes: {"prompt": "...", "response": "..."} ("completion" may replace "response", and prompt '
    'and completion may be message lists); {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", '
    '"content": "..."}, ...]} with roles system, user and assistant, content a string or a list of text parts '
    '[{"type": "text", "text": "..."}]; ShareGPT {"conversations": [{"from": "human", "value": "..."}, {"from": '
    '"gpt", "value": "..."}, ...]}; or Alpaca {"instruction": "...", "input": "...", "output": "..."}.'
)


# ---------------------------------------------------------------- rows -> messages


def load_chat_rows(
    spec: str,
    split: str = "train",
    dataset_config: str | None = None,
    max_rows: int | None = None,
    bad_rows: BadRows | None = None,
) -> list[list[dict]]:
    """Read a local .jsonl/.json/.parquet file, a folder of them, or a Hub data set; one message list per row."""
    rows = local_rows(spec) if Path(spec).exists() else hub_rows(spec, split, dataset_config, max_rows)
    return convert_rows(rows, to_messages, spec, max_rows, bad_rows)


@dataclass
class BadRows:
    """The rows a load may skip (`max_bad_rows`): a count, or a share of the rows read when below 1; 0 makes the
    first unusable row an error. Each skipped row is kept with where it is and why."""

    allowance: float = 0
    skipped: list[dict[str, str]] = field(default_factory=list)

    def check(self, read: int, spec: str) -> None:
        allowed = self.allowance if self.allowance >= 1 else self.allowance * read
        if len(self.skipped) > allowed:
            raise LLMTrainError(
                f"{len(self.skipped):,} of the {read:,} rows of {spec} cannot be used, more than --max_bad_rows "
                f"{self.allowance:g} allows. The first: {self.skipped[0]['reason']} Fix the data, or raise "
                "--max_bad_rows (a count, or a share of the rows below 1) to skip them."
            )

    def check_some_left(self, read: int, spec: str) -> None:
        """Every row read was skipped: say so (not that the file holds no rows), with the first reason."""
        if read and len(self.skipped) == read:
            raise LLMTrainError(
                f"All {read:,} rows of {spec} were skipped as unusable under --max_bad_rows {self.allowance:g}: "
                f"none is left to use. The first: {self.skipped[0]['reason']}"
            )


@dataclass
class Unreadable:
    """A line of a data file that could not be read as a row (not UTF-8, not JSON): a bad row like any other, which
    `convert_rows` skips under --max_bad_rows or stops at."""

    reason: str


def convert_rows(rows: Iterator[tuple[Any, str]], convert, spec: str, max_rows: int | None, bad: BadRows | None):
    """`convert(row, where)` for each of the first `max_rows` rows. A row it refuses, or a line that could not be
    read (`Unreadable`), stops the load, unless `bad` allows skipping it: then it is recorded there, and the load
    stops only when more are skipped than allowed, or when every row was skipped."""
    out = []
    for row, where in islice(rows, max_rows):
        try:
            if isinstance(row, Unreadable):
                raise LLMTrainError(row.reason)
            out.append(convert(row, where))
        except LLMTrainError as e:
            if bad is None or not bad.allowance:
                raise
            bad.skipped.append({"where": where, "reason": str(e)})
            if bad.allowance >= 1:  # a count: past it, stop at once instead of reading on
                bad.check(len(out) + len(bad.skipped), spec)
    if bad is not None:
        bad.check(len(out) + len(bad.skipped), spec)
        bad.check_some_left(len(out) + len(bad.skipped), spec)
    return out


def local_rows(spec: str) -> Iterator[tuple[Any, str]]:
    """The rows of a local .jsonl/.json/.parquet file (or of every such file in a folder), each with where it is
    (file and line) for error messages."""
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
    """Each line's row, or `Unreadable` for a line that is not UTF-8 or not JSON. Read line by line here (not with
    `datasets`) so that every error names the exact line, and one broken line is one bad row, not the file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                refuse_utf16(raw, path)  # the whole file is in another encoding: no line of it is a row
            try:
                line = utf8_text(raw, path, lineno)
            except LLMTrainError as e:
                yield Unreadable(str(e)), f"{path}, line {lineno}"
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row = Unreadable(f"{path}, line {lineno}: not valid JSON ({e.msg}). Fix or delete that line.")
            yield row, f"{path}, line {lineno}"


def _json_rows(path: Path) -> Iterator[tuple[Any, str]]:
    # A .json file is either one array of rows or, as `datasets` also allows, JSON lines.
    raw = path.read_bytes()
    try:
        data = json.loads(utf8_text(raw, path))
    except LLMTrainError:
        if raw.lstrip().startswith(b"["):
            raise  # one JSON array, not UTF-8: no line of it can be read as a row on its own
        yield from _jsonl_rows(path)  # JSON lines, where a line that is not UTF-8 is one bad row
        return
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


def refuse_utf16(first: bytes, path: Path) -> None:
    """Stop on a file whose first bytes are a UTF-16 byte-order mark: the whole file is in another encoding."""
    if first.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LLMTrainError(
            f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); data files must be UTF-8. Convert "
            f"it, e.g. `iconv -f UTF-16 -t UTF-8 {path} > converted.jsonl`."
        )


def utf8_text(raw: bytes, path: Path, lineno: int | None = None) -> str:
    """Bytes as UTF-8 text (a leading byte-order mark dropped); anything else is an error naming the encoding,
    never text with replacement characters trained in silence."""
    if lineno in (None, 1):
        refuse_utf16(raw, path)
    try:
        return raw.decode("utf-8-sig" if lineno in (None, 1) else "utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}, line {lineno}" if lineno else str(path)
        raise LLMTrainError(
            f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} of the "
            f"{'line' if lineno else 'file'}); data files must be UTF-8. Convert the file (e.g. from Latin-1: "
            f"`iconv -f LATIN1 -t UTF-8 {path} > converted.jsonl`) or fix that line."
        ) from None


def _parquet_rows(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds; the user needs one message
        raise LLMTrainError(f"Could not read {path} as Parquet ({e.__class__.__name__}: {e}).") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield row, f"{path}, row {i}"


def hub_rows(spec: str, split: str, dataset_config: str | None, max_rows: int | None) -> Iterator[tuple[Any, str]]:
    """The rows of a Hub data set's split (a spec that looks like a local path is a missing file), with where."""
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
    """One row (prompt/response, messages, ShareGPT or Alpaca) as a message list; `where` names the row in errors."""
    if not isinstance(row, dict):
        raise LLMTrainError(f"{where}: a row must be a JSON object, found a {type(row).__name__}. {ACCEPTED_SHAPES}")
    if key := conversation_key(row):
        messages = message_list(row[key], where, key)
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
        prompt_messages = message_list(prompt, where, "prompt")
    if isinstance(answer, str):
        answer_messages = [{"role": "assistant", "content": _nonempty_answer(answer, where, key)}]
    else:
        answer_messages = message_list(answer, where, key)
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


def conversation_key(row: dict) -> str | None:
    """The key holding the row's whole conversation (`messages`, or ShareGPT's `conversations`), if any. A null
    value does not count: a Parquet or Hub table that mixes shapes has the column, null, in the other rows."""
    return next((key for key in CONVERSATION_KEYS if row.get(key) is not None), None)


def message_list(value: Any, where: str, key: str, shapes: str = ACCEPTED_SHAPES) -> list[dict]:
    """A row's list of messages as {role, content}, each checked by `normalized_message`; assistant answers must
    not be empty. `shapes` is the accepted-shapes text that errors end with."""
    if not isinstance(value, list) or not value:
        expected = (
            "a non-empty list of messages" if key in CONVERSATION_KEYS else "a string or a non-empty list of messages"
        )
        raise LLMTrainError(f"{where}: '{key}' must be {expected}, found {type(value).__name__}. {shapes}")
    messages = [normalized_message(message, where, i, key, shapes) for i, message in enumerate(value, 1)]
    for i, message in enumerate(messages, 1):
        if message["role"] == "assistant":
            _nonempty_answer(message["content"], where, f"message {i} of '{key}'")
    return messages


def normalized_message(message: Any, where: str, i: int, key: str, shapes: str = ACCEPTED_SHAPES) -> dict:
    """Message `i` of `key` as {role, content} with string content: from OpenAI's {role, content} or ShareGPT's
    {from, value} (its speaker names mapped to roles), content a string or a list of text parts. Tool turns,
    unknown roles and non-text parts are errors naming the row and the message."""
    if isinstance(message, dict) and "role" in message and "content" in message:
        speaker, content, roles, which = message["role"], message["content"], dict(zip(ROLES, ROLES)), "roles"
    elif isinstance(message, dict) and "from" in message and "value" in message:
        speaker, content, roles, which = message["from"], message["value"], SHAREGPT_ROLES, "ShareGPT speakers"
    else:
        raise LLMTrainError(
            f"{where}: message {i} of '{key}' must be an object with 'role' and 'content' (or ShareGPT's 'from' and "
            f"'value'). {shapes}"
        )
    if speaker in TOOL_ROLES or message.get("tool_calls"):
        raise LLMTrainError(tool_turn_error(where, i, key))
    if not isinstance(speaker, str) or speaker not in roles:
        example = "" if roles is SHAREGPT_ROLES else " (e.g. 'human' -> 'user', 'gpt' -> 'assistant')"
        raise LLMTrainError(
            f"{where}: message {i} of '{key}' has unknown role {speaker!r}; {which} must be one of "
            f"{', '.join(roles)}. Rename it{example}."
        )
    return {"role": roles[speaker], "content": message_text(content, where, i, key)}


def message_text(content: Any, where: str, i: int, key: str) -> str:
    """A message's content as one string: a string as it is, or a list of text parts joined with nothing between
    them. Templates that take part lists (Qwen2-VL, Llama 3.2 Vision, Mistral's) write text parts back to back,
    so the joined string renders as those templates render the parts, and works with text-only templates too."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise LLMTrainError(
            f"{where}: message {i} of '{key}' has {type(content).__name__} content; content must be a string or a "
            'list of text parts [{"type": "text", "text": "..."}].'
        )
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind is not None and kind != "text":
            raise LLMTrainError(
                f"{where}: message {i} of '{key}' has a part of type {kind!r}; only text is trained here. Drop the "
                "non-text parts (or the row), or train a multimodal model with a toolkit that reads them."
            )
        else:
            raise LLMTrainError(
                f"{where}: message {i} of '{key}' has a content part that is not a text part "
                f'{{"type": "text", "text": "..."}} with string text (found {part!r:.80}). Fix it or delete the row.'
            )
    return "".join(texts)


def tool_turn_error(where: str, i: int, key: str) -> str:
    """The message for a tool-call or tool-result turn, which training does not support."""
    return (
        f"{where}: message {i} of '{key}' is a tool-call or tool-result turn. Training on tool use is not supported: "
        "a tool call's arguments and a tool's result are rendered by each template in its own way, and no verified "
        "loss mask exists for them here. Drop the tool turns (or the row), or write the call and its result as plain "
        "assistant and user text."
    )


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
    """What tokenizing did: the length rule, and conversations whose assistant spans could not be verified.
    `tokens`/`trained_tokens` count the kept examples."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    unverified: int = 0
    unverified_reason: str = ""  # the first row's, as an example
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self, max_length: int) -> str:
        """A one-line account of what was kept, for the run log."""
        line = (
            f"{self.rows} conversations -> {self.rows - self.dropped - self.unverified} examples, {self.tokens} tokens "
            f"({self.trained_tokens} trained); max_length={max_length}: {self.truncated} truncated on the right, "
            f"{self.dropped} dropped (no assistant token left after truncation)"
        )
        if self.unverified:
            line += f"; {self.unverified} dropped as unverifiable ({self.unverified_reason})"
        return line


def tokenize_chat(
    tokenizer, messages: list[dict], max_length: int, stats: TokenizeStats | None = None, train_from: int = 0
) -> Example | None:
    """Render and tokenize one conversation with loss on its assistant turns (from index `train_from` on, each
    with its end-of-turn token); None if the spans cannot be verified or truncation leaves none trained."""
    stats = stats if stats is not None else TokenizeStats()
    stats.rows += 1
    try:
        encoded = chat_format(tokenizer).encode(messages, train_from)
    except Unverifiable as e:
        stats.unverified += 1
        stats.unverified_reason = stats.unverified_reason or str(e)
        return None
    input_ids, labels = encoded.input_ids, encoded.labels
    truncated = len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    trained = sum(label != IGNORE_INDEX for label in labels)
    if trained == 0:
        stats.dropped += 1
        return None
    stats.truncated += truncated
    stats.tokens += len(input_ids)
    stats.trained_tokens += trained
    return Example(input_ids, labels)


def tokenize_dataset(
    tokenizer,
    rows: Sequence[list[dict]],
    max_length: int,
    source: str = "the data",
    *,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
    min_rows: int | None = None,
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize every conversation under the length rule (truncate right, drop if nothing trained is left);
    more than a small share of unverifiable conversations is an error that names the template problem.
    From `min_rows` rows on (default `prepare.MIN_CACHED_ROWS`) the rows are tokenized with `datasets.map` in
    `num_proc` processes and cached under `cache_dir`; see `llmtrain.data.prepare`."""
    columns = prepare_columns(
        "sft", tokenizer, rows, _chat_columns, _CHAT_SCHEMA, {"max_length": max_length}, num_proc, cache_dir, min_rows
    )
    raise_first_error(columns, source)
    stats = TokenizeStats()
    add_row_stats(stats, columns)
    check_verified(stats.unverified, stats.rows, stats.unverified_reason, source)
    with gc_paused():
        examples = [
            Example(ids, labels)
            for kept, ids, labels in zip(columns["kept"], columns["input_ids"], columns["labels"])
            if kept
        ]
    return examples, stats


_STATS_FIELDS = [f.name for f in fields(TokenizeStats)]
_CHAT_SCHEMA = {
    "error": "str",
    "kept": "bool",
    "input_ids": "ids",
    "labels": "ids",
    **stats_schema(TokenizeStats),
}


def _chat_columns(conversations: list[list[dict]], tokenizer, max_length: int) -> dict[str, list]:
    """`tokenize_chat` on each conversation: its example (if kept), its own TokenizeStats, or the error that
    refused it (the rows after a refused one are skipped; the refusal is what the caller raises)."""
    columns: dict[str, list] = {name: [] for name in _CHAT_SCHEMA}
    refused = False
    for messages in conversations:
        stats, example, error = TokenizeStats(), None, ""
        if refused:
            error = SKIPPED
        else:
            try:
                example = tokenize_chat(tokenizer, messages, max_length, stats)
            except LLMTrainError as e:
                error, refused = str(e), True
        columns["error"].append(error)
        columns["kept"].append(example is not None)
        columns["input_ids"].append(example.input_ids if example is not None else [])
        columns["labels"].append(example.labels if example is not None else [])
        for name in _STATS_FIELDS:
            columns[name].append(getattr(stats, name))
    return columns


def check_verified(unverified: int, rows: int, reason: str, source: str) -> None:
    """Stop when more than MAX_UNVERIFIED_SHARE of the rows could not be given a verified loss mask."""
    if rows and unverified / rows > MAX_UNVERIFIED_SHARE:
        raise LLMTrainError(
            f"{source}: the chat template's assistant spans could not be verified in {unverified} of {rows} "
            f"conversations (for example: {reason}), more than {MAX_UNVERIFIED_SHARE:.0%}, so the loss mask cannot be "
            "trusted. See which tokens are trained with `llmtrain show-data MODEL --data FILE`; then fix the rows, or "
            "train with a template whose answers can be located (chat_template: a .jinja file with {% generation %} "
            "markers around each assistant answer and its end-of-turn token, or llmtrain)."
        )


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
    return over_positions(_cross_entropy, logits[:, :-1], targets).sum(), (targets != IGNORE_INDEX).sum()


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = logits.float().reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
