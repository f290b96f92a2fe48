"""Preference pairs for the reward model and DPO: rows -> (prompt, chosen, rejected) -> token pairs -> batches.

A row is a prompt with two answers (strings or TRL's message lists) or two full conversations
(message lists or HH-RLHF text) that share the prompt and are split at their longest common prefix;
a `prompt` field beside full conversations (UltraFeedback's shape) must be their last shared user turn.
Each side is rendered with the chat template as prompt + answer and labelled on the answer's
assistant tokens only (end-of-turn included), so `sequence_logprobs` sums exactly what DPO compares.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from llmtrain.data.chat import (
    BadRows,
    Example,
    check_verified,
    collate_padded,
    convert_rows,
    hub_rows,
    local_rows,
    normalized_message,
)
from llmtrain.data.prepare import SKIPPED, add_row_stats, gc_paused, prepare_columns, raise_first_error, stats_schema
from llmtrain.data.template import IGNORE_INDEX, Unverifiable, chat_format
from llmtrain.errors import LLMTrainError
from llmtrain.losses import over_positions

PREFERENCE_SHAPES = (
    'Accepted preference shapes: {"prompt": "...", "chosen": "...", "rejected": "..."}; the same with message lists '
    '({"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", "content": "..."}], '
    '"rejected": [...]}); two full conversations that share the prompt {"chosen": [messages], "rejected": '
    '[messages]}, with or without a "prompt" that repeats their last shared user turn (UltraFeedback); or HH-RLHF '
    'text {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}. Messages may also be ShareGPT '
    '{"from": "human"|"gpt", "value": "..."}, and content a list of text parts.'
)
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    """The conversation before the answer, and the two assistant answers that complete it."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


# ---------------------------------------------------------------- rows -> pairs


def load_preference_pairs(
    spec: str,
    split: str = "train",
    dataset_config: str | None = None,
    max_rows: int | None = None,
    bad_rows: BadRows | None = None,
) -> list[PreferencePair]:
    """Read a local .jsonl/.json/.parquet file, a folder of them, or a Hub data set; one pair per row."""
    rows = local_rows(spec) if Path(spec).exists() else hub_rows(spec, split, dataset_config, max_rows)
    return convert_rows(rows, to_pair, spec, max_rows, bad_rows)


def to_pair(row: dict, where: str) -> PreferencePair:
    """One row in any accepted shape as a PreferencePair; `where` names the row in errors."""
    if not isinstance(row, dict):
        raise LLMTrainError(f"{where}: a row must be a JSON object, found a {type(row).__name__}. {PREFERENCE_SHAPES}")
    missing = [key for key in ("chosen", "rejected") if key not in row]
    if missing:
        keys = ", ".join(map(repr, row)) or "none"
        raise LLMTrainError(
            f"{where}: the row has no {' and no '.join(map(repr, missing))} (keys: {keys}). {PREFERENCE_SHAPES}"
        )
    # A Parquet or Hub table may carry a `prompt` column that is null for this row: then the sides hold it.
    if row.get("prompt") is None:
        return _split_at_shared_prefix(*_conversations(row["chosen"], row["rejected"], where), where)
    prompt = _prompt(row["prompt"], where)
    chosen, rejected = _side(row["chosen"], where, "chosen"), _side(row["rejected"], where, "rejected")
    if _holds_prompt_turns(chosen) and _holds_prompt_turns(rejected):
        # UltraFeedback's shape (HuggingFaceH4/ultrafeedback_binarized): both sides repeat the prompt in full.
        pair = _split_at_shared_prefix(chosen, rejected, where)
        _check_prompt_repeated(prompt, pair.prompt, where)
        return pair
    pair = PreferencePair(
        prompt,
        _answer(chosen, where, "chosen", isinstance(row["chosen"], list)),
        _answer(rejected, where, "rejected", isinstance(row["rejected"], list)),
    )
    _check_different(pair.chosen, pair.rejected, where)
    return pair


