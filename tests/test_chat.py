import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import few_steps_config, logged, stage_runners
from transformers import AutoModelForCausalLM

from llmtrain.data.chat import (
    IGNORE_INDEX,
    BadRows,
    Example,
    collate_packed,
    collate_padded,
    load_chat_rows,
    masked_lm_loss,
    pack_examples,
    to_messages,
    tokenize_chat,
    tokenize_dataset,
)
from llmtrain.data.corpus import REPO_DATA_DIR
from llmtrain.errors import LLMTrainError
from llmtrain.losses import over_positions
from llmtrain.registry import preset_config
from llmtrain.run_dir import Run
from llmtrain.tokenizer import CHAT_TEMPLATE, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread

SAMPLES = REPO_DATA_DIR / "samples"
SFT_FILES = ("sft_prompt_response.jsonl", "sft_messages.jsonl", "sft_alpaca.jsonl")
SYSTEM = "You are a careful arithmetic tutor. Answer with the full equation."
MULTI_TURN = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 18 + 38?"},
    {"role": "assistant", "content": "18 + 38 = 56"},
    {"role": "user", "content": "What is 52 + 62?"},
    {"role": "assistant", "content": "52 + 62 = 114"},
]


@pytest.fixture(scope="module")
def tok():
    lines = (REPO_DATA_DIR / "corpus.txt").read_text().splitlines()[:300]
    for name in SFT_FILES:
        lines += (SAMPLES / name).read_text().splitlines()
    return train_tokenizer(lines, vocab_size=400)


@pytest.fixture(scope="module")
def sample_chats() -> list[list[dict]]:
    return [m for name in SFT_FILES for m in load_chat_rows(str(SAMPLES / name))]


@pytest.fixture(scope="module")
def nano_model(tok):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("gpt-nano", len(tok), 256, {}))
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float32
    return model.eval()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- rows -> messages


def test_prompt_response_rows_become_a_user_and_an_assistant_message():
    chats = load_chat_rows(str(SAMPLES / "sft_prompt_response.jsonl"))
    assert len(chats) == 10
    assert chats[0] == [
        {"role": "user", "content": "What is 91 + 36?"},
        {"role": "assistant", "content": "91 + 36 = 127"},
    ]


def test_messages_rows_keep_every_turn_in_order():
    chats = load_chat_rows(str(SAMPLES / "sft_messages.jsonl"))
    assert len(chats) == 7
    assert chats[0] == MULTI_TURN
    assert chats[1] == [
        {"role": "user", "content": "What is 90 - 66?"},
        {"role": "assistant", "content": "90 - 66 = 24"},
    ]


def test_alpaca_rows_put_the_input_after_a_blank_line_only_when_there_is_one():
    chats = load_chat_rows(str(SAMPLES / "sft_alpaca.jsonl"), max_rows=2)
    assert chats == [
        [
            {"role": "user", "content": "Solve the arithmetic problem.\n\nWhat is 36 + 46?"},
            {"role": "assistant", "content": "36 + 46 = 82"},
        ],
        [{"role": "user", "content": "What is 50 + 95?"}, {"role": "assistant", "content": "50 + 95 = 145"}],
    ]


def test_completion_is_an_alias_of_response_and_may_be_a_message_list():
    assert to_messages({"prompt": "2 + 2?", "completion": "4"}, "x") == [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    assert to_messages(row, "x") == row["prompt"] + row["completion"]


def test_sharegpt_rows_become_the_same_messages_as_their_messages_rows():
    chats = load_chat_rows(str(SAMPLES / "sft_sharegpt.jsonl"))
    assert chats[0] == MULTI_TURN
    assert chats[1] == [
        {"role": "user", "content": "What is 90 - 66?"},
        {"role": "assistant", "content": "90 - 66 = 24"},
    ]
    assert chats == load_chat_rows(str(SAMPLES / "sft_messages.jsonl"), max_rows=3)


def test_sharegpt_speaker_names_map_to_roles():
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "user", "value": "U1"},
            {"from": "chatgpt", "value": "A1"},
            {"from": "human", "value": "U2"},
            {"from": "bard", "value": "A2"},
            {"from": "human", "value": "U3"},
            {"from": "model", "value": "A3"},
        ]
    }
    assert to_messages(row, "x") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "U3"},
        {"role": "assistant", "content": "A3"},
    ]


