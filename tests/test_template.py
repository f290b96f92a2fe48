"""Which tokens a chat template trains (llmtrain.data.template), checked on nine real families token by token,
against TRL's training templates, on templates and rows that cannot be used, for PPO prompts and for stop tokens."""

from __future__ import annotations

import json

import pytest
from families import FAMILIES
from transformers import AutoModelForCausalLM

from llmtrain.data.chat import TokenizeStats, load_chat_rows, to_messages, tokenize_chat, tokenize_dataset
from llmtrain.data.template import GENERATION_MARKER, IGNORE_INDEX, Unverifiable, chat_format
from llmtrain.errors import LLMTrainError
from llmtrain.generate import stop_token_ids
from llmtrain.tokenizer import load_tokenizer

SYSTEM = "Reply with the full equation."
QUESTION_1, ANSWER_1 = "What is 2 + 3?", "2 + 3 = 5."
QUESTION_2, ANSWER_2 = "And 40 - 4?", "40 - 4 = 36."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTION_1},
    {"role": "assistant", "content": ANSWER_1},
    {"role": "user", "content": QUESTION_2},
    {"role": "assistant", "content": ANSWER_2},
]
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3 writes it before the answer of the last assistant turn only

# The text each assistant turn trains, written out per family: the answer, then the template's end-of-turn token.
TRAINED = {
    "qwen2.5": (ANSWER_1 + "<|im_end|>", ANSWER_2 + "<|im_end|>"),
    "qwen3": (ANSWER_1 + "<|im_end|>", QWEN3_EMPTY_THINK + ANSWER_2 + "<|im_end|>"),
    "llama3.2": (ANSWER_1 + "<|eot_id|>", ANSWER_2 + "<|eot_id|>"),
    "smollm2": (ANSWER_1 + "<|im_end|>", ANSWER_2 + "<|im_end|>"),
    "mistral": (ANSWER_1 + "</s>", ANSWER_2 + "</s>"),
    "gemma2": (ANSWER_1 + "<end_of_turn>", ANSWER_2 + "<end_of_turn>"),
    "gemma3": (ANSWER_1 + "<end_of_turn>", ANSWER_2 + "<end_of_turn>"),
    "phi3": (ANSWER_1 + "<|end|>", ANSWER_2 + "<|end|>"),
    "gpt2": (ANSWER_1 + "<|endoftext|>", ANSWER_2 + "<|endoftext|>"),  # the project's template, EOS ends a turn
}
END_OF_TURN = {name: texts[0][len(ANSWER_1) :] for name, texts in TRAINED.items()}

# How each family renders the system turn and the first user turn. Mistral v0.1 and Gemma 2 refuse a system turn,
# so llmtrain folds it into the first user turn; Gemma 3's own template does the same fold itself.
OPENING = {
    "qwen2.5": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION_1}<|im_end|>\n",
    "qwen3": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION_1}<|im_end|>\n",
    "llama3.2": f"\n\n{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{QUESTION_1}<|eot_id|>",
    "smollm2": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION_1}<|im_end|>\n",
    "mistral": f"<s>[INST] {SYSTEM}\n\n{QUESTION_1} [/INST]",
    "gemma2": f"<bos><start_of_turn>user\n{SYSTEM}\n\n{QUESTION_1}<end_of_turn>\n",
    "gemma3": f"<bos><start_of_turn>user\n{SYSTEM}\n\n{QUESTION_1}<end_of_turn>\n",
    "phi3": f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n{QUESTION_1}<|end|>\n",
    "gpt2": f"<|system|>\n{SYSTEM}<|endoftext|><|user|>\n{QUESTION_1}<|endoftext|>",
}
FOLDS_SYSTEM = {"mistral", "gemma2"}


