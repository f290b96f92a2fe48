"""What a chat template trains: the assistant spans of any template, verified, and its end-of-turn token.

A template with `{% generation %}` markers says itself which characters the assistant writes. Stock
templates (Qwen, Llama, SmolLM, Mistral, Gemma, Phi) have none, so each assistant span is derived by
rendering: the conversation up to turn i with the generation prompt must be how the whole rendering
begins; the span runs from there (an empty think block the template writes before the answer
included) through the answer and the end-of-turn token the template writes after it, so the model
learns to stop exactly where generation stops. Every span is checked against the message it should
hold; a conversation whose spans cannot be verified is reported as `Unverifiable`, never trained on
with a wrong mask. Templates that refuse a system turn get it folded into the first user turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmtrain.errors import LLMTrainError

IGNORE_INDEX = -100
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Two probe turns: the template's end-of-turn token and what it writes between an assistant header and the
# answer (Qwen3's empty think block in the last turn, nothing in earlier ones) are read off their rendering.
_PROBE = [
    {"role": "user", "content": "probe question one"},
    {"role": "assistant", "content": "probe answer one"},
    {"role": "user", "content": "probe question two"},
    {"role": "assistant", "content": "probe answer two"},
]


class Unverifiable(Exception):
    """A conversation whose assistant spans cannot be located exactly; the reason says what went wrong."""


@dataclass
class Encoded:
    """A rendered conversation as tokens; labels are the token where trained and -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]