def test_text_parts_are_joined_back_to_back_as_part_list_templates_render_them():
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]},
            # As a Parquet or Hub table gives it: every part carries every part type's field, null when unused.
            {"role": "assistant", "content": [{"type": "text", "text": "2 + 2 = 4", "image": None}]},
        ]
    }
    assert to_messages(row, "x") == [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4"},
    ]


def test_an_image_part_is_an_error_naming_the_row_the_message_and_the_part_type(tmp_path):
    image_turn = {"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "Cat?"}]}
    row = {"messages": [MULTI_TURN[1], MULTI_TURN[2], image_turn, {"role": "assistant", "content": "Yes."}]}
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "response": "r"}, row])
    with pytest.raises(
        LLMTrainError, match=r"data\.jsonl, line 2: message 3 of 'messages' has a part of type 'image'; only text is"
    ):
        load_chat_rows(str(path))


def test_sharegpt_tool_turns_get_the_tool_turn_error():
    for speaker in ("observation", "function_call", "tool"):
        row = {"conversations": [{"from": "human", "value": "q"}, {"from": speaker, "value": "{}"}]}
        with pytest.raises(LLMTrainError, match="f.jsonl, line 2: message 2 of 'conversations' is a tool-call"):
            to_messages(row, "f.jsonl, line 2")


def test_a_folder_of_jsonl_json_and_parquet_files_is_read_in_file_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p1", "response": "r1"}, ""])  # blank lines are skipped
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "p2", "input": "", "output": "r2"}]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "p3", "response": "r3"}]), tmp_path / "c.parquet")
    chats = load_chat_rows(str(tmp_path))
    assert [[m["content"] for m in chat] for chat in chats] == [["p1", "r1"], ["p2", "r2"], ["p3", "r3"]]
    assert len(load_chat_rows(str(tmp_path), max_rows=2)) == 2


def test_text_that_is_not_utf8_is_an_error_naming_the_encoding_never_replacement_characters(tmp_path):
    row = {"prompt": "Café?", "response": "Oui"}
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(("\ufeff" + json.dumps(row, ensure_ascii=False) + "\n").encode())
    assert load_chat_rows(str(bom))[0][0]["content"] == "Café?"  # a UTF-8 byte-order mark is fine
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(('{"prompt": "a", "response": "b"}\n' + json.dumps(row, ensure_ascii=False)).encode("latin-1"))
    with pytest.raises(LLMTrainError, match=r"latin.jsonl, line 2: not UTF-8 text \(byte 0xe9.*iconv -f LATIN1"):
        load_chat_rows(str(latin))
    for name in ("utf16.jsonl", "utf16.json"):
        (tmp_path / name).write_bytes(json.dumps([row]).encode("utf-16"))
        with pytest.raises(LLMTrainError, match=f"{name} is UTF-16 text.*must be UTF-8.*iconv -f UTF-16"):
            load_chat_rows(str(tmp_path / name))


def test_an_empty_training_or_held_out_file_says_it_holds_no_rows(tmp_path):
    from llmtrain.config import SftConfig
    from llmtrain.data.splits import train_and_eval_rows

    empty, full = tmp_path / "empty.jsonl", SAMPLES / "sft_messages.jsonl"
    empty.write_text("\n\n")
    for data, eval_data in ((empty, full), (full, empty)):
        cfg = SftConfig(data=str(data), eval_data=str(eval_data), runs_dir=str(tmp_path))
        with pytest.raises(LLMTrainError, match="empty.jsonl holds no rows"):
            train_and_eval_rows(
                cfg, Run(tmp_path / "sft", "sft", True), load_chat_rows, "sft_train.jsonl", "sft_val.jsonl"
            )


def rows_with_two_bad_ones(path):
    good = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    return write_jsonl(path, [*good[:4], {"prompt": "q", "response": " "}, *good[4:], {"prompt": "q"}])