def _prompt(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    else:
        messages = _messages(value, where, "prompt")
    if not any(m["content"].strip() for m in messages):
        raise LLMTrainError(f"{where}: 'prompt' is empty. Fill in the question or delete the row.")
    return messages


def _side(value: Any, where: str, key: str) -> list[dict]:
    """'chosen' or 'rejected' beside a 'prompt' field: an answer string, or a message list."""
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, where, key)


def _holds_prompt_turns(messages: list[dict]) -> bool:
    return any(m["role"] != "assistant" for m in messages)


def _answer(messages: list[dict], where: str, key: str, listed: bool) -> list[dict]:
    """The side's messages, checked to be the assistant's answer only, none empty; `listed`: given as a list."""
    for i, message in enumerate(messages, 1):
        if message["role"] != "assistant":
            raise LLMTrainError(
                f"{where}: message {i} of '{key}' is a '{message['role']}' turn, but with a 'prompt' field "
                f"'{key}' must hold only the assistant's answer, unless 'chosen' and 'rejected' are both full "
                "conversations that repeat the prompt (as in UltraFeedback). Move earlier turns into 'prompt', or give "
                "full conversations on both sides."
            )
        _nonempty(message["content"], where, f"message {i} of '{key}'" if listed else f"'{key}'")
    return messages


def _check_prompt_repeated(prompt: list[dict], shared: list[dict], where: str) -> None:
    """With full conversations on both sides, the `prompt` field must ask what they ask: its last user turn is
    their last shared user turn (outer whitespace aside). Otherwise the row mixes up two questions."""
    asked, repeated = _last_user_turn(prompt), _last_user_turn(shared)
    if asked is None or repeated is None or prompt[asked]["content"].strip() != shared[repeated]["content"].strip():
        which = f"message {repeated + 1}" if repeated is not None else "none: they share no user turn"
        raise LLMTrainError(
            f"{where}: 'prompt' is not the last user turn that 'chosen' and 'rejected' share ({which}). With full "
            "conversations on both sides, 'prompt' must repeat their question word for word; fix the row, or drop "
            "'prompt' (the conversations hold it)."
        )


def _last_user_turn(messages: list[dict]) -> int | None:
    return next((i for i in reversed(range(len(messages))) if messages[i]["role"] == "user"), None)


def _messages(value: Any, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise LLMTrainError(
            f"{where}: '{key}' must be a string or a non-empty list of messages, found {type(value).__name__}. "
            f"{PREFERENCE_SHAPES}"
        )
    return [normalized_message(message, where, i, key, PREFERENCE_SHAPES) for i, message in enumerate(value, 1)]


def _nonempty(text: Any, where: str, what: str) -> None:
    if not isinstance(text, str):
        raise LLMTrainError(f"{where}: {what} must be a string, found {type(text).__name__}. {PREFERENCE_SHAPES}")
    if not text.strip():
        raise LLMTrainError(
            f"{where}: {what} is empty; a preference needs two real answers. Fill in the answer or delete the row."
        )


def _check_different(chosen: list[dict], rejected: list[dict], where: str) -> None:
    if chosen == rejected:
        raise LLMTrainError(
            f"{where}: 'chosen' and 'rejected' are identical, so the pair prefers nothing. "
            "Give a different rejected answer or delete the row."
        )


def _conversations(chosen_value: Any, rejected_value: Any, where: str) -> tuple[list[dict], list[dict]]:
    """Both sides as full conversations, both message lists or both HH-RLHF text."""
    if isinstance(chosen_value, str) and isinstance(rejected_value, str):
        return _hh_messages(chosen_value, where, "chosen"), _hh_messages(rejected_value, where, "rejected")
    if isinstance(chosen_value, list) and isinstance(rejected_value, list):
        return _messages(chosen_value, where, "chosen"), _messages(rejected_value, where, "rejected")
    raise LLMTrainError(
        f"{where}: without a 'prompt', 'chosen' and 'rejected' must both be full conversations, both as message "
        f"lists or both as HH-RLHF text; found {type(chosen_value).__name__} and {type(rejected_value).__name__}. "
        f"{PREFERENCE_SHAPES}"
    )


def _split_at_shared_prefix(chosen: list[dict], rejected: list[dict], where: str) -> PreferencePair:
    """Two full conversations as the prompt they share word for word and the two assistant answers after it."""
    _check_different(chosen, rejected, where)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(messages):
            raise LLMTrainError(
                f"{where}: '{key}' ends where the {shared} messages it shares with the other side end, so it has no "
                "answer of its own. Both conversations must end with different assistant answers."
            )
    if not any(m["content"].strip() for m in chosen[:shared]):
        raise LLMTrainError(
            f"{where}: 'chosen' and 'rejected' share no prompt (their first messages differ). Start both with the "
            "same user turn, or put the prompt in a 'prompt' field and only the answers in 'chosen' and 'rejected'."
        )
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        for i, message in enumerate(messages[shared:], shared + 1):
            if message["role"] != "assistant":
                raise LLMTrainError(
                    f"{where}: message {i} of '{key}' is a '{message['role']}' turn after the first {shared} "
                    "message(s), which 'chosen' and 'rejected' share; only the assistant's answer may differ. "
                    "Both conversations must hold the same prompt turns, word for word."
                )
            _nonempty(message["content"], where, f"message {i} of '{key}'")
    return PreferencePair(chosen[:shared], chosen[shared:], rejected[shared:])


def _hh_messages(text: str, where: str, key: str) -> list[dict]:
    # re.split with a group yields [text before the first marker, role, content, role, content, ...].
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise LLMTrainError(
            f"{where}: '{key}' is plain text but the row has no 'prompt'. Add a 'prompt' field, or write both sides "
            'as HH-RLHF conversations ("\\n\\nHuman: ...\\n\\nAssistant: ..."). ' + PREFERENCE_SHAPES
        )
    messages = []
    for i, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2]), 1):
        if not content.strip():
            raise LLMTrainError(f"{where}: turn {i} of '{key}' ({speaker}:) is empty. Fill it in or delete the row.")
        messages.append({"role": _HH_ROLES[speaker], "content": content.strip()})
    return messages