@pytest.fixture(scope="module")
def tokenizers(family_models):
    return {name: load_tokenizer(family_models[name]) for name in FAMILIES}


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of trained positions."""
    runs, start = [], None
    for t, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = t
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, t))
            start = None
    return runs


def continuation_ids(tok, text: str) -> list[int]:
    """`text` tokenized as it sits in a rendering, after other text: behind a special token, so that a
    SentencePiece tokenizer does not prepend the word-start marker it puts at the start of a string."""
    ids = tok(tok.eos_token + text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.eos_token_id
    return ids[1:]


# ---------------------------------------------------------------- 1. the trained tokens, token by token


@pytest.mark.parametrize("name", FAMILIES)
def test_multi_turn_trains_each_answer_and_its_end_of_turn_token_and_nothing_else(tokenizers, name):
    tok = tokenizers[name]
    fmt = chat_format(tok)
    eot_id = tok.convert_tokens_to_ids(END_OF_TURN[name])
    assert fmt.end_of_turn_id == eot_id
    assert fmt.folds_system == (name in FOLDS_SYSTEM)

    rendered = fmt.render(fmt.fit(CONVERSATION))
    assert OPENING[name] in rendered  # the system text sits in its own turn, or folded into the first user turn
    assert rendered.count(SYSTEM) == 1

    encoded = fmt.encode(CONVERSATION)
    reference = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded.input_ids == reference["input_ids"]  # the rendering, tokenized once, no extra bos
    assert len(encoded.labels) == len(encoded.input_ids)
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(encoded.input_ids, encoded.labels))

    runs = trained_runs(encoded.labels)
    trained = [encoded.input_ids[a:b] for a, b in runs]
    expected = [continuation_ids(tok, text) for text in TRAINED[name]]
    assert trained == expected, (
        [tok.convert_ids_to_tokens(r) for r in trained],
        [tok.convert_ids_to_tokens(r) for r in expected],
    )
    assert [run[-1] for run in trained] == [eot_id, eot_id]  # each turn's last trained token ends the turn
    for _, end in runs:  # the end-of-turn token closes the run: what the template writes after it is untrained
        assert tok.decode([encoded.input_ids[end - 1]]) == END_OF_TURN[name]

    # No token of the system or user turns is trained: trained tokens' characters lie outside those texts.
    prompt_spans, at = [], 0
    for text in (SYSTEM, QUESTION_1, QUESTION_2):
        at = rendered.index(text, at)
        prompt_spans.append((at, at + len(text)))
    for t, label in enumerate(encoded.labels):
        if label != IGNORE_INDEX:
            a, b = reference["offset_mapping"][t]
            assert all(b <= start or a >= end for start, end in prompt_spans), (t, rendered[a:b])


@pytest.mark.parametrize("name", FAMILIES)
def test_train_from_leaves_earlier_answers_untrained(tokenizers, name):
    fmt = chat_format(tokenizers[name])
    everything = fmt.encode(CONVERSATION)
    last_only = fmt.encode(CONVERSATION, train_from=4)  # index in the message list as given, system included
    assert last_only.input_ids == everything.input_ids
    assert trained_runs(last_only.labels) == trained_runs(everything.labels)[1:]


# ---------------------------------------------------------------- 2. against TRL's training templates

# TRL's training templates (trl/chat_templates/*_training.jinja, chosen by get_training_chat_template) put
# {% generation %} markers into the stock templates. Where they exist for a family, TRL's mask is compared with the
# mask llmtrain derives from the stock template; the differences below are the only ones allowed.
NO_TRL_TEMPLATE = {
    # TRL ships llama3_training.jinja for Llama 3(.0)'s template only; Llama 3.2's template is not matched.
    "llama3.2",
    # SmolLM2's and Mistral v0.1's templates have no TRL training variant.
    "smollm2",
    "mistral",
}


def trl_expected(name: str, tok, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """TRL's (input_ids, assistant mask) as predicted from llmtrain's encoding of the stock template's rendering."""
    mask = [int(label != IGNORE_INDEX) for label in labels]
    runs = trained_runs(labels)
    newline = continuation_ids(tok, "\n")
    assert len(newline) == 1
    if name == "qwen2.5":
        # TRL's generation block is '\n' + content + '<|im_end|>\n': it also trains the newline after
        # '<|im_start|>assistant' (a prompt cue, part of the generation prompt) and the newline after <|im_end|>
        # (never generated: generation stops at <|im_end|>).
        for start, end in runs:
            assert ids[start - 1] == ids[end] == newline[0] and mask[start - 1] == mask[end] == 0
            mask[start - 1] = mask[end] = 1
    elif name in ("gemma2", "gemma3"):
        # TRL's generation block is content + '<end_of_turn>\n': it also trains the newline after <end_of_turn>.
        for _, end in runs:
            assert ids[end] == newline[0] and mask[end] == 0
            mask[end] = 1
    elif name == "phi3":
        # TRL's generation block is content + '<|end|>\n' (the newline is swallowed by <|end|>, an rstrip token, so
        # no token differs there); and TRL also trains the eos the template appends after a conversation that ends
        # with an assistant turn, a token generation never reaches since it stops at <|end|>.
        assert ids[-1] == tok.eos_token_id and labels[-1] == IGNORE_INDEX
        mask[-1] = 1
    elif name == "qwen3":
        # TRL's training template renders differently: it writes the empty think block in EVERY assistant turn
        # (the stock template only in the turn after the last user message), trained, and its generation block
        # ends with '<|im_end|>\n', so it also trains the newline after <|im_end|>.
        think = continuation_ids(tok, QWEN3_EMPTY_THINK)
        out_ids, out_mask, last = [], [], 0
        for k, (start, end) in enumerate(runs):
            out_ids += ids[last:start]
            out_mask += mask[last:start]
            if k < len(runs) - 1:
                assert ids[start : start + len(think)] != think
                out_ids += think
                out_mask += [1] * len(think)
            else:
                assert ids[start : start + len(think)] == think
            assert ids[end] == newline[0]
            out_ids += ids[start : end + 1]
            out_mask += [1] * (end + 1 - start)
            last = end + 1
        return out_ids + ids[last:], out_mask + mask[last:]
    elif name == "gpt2":
        # The project's template carries {% generation %} markers itself (TRL keeps it as it is): llmtrain reads the
        # spans from those markers, so both masks are the same.
        pass
    else:
        raise AssertionError(f"no expectation for {name}")
    return ids, mask