def test_max_bad_rows_skips_unusable_rows_as_a_count_or_a_share_and_no_more(tmp_path):
    data = str(rows_with_two_bad_ones(tmp_path / "data.jsonl"))
    with pytest.raises(LLMTrainError, match=r"data.jsonl, line 5: response is empty"):
        load_chat_rows(data)  # strict by default
    for allowance in (2, 0.2):
        bad = BadRows(allowance)
        assert len(load_chat_rows(data, bad_rows=bad)) == 10
        assert [row["where"] for row in bad.skipped] == [f"{data}, line 5", f"{data}, line 12"]
        assert "a 'prompt' row needs a 'response'" in bad.skipped[1]["reason"]
    for allowance in (1, 0.1):
        with pytest.raises(LLMTrainError, match=rf"2 of the 1[12] rows of .*data.jsonl cannot be used, more than "
                           rf"--max_bad_rows {allowance} allows. The first: .*line 5"):  # fmt: skip
            load_chat_rows(data, bad_rows=BadRows(allowance))


def test_max_bad_rows_skips_lines_that_are_not_json_or_not_utf8_like_any_other_bad_row(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}).encode() for i in range(100)]
    lines[10] = b'{"prompt": "q", "response": '  # cut short
    lines[40] = '{"prompt": "caf\xe9", "response": "oui"}'.encode("latin-1")  # not UTF-8
    lines[70] = b'{"prompt": "q"}'  # JSON, but no answer
    for name in ("data.jsonl", "data.json"):  # a .json file of JSON lines too
        data = tmp_path / name
        data.write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(LLMTrainError, match=rf"{name}, line 11: not valid JSON"):
            load_chat_rows(str(data))  # strict by default, as before
        bad = BadRows(0.05)
        assert len(load_chat_rows(str(data), bad_rows=bad)) == 97
        assert [row["where"] for row in bad.skipped] == [f"{data}, line {n}" for n in (11, 41, 71)]
        reasons = [row["reason"] for row in bad.skipped]
        assert "not valid JSON" in reasons[0] and "not UTF-8 text (byte 0xe9" in reasons[1]
        assert "a 'prompt' row needs a 'response'" in reasons[2]
        with pytest.raises(LLMTrainError, match=r"3 of the 100 rows .* more than --max_bad_rows 0.02 allows"):
            load_chat_rows(str(data), bad_rows=BadRows(0.02))


def test_every_row_skipped_says_so_with_the_first_reason_not_that_the_file_is_empty(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ['{"prompt": ', {"prompt": "q", "response": " "}])
    with pytest.raises(LLMTrainError, match=r"All 2 rows of .*data.jsonl were skipped as unusable under "
                       r"--max_bad_rows 1000: none is left to use. The first: .*line 1: not valid JSON"):  # fmt: skip
        load_chat_rows(str(data), bad_rows=BadRows(1000))


def test_skipped_rows_are_summarised_and_listed_in_the_run_folder(tmp_path, capsys):
    from llmtrain.config import SftConfig
    from llmtrain.data.splits import train_and_eval_rows

    data = rows_with_two_bad_ones(tmp_path / "data.jsonl")
    cfg = SftConfig(data=str(data), eval_data=str(SAMPLES / "sft_messages.jsonl"), max_bad_rows=2)
    run = Run(tmp_path / "sft", "sft", True)
    train, *_ = train_and_eval_rows(cfg, run, load_chat_rows, "sft_train.jsonl", "sft_val.jsonl")
    assert len(train) == 10
    assert "Skipped 2 rows of" in capsys.readouterr().out
    run.start({})
    listed = [json.loads(line) for line in (run.path / "bad_rows.jsonl").read_text().splitlines()]
    assert [row["where"].rsplit(" ", 1)[-1] for row in listed] == ["5", "12"]
    assert json.loads((run.path / "llmtrain.json").read_text())["bad_rows"] == 2