class ChatFormat:
    """One tokenizer's chat template, probed once: how to render, where answers are, how a turn ends."""

    def __init__(self, tokenizer):
        if not tokenizer.chat_template:
            raise LLMTrainError("The tokenizer has no chat template; load it with llmtrain.tokenizer.load_tokenizer.")
        self.tokenizer = tokenizer
        self.template = tokenizer.chat_template
        self.marked = bool(GENERATION_MARKER.search(self.template))
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }
        self.folds_system = not self._accepts_system()
        self.end_of_turn_id, self.answer_openings = self._probe()

    # ---------------------------------------------------------------- rendering

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`; a template error is an LLMTrainError with the template's reason."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:
            roles = "/".join(m["role"] for m in messages)
            raise LLMTrainError(
                f"The chat template refuses this conversation ({roles}): {e}. Give conversations in the shape the "
                "template accepts (most templates want user and assistant turns alternating, starting with a user "
                "turn), or train with another template (chat_template: a .jinja file, or llmtrain)."
            ) from None

    def fit(self, messages: list[dict]) -> list[dict]:
        """The conversation as the template accepts it: a leading system turn folded into the first user turn
        when the template has no system role."""
        if not (self.folds_system and messages and messages[0]["role"] == "system"):
            return messages
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise LLMTrainError(
                "The chat template has no system role, so the system turn is folded into the first user turn; this "
                "conversation has no user turn right after its system turn. Start it with system then user."
            )
        merged = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
        return [merged, *messages[2:]]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation plus the generation prompt: what the policy continues."""
        return self._tokenize(self.render(self.fit(messages), add_generation_prompt=True))[0]

    # ---------------------------------------------------------------- spans

    def encode(self, messages: list[dict], train_from: int = 0) -> Encoded:
        """Tokens of the conversation with labels on the assistant turns at index >= `train_from` (each with its
        end-of-turn token). Raises Unverifiable when a span cannot be located exactly."""
        fitted = self.fit(messages)
        train_from -= len(messages) - len(fitted)  # folding the system turn shifts every index by one
        full = self.render(fitted)
        ids, offsets = self._tokenize(full)
        assistant = [i for i, m in enumerate(fitted) if m["role"] == "assistant"]
        spans = self._marked_spans(fitted, full, assistant) if self.marked else None
        labels = [IGNORE_INDEX] * len(ids)
        for k, i in enumerate(assistant):
            if i < train_from:
                continue
            start, end = spans[k] if spans is not None else self._derived_span(fitted, i, full, ids, offsets)
            first = None
            for t, (a, b) in enumerate(offsets):
                if a < end and b > start and b > a:
                    first = t if first is None else first
                    labels[t] = ids[t]
            if first is None:
                raise Unverifiable(f"turn {i + 1} (assistant) holds no token")
            if full[offsets[first][0] : start].strip():
                raise Unverifiable(
                    f"a token joins the assistant header and the answer of turn {i + 1} "
                    f"({full[offsets[first][0] : offsets[first][1]]!r})"
                )
        labels[0] = IGNORE_INDEX  # nothing precedes the first token, so it is never a target
        return Encoded(ids, labels)

    def _derived_span(self, messages: list[dict], i: int, full: str, ids: list[int], offsets) -> tuple[int, int]:
        prefix = self.render(messages[:i], add_generation_prompt=True)
        if not full.startswith(prefix):
            raise Unverifiable(
                f"the rendering of the turns before turn {i + 1} plus the generation prompt is not how the whole "
                "conversation's rendering begins (the template renders earlier turns differently later on)"
            )
        content = messages[i]["content"].strip()
        at = full.find(content, len(prefix))
        if at < 0:
            raise Unverifiable(f"the text of turn {i + 1} (assistant) does not appear in the rendering")
        opening = full[len(prefix) : at].strip()
        if opening not in self.answer_openings:
            raise Unverifiable(
                f"the template writes {opening[:60]!r} between the assistant header and the answer of turn {i + 1}"
            )
        end = at + len(content)
        after = next((t for t, (a, _) in enumerate(offsets) if a >= end), None)
        if after is None or ids[after] != self.end_of_turn_id or full[end : offsets[after][0]].strip():
            written = full[end : end + 40]
            raise Unverifiable(
                f"after the answer of turn {i + 1} the template writes {written!r}, not its end-of-turn token"
            )
        return len(prefix), offsets[after][1]

    def _marked_spans(self, messages: list[dict], full: str, assistant: list[int]) -> list[tuple[int, int]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(
            conversations=[messages],
            chat_template=self.template,
            return_assistant_tokens_mask=True,
            **self.tokenizer.special_tokens_map,
        )
        spans = [tuple(s) for s in indices[0]]
        if rendered[0] != full or len(spans) != len(assistant):
            raise Unverifiable(
                f"the template's {{% generation %}} blocks ({len(spans)}) do not match the assistant turns "
                f"({len(assistant)}) one to one"
            )
        for (start, end), i in zip(spans, assistant):
            if messages[i]["content"].strip() not in full[start:end]:
                raise Unverifiable(f"the {{% generation %}} block of turn {i + 1} does not hold that turn's answer")
        return spans

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # The template writes every special token itself (a bos included), so none is added here.
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]

    # ---------------------------------------------------------------- probing the template

    def _accepts_system(self) -> bool:
        try:
            self.tokenizer.apply_chat_template(
                [{"role": "system", "content": "probe system"}, {"role": "user", "content": "probe question"}],
                tokenize=False,
            )
        except Exception:  # noqa: BLE001 - templates refuse with raise_exception, or fail on the role in other ways
            return False
        return True

    def _probe(self) -> tuple[int, set[str]]:
        full = self.render(_PROBE)
        ids, offsets = self._tokenize(full)
        openings, end_ids = set(), []
        for i in (1, 3):
            prefix = self.render(_PROBE[:i], add_generation_prompt=True)
            content = _PROBE[i]["content"]
            at = full.find(content, len(prefix) if full.startswith(prefix) else 0)
            if at < 0:
                raise LLMTrainError(
                    f"The chat template does not write an assistant answer as it is (rendering {_PROBE[: i + 1]} "
                    f"gives {full!r}), so no loss mask can be derived from it. Use a template that writes the "
                    "message content unchanged (chat_template: a .jinja file, or llmtrain)."
                )
            if full.startswith(prefix):
                openings.add(full[len(prefix) : at].strip())
            end = at + len(content)
            after = next((t for t, (a, _) in enumerate(offsets) if a >= end), None)
            if after is not None and ids[after] in self.special_ids and not full[end : offsets[after][0]].strip():
                end_ids.append(ids[after])
        if len(end_ids) < 2 or len(set(end_ids)) != 1:
            suffix = full[full.find("probe answer one") + len("probe answer one") :][:40]
            raise LLMTrainError(
                f"The chat template writes no end-of-turn token after an assistant answer (it writes {suffix!r}, "
                "which does not start with a special token of this vocabulary), so a model trained with it could "
                "never learn to stop. Use a template that ends each turn with a special token: the model's own, or "
                "chat_template: llmtrain (which ends turns with the tokenizer's end-of-sequence token)."
            )
        return end_ids[0], openings


def chat_format(tokenizer) -> ChatFormat:
    """The tokenizer's ChatFormat, probed once per template and kept on the tokenizer."""
    cached = getattr(tokenizer, "_llmtrain_chat_format", None)
    if cached is None or cached.template != tokenizer.chat_template:
        cached = ChatFormat(tokenizer)
        tokenizer._llmtrain_chat_format = cached
    return cached