# ---------------------------------------------------------------- pairs -> token pairs


@dataclass
class TokenizedPair:
    """Both sides as prompt + answer; labels are -100 except on the answer's assistant tokens and end of turn."""

    chosen: Example
    rejected: Example


@dataclass
class PairStats:
    """What the length rule did (pairs seen, truncated on the right, dropped), and pairs left out because a
    side's answer span could not be verified in the template's rendering."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    unverified: int = 0
    unverified_reason: str = ""

    def summary(self, max_length: int) -> str:
        """A one-line account of what was kept, for the run log."""
        line = (
            f"{self.rows} preference pairs -> {self.rows - self.dropped - self.unverified} kept; max_length="
            f"{max_length}: {self.truncated} truncated on the right, {self.dropped} dropped (no answer token left "
            "on a side)"
        )
        if self.unverified:
            line += f"; {self.unverified} dropped as unverifiable ({self.unverified_reason})"
        return line


def tokenize_pairs(
    tokenizer,
    pairs: Sequence[PreferencePair],
    max_length: int,
    source: str = "the data",
    strict: bool = True,
    *,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
    min_rows: int | None = None,
) -> tuple[list[TokenizedPair], PairStats]:
    """Tokenize both sides of every pair; truncate right while both keep an answer token, else drop the pair.
    `strict`: more than a small share of unverifiable pairs is an error. From `min_rows` pairs on (default
    `prepare.MIN_CACHED_ROWS`) the pairs are tokenized with `datasets.map` in `num_proc` processes and cached
    under `cache_dir`; see `llmtrain.data.prepare`."""
    items = [[pair.prompt, pair.chosen, pair.rejected] for pair in pairs]
    params = {"max_length": max_length}
    columns = prepare_columns(
        "pairs", tokenizer, items, _pair_columns, _PAIR_SCHEMA, params, num_proc, cache_dir, min_rows
    )
    raise_first_error(columns, source)
    stats = PairStats()
    add_row_stats(stats, columns)
    with gc_paused():
        kept = [
            TokenizedPair(Example(chosen_ids, chosen_labels), Example(rejected_ids, rejected_labels))
            for keep, chosen_ids, chosen_labels, rejected_ids, rejected_labels in zip(
                columns["kept"],
                columns["chosen_input_ids"],
                columns["chosen_labels"],
                columns["rejected_input_ids"],
                columns["rejected_labels"],
            )
            if keep
        ]
    if strict:
        check_verified(stats.unverified, stats.rows, stats.unverified_reason, source)
    return kept, stats


def _tokenize_pair(
    tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict], max_length: int, stats: PairStats
) -> TokenizedPair | None:
    """One pair under the length rule, counted in `stats`; None when unverifiable or dropped."""
    stats.rows += 1
    try:
        chosen_ex, rejected_ex = (answer_example(tokenizer, prompt, side) for side in (chosen, rejected))
    except Unverifiable as e:
        stats.unverified += 1
        stats.unverified_reason = stats.unverified_reason or str(e)
        return None
    if max(len(chosen_ex.input_ids), len(rejected_ex.input_ids)) > max_length:
        chosen_ex, rejected_ex = _truncate(chosen_ex, max_length), _truncate(rejected_ex, max_length)
        # Both sides share the prompt, so in practice this drops pairs whose prompt alone fills max_length.
        if not (_has_answer(chosen_ex) and _has_answer(rejected_ex)):
            stats.dropped += 1
            return None
        stats.truncated += 1
    return TokenizedPair(chosen_ex, rejected_ex)


_STATS_FIELDS = [f.name for f in fields(PairStats)]
_PAIR_SCHEMA = {
    "error": "str",
    "kept": "bool",
    "chosen_input_ids": "ids",
    "chosen_labels": "ids",
    "rejected_input_ids": "ids",
    "rejected_labels": "ids",
    **stats_schema(PairStats),
}


def _pair_columns(items: list[list[list[dict]]], tokenizer, max_length: int) -> dict[str, list]:
    """`_tokenize_pair` on each [prompt, chosen, rejected]: both sides (if kept), the pair's own PairStats, or
    the error that refused it (the rows after a refused one are skipped; the refusal is what the caller raises)."""
    columns: dict[str, list] = {name: [] for name in _PAIR_SCHEMA}
    refused = False
    for prompt, chosen, rejected in items:
        stats, pair, error = PairStats(), None, ""
        if refused:
            error = SKIPPED
        else:
            try:
                pair = _tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, stats)
            except LLMTrainError as e:
                error, refused = str(e), True
        columns["error"].append(error)
        columns["kept"].append(pair is not None)
        for side in ("chosen", "rejected"):
            example = getattr(pair, side) if pair is not None else Example([], [])
            columns[f"{side}_input_ids"].append(example.input_ids)
            columns[f"{side}_labels"].append(example.labels)
        for name in _STATS_FIELDS:
            columns[name].append(getattr(stats, name))
    return columns


def answer_example(tokenizer, prompt: list[dict], answer: list[dict]) -> Example:
    """prompt + answer with labels on the answer's assistant tokens only, ending at the answer's last token (its
    end-of-turn token): where a reward model reads its score, and all that DPO compares. Raises Unverifiable."""
    encoded = chat_format(tokenizer).encode(prompt + answer, train_from=len(prompt))
    last = max(t for t, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    # What a template writes after the end-of-turn token (a newline, a final EOS) is neither trained nor scored.
    return Example(encoded.input_ids[: last + 1], encoded.labels[: last + 1])


def _truncate(example: Example, max_length: int) -> Example:
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def _has_answer(example: Example) -> bool:
    return any(label != IGNORE_INDEX for label in example.labels)


# ---------------------------------------------------------------- batches and scores


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch [2B, L], chosen rows first then rejected: rows i and B + i are one pair."""
    return collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum [N] of the log-probabilities of the labelled tokens (logits at t predict labels at t + 1)."""
    targets = labels[:, 1:]
    picked = over_positions(_token_logprobs, logits[:, :-1], targets.clamp(min=0))
    return torch.where(targets != IGNORE_INDEX, picked, 0.0).sum(-1)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    # Gather minus logsumexp avoids a second vocabulary-sized tensor that log_softmax would allocate.
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