def test_a_line_that_is_not_json_is_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "response": "r"}, "", '{"prompt": "p",'])
    with pytest.raises(LLMTrainError, match=r"data\.jsonl, line 3: not valid JSON"):
        load_chat_rows(str(path))


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"question": "q", "answer": "a"}, r"unrecognised row shape \(keys: 'question', 'answer'\)"),
        (["prompt", "response"], "a row must be a JSON object"),
        ({"prompt": "q"}, "needs a 'response'"),
        ({"messages": "hello"}, "'messages' must be a non-empty list of messages"),
        ({"instruction": "q", "input": 3, "output": "a"}, "'input' must be a string"),
    ],
)
def test_rows_of_unknown_shape_name_file_and_line_and_list_the_accepted_shapes(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "response": "r"}, row])
    with pytest.raises(LLMTrainError, match=r"data\.jsonl, line 2: .*" + problem) as err:
        load_chat_rows(str(path))
    assert "Accepted row shapes" in str(err.value) and '"instruction"' in str(err.value)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "q", "response": "  "}, "response is empty"),
        ({"instruction": "q", "input": "", "output": ""}, "output is empty"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "message 2 .* empty"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"messages": [{"role": "human", "content": "q"}]}, "unknown role 'human'"),
        ({"messages": [{"role": "user", "content": {"text": "q"}}]}, "has dict content; content must be a string or"),
        ({"messages": [{"role": "user", "content": ["q"]}]}, r"message 1 .* has a content part that is not a text"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]}, "message 2 .* empty"),
        ({"conversations": [{"from": "narrator", "value": "q"}]}, "unknown role 'narrator'; ShareGPT speakers must"),
        ({"conversations": [{"from": "human", "text": "q"}]}, "must be an object with 'role' and 'content' .*'from'"),
    ],
)
def test_bad_conversations_name_the_row_and_the_fix(row, problem):
    with pytest.raises(LLMTrainError, match=r"^data\.jsonl, line 7: .*" + problem):
        to_messages(row, "data.jsonl, line 7")


def test_a_missing_file_and_an_unloadable_hub_id_give_clear_errors(tmp_path):
    with pytest.raises(LLMTrainError, match="does not exist"):
        load_chat_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(LLMTrainError, match="Could not load 'nobody-here/no-such-chat-data'.*Hub data set"):
        load_chat_rows("nobody-here/no-such-chat-data")


# ---------------------------------------------------------------- messages -> examples


def test_only_assistant_answers_and_their_end_tokens_are_trained_in_a_multi_turn_chat(tok):
    example = tokenize_chat(tok, MULTI_TURN, max_length=256)
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "18 + 38 = 56<|end|>52 + 62 = 114<|end|>"
    assert [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX] == trained
    assert tok.decode(example.input_ids) == tok.apply_chat_template(MULTI_TURN, tokenize=False)


def test_a_template_without_generation_markers_gets_the_same_mask_derived_from_its_rendering(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert tokenize_chat(plain, MULTI_TURN, max_length=256) == tokenize_chat(tok, MULTI_TURN, max_length=256)


def test_a_template_whose_answers_cannot_be_located_is_an_error_naming_the_problem(tok):
    odd = copy.deepcopy(tok)
    # No generation markers, and the generation prompt says "A:" while turns are rendered with the usual header:
    # no span can be verified.
    odd.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    header = "{{ '<|assistant|>\n' }}{%- endif"
    odd.chat_template = odd.chat_template.replace(header, header.replace("\n", "A:"))
    assert odd.chat_template != CHAT_TEMPLATE
    with pytest.raises(LLMTrainError, match=r"data.jsonl: .*could not be verified in 2 of 2 conversations.*show-data"):
        tokenize_dataset(odd, [MULTI_TURN, MULTI_TURN[1:3]], max_length=256, source="data.jsonl")


def test_a_template_that_writes_no_end_of_turn_token_is_refused(tok):
    no_end = copy.deepcopy(tok)
    no_end.chat_template = CHAT_TEMPLATE.replace("<|end|>", "\n\n")
    with pytest.raises(LLMTrainError, match="no end-of-turn token after an assistant answer"):
        tokenize_chat(no_end, MULTI_TURN, max_length=256)


def test_tool_turns_are_refused_naming_the_row_and_what_is_missing():
    row = {"messages": [*MULTI_TURN[:2], {"role": "tool", "content": "87"}, MULTI_TURN[2]]}
    with pytest.raises(LLMTrainError, match=r"f.jsonl, line 3: message 3 of 'messages' is a tool-call.*not supported"):
        to_messages(row, "f.jsonl, line 3")
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add"}}]}
    with pytest.raises(LLMTrainError, match="tool-call or tool-result turn"):
        to_messages({"messages": [MULTI_TURN[1], call]}, "f.jsonl, line 4")


def test_long_examples_are_truncated_while_an_answer_token_survives_and_dropped_otherwise(tok):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "2 + 2 = 4"}]
    long_prompt = [{"role": "user", "content": "What is 12 + 34? " * 10}, {"role": "assistant", "content": "46"}]
    full = tokenize_chat(tok, MULTI_TURN, max_length=1000)
    first_answer = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = first_answer + 3  # keeps the first three tokens of the first answer

    examples, stats = tokenize_dataset(tok, [short, MULTI_TURN, long_prompt], max_length=cut)
    assert len(examples) == 2  # the long prompt leaves no answer token within `cut`
    assert examples[1].input_ids == full.input_ids[:cut] and examples[1].labels == full.labels[:cut]
    assert (stats.rows, stats.truncated, stats.dropped) == (3, 1, 1)
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert stats.trained_tokens == sum(label != IGNORE_INDEX for e in examples for label in e.labels)
    assert "1 truncated" in stats.summary(cut) and "1 dropped" in stats.summary(cut)