@pytest.mark.parametrize("name", FAMILIES)
def test_mask_differs_from_trl_training_template_only_where_named(family_models, tokenizers, name):
    from trl.chat_template_utils import get_training_chat_template

    tok = tokenizers[name]
    if name in NO_TRL_TEMPLATE:
        with pytest.raises(ValueError, match="patching is not supported"):
            get_training_chat_template(tok)
        return
    training = get_training_chat_template(tok)
    fmt = chat_format(tok)
    messages = fmt.fit(CONVERSATION)  # Gemma 2 refuses the system turn in TRL's template too
    encoded = fmt.encode(CONVERSATION)

    trl_tok = load_tokenizer(family_models[name])
    if training is not None:
        assert GENERATION_MARKER.search(training)
        trl_tok.chat_template = training
    out = trl_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trl_ids, trl_mask = list(out["input_ids"]), list(out["assistant_masks"])

    expected_ids, expected_mask = trl_expected(name, tok, encoded.input_ids, encoded.labels)
    assert trl_ids == expected_ids
    differing = [
        (t, tok.convert_ids_to_tokens(trl_ids[t])) for t in range(len(trl_ids)) if trl_mask[t] != expected_mask[t]
    ]
    assert not differing, differing
    if name == "gpt2":
        assert trl_mask == [int(label != IGNORE_INDEX) for label in encoded.labels]


# ---------------------------------------------------------------- 3. bad input

CHATML_TURN = "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
# Assistant turns are written under 'assistant', but the generation prompt says 'model': the conversation before an
# answer plus the generation prompt is never how the conversation's rendering begins, so no answer can be located.
MISMATCHED_PROMPT = (
    "{% for m in messages %}" + CHATML_TURN + "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>model\\n' }}{% endif %}"
)
UPPER_CASE_ANSWERS = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{{ m.content | upper if m.role == 'assistant' else m.content }}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Plain text only: nothing after an answer that a model could learn to produce as its stop token.
NO_END_OF_TURN = (
    "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def single_turn(n: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {n} + 1?"}, {"role": "assistant", "content": f"{n} + 1 = {n + 1}"}]


def test_template_whose_answers_cannot_be_located_fails_the_data_set_and_drops_a_single_row(family_models):
    tok = load_tokenizer(family_models["qwen2.5"])
    tok.chat_template = MISMATCHED_PROMPT
    with pytest.raises(Unverifiable, match="not how the whole conversation's rendering begins"):
        chat_format(tok).encode(single_turn(1))

    stats = TokenizeStats()
    assert tokenize_chat(tok, single_turn(1), max_length=64, stats=stats) is None
    assert (stats.rows, stats.unverified, stats.dropped, stats.tokens) == (1, 1, 0, 0)
    assert "not how the whole conversation's rendering begins" in stats.unverified_reason

    with pytest.raises(LLMTrainError) as info:
        tokenize_dataset(tok, [single_turn(n) for n in range(3)], max_length=64, source="chats.jsonl")
    message = str(info.value)
    assert message.startswith("chats.jsonl: ")
    assert "could not be verified in 3 of 3 conversations" in message
    assert "not how the whole conversation's rendering begins" in message