def test_a_sharegpt_file_goes_through_the_sft_loading_and_tokenization(tok, tmp_path):
    from llmtrain.config import SftConfig
    from llmtrain.data.splits import train_and_eval_rows

    sharegpt = str(SAMPLES / "sft_sharegpt.jsonl")
    cfg = SftConfig(data=sharegpt, eval_data=sharegpt, runs_dir=str(tmp_path))
    run = Run(tmp_path / "sft", "sft", True)
    train, *_ = train_and_eval_rows(cfg, run, load_chat_rows, "sft_train.jsonl", "sft_val.jsonl")
    examples, stats = tokenize_dataset(tok, train, max_length=256, source=sharegpt)
    assert (stats.rows, stats.truncated, stats.dropped, stats.unverified) == (3, 0, 0, 0)
    trained = [tok.decode([t for t in e.labels if t != IGNORE_INDEX]) for e in examples]
    assert trained == ["18 + 38 = 56<|end|>52 + 62 = 114<|end|>", "90 - 66 = 24<|end|>", "79 - 60 = 19<|end|>"]
    assert tok.decode(examples[0].input_ids) == tok.apply_chat_template(MULTI_TURN, tokenize=False)


# ---------------------------------------------------------------- batches


def test_padded_batches_pad_to_the_longest_example_in_the_batch_only():
    examples = [Example([5, 6, 7], [-100, 6, 7]), Example([8, 9], [-100, 9])]
    batch = collate_padded(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]


def test_packing_fills_rows_best_fit_decreasing_and_restarts_positions_per_example():
    examples = [Example([i] * n, [i] * n) for i, n in enumerate([6, 5, 4, 3, 2], start=1)]
    rows = pack_examples(examples, max_length=10)
    assert [r.input_ids for r in rows] == [[1] * 6 + [3] * 4, [2] * 5 + [4] * 3 + [5] * 2]
    assert rows[1].position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    # The first token of every example is never a target, whatever the example's own labels say.
    assert rows[1].labels == [-100, 2, 2, 2, 2, -100, 4, 4, -100, 5]
    with pytest.raises(LLMTrainError, match="does not fit max_length=4"):
        pack_examples(examples, max_length=4)


def test_packed_collation_pads_with_a_separate_segment_and_no_attention_mask():
    rows = pack_examples([Example([1, 2, 3], [-100, 2, 3]), Example([4, 5], [-100, 5]), Example([6], [6])], 5)
    batch = collate_packed(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100] * 5]


def test_masked_loss_is_transformers_shifted_loss_summed_with_its_token_count(tok, sample_chats, nano_model):
    examples, _ = tokenize_dataset(tok, sample_chats[:4], max_length=256)
    batch = collate_padded(examples, tok.pad_token_id)
    with torch.no_grad():
        out = nano_model(**batch, use_cache=False)
    total, count = masked_lm_loss(out.logits, batch["labels"])
    assert count == sum(label != IGNORE_INDEX for e in examples for label in e.labels)
    torch.testing.assert_close(total / count, out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("what", ["cross entropy", "token log-probabilities", "sampler's log-probabilities"])
def test_a_large_vocabulary_loss_in_chunks_keeps_only_the_logits_for_backward_with_the_same_values(what):
    """Above a size, vocabulary-wide functions run over chunks of positions, recomputed in the backward pass: the
    memory kept for backward beside the logits is then a few bytes per position instead of 4 per position and
    vocabulary entry (the fp32 log-softmax); every value and gradient is the same."""
    import functools

    from llmtrain.data.chat import _cross_entropy
    from llmtrain.data.preferences import _token_logprobs
    from llmtrain.rl import _logprobs_at

    fn = {
        "cross entropy": _cross_entropy,  # SFT
        "token log-probabilities": _token_logprobs,  # DPO
        "sampler's log-probabilities": functools.partial(_logprobs_at, temperature=0.7),  # PPO
    }[what]
    torch.manual_seed(0)
    vocab = 1000
    logits = torch.randn(2, 64, vocab).bfloat16().requires_grad_()  # as a model gives them under bf16 autocast
    targets = torch.randint(0, vocab, (2, 64))
    if fn is _cross_entropy:
        targets[:, :10] = IGNORE_INDEX  # prompt tokens

    def run(chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        kept: dict[int, int] = {}  # storages saved for backward, other than the logits' own

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() != logits.untyped_storage().data_ptr():
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            values = over_positions(fn, logits, targets, chunk=chunk)
        (grad,) = torch.autograd.grad(values.sum(), logits)
        return values.detach(), grad, sum(kept.values())

    whole, grad_whole, kept_whole = run(chunk=1 << 30)
    chunked, grad_chunked, kept_chunked = run(chunk=16 * vocab)  # 16 positions at a time: 8 chunks
    assert torch.equal(chunked, whole) and torch.equal(grad_chunked, grad_whole)
    assert kept_whole >= 2 * 64 * vocab * 4  # the fp32 log-softmax (or its exp) of every position
    assert kept_chunked <= 2 * 64 * 16  # the targets, a few bytes per position


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo"])
def test_a_stage_whose_vocabulary_loss_goes_in_chunks_follows_the_same_curve(
    stage, request, held_out, one_thread, monkeypatch
):
    import torch.utils.checkpoint

    from llmtrain import losses

    calls, checkpoint = [0], torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls[0] += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    runs = {}
    for chunked in (False, True):
        if chunked:
            monkeypatch.setattr(losses, "VOCAB_CHUNK_ELEMENTS", 4096)  # a few positions of the tiny vocabulary
        config = few_steps_config(stage, request, held_out, run_name=f"{stage}-chunk{chunked}")
        runs[chunked] = stage_runners()[stage](config)
        assert (calls[0] > 0) == chunked
    # The same bits: each position's value and gradient are computed alike, and summed in the same order.
    assert logged(runs[True]).keys() == logged(runs[False]).keys()
    for step, line in logged(runs[False]).items():
        for key in ("train_loss", "policy_loss", "value_loss", "reward_mean", "kl"):
            assert logged(runs[True])[step].get(key) == line.get(key), (step, key)


def test_packed_batch_loss_equals_the_examples_run_one_by_one(tok, sample_chats, nano_model):
    examples, stats = tokenize_dataset(tok, sample_chats, max_length=128)
    rows = pack_examples(examples, max_length=96)
    assert len(rows) < len(examples) and len({len(r.input_ids) for r in rows}) > 1  # really packed, and padded
    batch = collate_packed(rows, tok.pad_token_id)
    with torch.no_grad():
        logits = nano_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        packed_loss, packed_count = masked_lm_loss(logits, batch["labels"])
        alone = [
            masked_lm_loss(nano_model(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels]))
            for e in examples
        ]
        # Control: the same rows with one running position per row let attention and positions leak.
        running = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        leaky_logits = nano_model(input_ids=batch["input_ids"], position_ids=running, use_cache=False).logits
        leaky_loss, _ = masked_lm_loss(leaky_logits, batch["labels"])
    alone_loss = torch.stack([loss for loss, _ in alone]).sum()
    assert packed_count == sum(int(n) for _, n in alone) == stats.trained_tokens
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-5)
    # Far outside the tolerance above (the gap is small only because a random model attends almost uniformly).
    assert abs(leaky_loss - alone_loss) > 10 * (1e-5 * alone_loss + 1e-5)