def test_template_that_rewrites_every_answer_is_refused_before_any_row(family_models):
    # Upper-casing every answer fails already on the probe conversation: the template is refused as a whole (an
    # LLMTrainError naming the row where it was met) rather than row by row as unverifiable.
    tok = load_tokenizer(family_models["qwen2.5"])
    tok.chat_template = UPPER_CASE_ANSWERS
    with pytest.raises(LLMTrainError, match="does not write an assistant answer as it is"):
        chat_format(tok)
    with pytest.raises(LLMTrainError, match=r"^shout\.jsonl, row 1: .*does not write an assistant answer as it is"):
        tokenize_dataset(tok, [single_turn(1)], max_length=64, source="shout.jsonl")


def test_qwen3_reasoning_dropped_from_an_earlier_turn_is_unverifiable(tokenizers):
    # Qwen3's template writes an answer's <think> block only in the turns after the last user message and drops it
    # from earlier ones: there the answer as given is not in the rendering, so the row is dropped, never trained with
    # a guessed mask. In the last turn the reasoning is rendered as given and trained with the answer.
    tok = tokenizers["qwen3"]
    fmt = chat_format(tok)
    answer = {"role": "assistant", "content": "<think>\nAdd one.\n</think>\n\n1 + 1 = 2"}
    last = fmt.encode([single_turn(1)[0], answer])
    trained = [i for i, label in zip(last.input_ids, last.labels) if label != IGNORE_INDEX]
    assert trained == continuation_ids(tok, answer["content"] + "<|im_end|>")
    thinking = [single_turn(1)[0], answer, *single_turn(2)]
    with pytest.raises(Unverifiable, match="the text of turn 2 .assistant. does not appear in the rendering"):
        fmt.encode(thinking)

    # One such row in 50 (2%) is dropped and counted; two (4%) are more than the data set may lose.
    rows = [thinking] + [single_turn(n) for n in range(49)]
    examples, stats = tokenize_dataset(tok, rows, max_length=64, source="mixed.jsonl")
    assert (len(examples), stats.rows, stats.unverified) == (49, 50, 1)
    assert "unverifiable" in stats.summary(64)
    with pytest.raises(LLMTrainError, match=r"mixed\.jsonl: .*could not be verified in 2 of 50"):
        tokenize_dataset(tok, [thinking, thinking] + rows[2:], max_length=64, source="mixed.jsonl")


def test_template_without_special_end_of_turn_token_is_refused(family_models, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text(NO_END_OF_TURN)
    tok = load_tokenizer(family_models["qwen2.5"], chat_template=str(path))
    assert tok.chat_template == NO_END_OF_TURN
    with pytest.raises(LLMTrainError, match="no end-of-turn token") as info:
        chat_format(tok)
    assert "could never learn to stop" in str(info.value)
    with pytest.raises(LLMTrainError, match=r"^plain\.jsonl, row 1: .*no end-of-turn token"):
        tokenize_dataset(tok, [single_turn(1)], max_length=64, source="plain.jsonl")


@pytest.mark.parametrize("name", sorted(FOLDS_SYSTEM))
def test_system_turn_is_folded_into_first_user_turn_where_the_template_refuses_it(tokenizers, name):
    tok = tokenizers[name]
    with pytest.raises(Exception, match="System role not supported|roles must alternate"):
        tok.apply_chat_template(CONVERSATION, tokenize=False)  # the template itself refuses it
    fmt = chat_format(tok)
    assert fmt.folds_system
    fitted = fmt.fit(CONVERSATION)
    assert fitted[0] == {"role": "user", "content": f"{SYSTEM}\n\n{QUESTION_1}"}
    assert fitted[1:] == CONVERSATION[2:]
    rendered = fmt.render(fitted)
    first_user = {
        "mistral": f"[INST] {SYSTEM}\n\n{QUESTION_1} [/INST]",
        "gemma2": f"<start_of_turn>user\n{SYSTEM}\n\n{QUESTION_1}<end_of_turn>",
    }[name]
    assert first_user in rendered and rendered.count(SYSTEM) == 1
    with pytest.raises(LLMTrainError, match="no user turn right after its system turn"):
        fmt.fit([CONVERSATION[0], CONVERSATION[2]])


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_broken_alternation_raises_the_templates_reason_and_the_fix(tokenizers, name):
    tok = tokenizers[name]
    two_users = [
        {"role": "user", "content": QUESTION_1},
        {"role": "user", "content": QUESTION_2},
        {"role": "assistant", "content": ANSWER_2},
    ]
    with pytest.raises(LLMTrainError) as info:
        chat_format(tok).encode(two_users)
    message = str(info.value)
    assert "(user/user/assistant)" in message
    assert "Conversation roles must alternate user/assistant/user/assistant" in message  # the template's reason
    assert "user and assistant turns alternating" in message and "chat_template" in message  # the fix
    with pytest.raises(LLMTrainError, match=r"^bad\.jsonl, row 2: The chat template refuses this conversation"):
        tokenize_dataset(tok, [single_turn(1), two_users], max_length=64, source="bad.jsonl")


@pytest.mark.parametrize(
    "turn",
    [
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]},
    ],
    ids=["tool_result", "tool_call"],
)
def test_tool_turn_row_is_refused_naming_file_and_line(tmp_path, turn):
    row = {"messages": [{"role": "user", "content": QUESTION_1}, turn, {"role": "assistant", "content": ANSWER_1}]}
    with pytest.raises(LLMTrainError) as info:
        to_messages(row, "chats.jsonl, line 7")
    message = str(info.value)
    assert message.startswith("chats.jsonl, line 7: message 2 of 'messages' is a tool-call or tool-result turn")
    assert "Training on tool use is not supported" in message

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": single_turn(1)}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LLMTrainError, match=rf"^{path}, line 2: message 2 of 'messages' is a tool"):
        load_chat_rows(str(path))


# ---------------------------------------------------------------- 4. prompts for generation (PPO, GRPO, eval)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_ids_are_the_generation_prompt_and_a_prefix_of_the_trained_conversation(tokenizers, name):
    tok = tokenizers[name]
    fmt = chat_format(tok)
    prompt = CONVERSATION[:4]
    prompt_text = fmt.render(fmt.fit(prompt), add_generation_prompt=True)
    ids = fmt.prompt_ids(prompt)
    assert ids == tok(prompt_text, add_special_tokens=False)["input_ids"]

    # What the policy continues is how the trained conversation begins, in text and in tokens, and the answer's
    # trained tokens start right where the prompt ends.
    full = fmt.render(fmt.fit(CONVERSATION))
    assert full.startswith(prompt_text)
    encoded = fmt.encode(CONVERSATION)
    assert encoded.input_ids[: len(ids)] == ids
    assert trained_runs(encoded.labels)[-1][0] == len(ids)
    assert full[len(prompt_text) :].startswith(TRAINED[name][1])


# ---------------------------------------------------------------- 5. stop tokens

STOPS = {  # generation_config eos ids as published, then tokenizer eos and end of turn when not among them
    "qwen2.5": ["<|im_end|>", "<|endoftext|>"],
    "qwen3": ["<|im_end|>", "<|endoftext|>"],
    "llama3.2": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    "smollm2": ["<|im_end|>"],
    "mistral": ["</s>"],
    "gemma2": ["<eos>", "<end_of_turn>"],
    "gemma3": ["<eos>", "<end_of_turn>"],
    "phi3": ["<|endoftext|>", "<|assistant|>", "<|end|>"],
    "gpt2": ["<|endoftext|>"],
}
STOPS_WITHOUT_MODEL = {  # tokenizer eos, then the template's end of turn
    "qwen2.5": ["<|im_end|>"],
    "qwen3": ["<|im_end|>"],
    "llama3.2": ["<|eot_id|>"],
    "smollm2": ["<|im_end|>"],
    "mistral": ["</s>"],
    "gemma2": ["<eos>", "<end_of_turn>"],
    "gemma3": ["<eos>", "<end_of_turn>"],
    "phi3": ["<|endoftext|>", "<|end|>"],
    "gpt2": ["<|endoftext|>"],
}


@pytest.mark.parametrize("name", FAMILIES)
def test_stop_tokens_are_model_eos_then_tokenizer_eos_then_end_of_turn_each_once(family_models, tokenizers, name):
    tok = tokenizers[name]
    model = AutoModelForCausalLM.from_pretrained(family_models[name])
    published = model.generation_config.eos_token_id
    published = published if isinstance(published, list) else [published]
    stops = stop_token_ids(tok, model)
    assert stops == tok.convert_tokens_to_ids(STOPS[name])
    assert stops[: len(published)] == published
    assert chat_format(tok).end_of_turn_id in stops and tok.eos_token_id in stops
    assert stop_token_ids(tok) == tok.convert_tokens_to_ids(STOPS_WITHOUT_MODEL[name])
