import copy
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmtrain.data.chat import IGNORE_INDEX, BadRows, Example
from llmtrain.data.corpus import REPO_DATA_DIR
from llmtrain.data.preferences import (
    PreferencePair,
    TokenizedPair,
    collate_pairs,
    load_preference_pairs,
    sequence_logprobs,
    to_pair,
    tokenize_pairs,
)
from llmtrain.errors import LLMTrainError
from llmtrain.registry import preset_config
from llmtrain.tokenizer import CHAT_TEMPLATE, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread

SAMPLES = REPO_DATA_DIR / "samples"
PREF_FILES = ("prefs.jsonl", "prefs_messages.jsonl", "prefs_hh.jsonl")
HH = "\n\nHuman: What is 2 + 2?\n\nAssistant: {}"  # an HH-RLHF conversation with the answer left open
SYSTEM = "You are a careful arithmetic tutor. Answer with the full equation."


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# A prompt with an earlier assistant turn: only the final answer may be labelled.
MULTI_TURN = PreferencePair(
    prompt=[user("What is 87 - 56?"), assistant("87 - 56 = 31"), user("What is 67 + 98?")],
    chosen=[assistant("67 + 98 = 165")],
    rejected=[assistant("67 + 98 = 155")],
)


@pytest.fixture(scope="module")
def tok():
    lines = (REPO_DATA_DIR / "corpus.txt").read_text().splitlines()[:300]
    for name in PREF_FILES:
        lines += (SAMPLES / name).read_text().splitlines()
    return train_tokenizer(lines, vocab_size=400)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def answer_text(tok, example: Example) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX])


# ---------------------------------------------------------------- rows -> pairs


def test_string_rows_become_one_user_prompt_and_one_assistant_answer_per_side():
    pairs = load_preference_pairs(str(SAMPLES / "prefs.jsonl"))
    assert len(pairs) == 10
    assert pairs[0] == PreferencePair(
        [user("What is 83 - 47?")], [assistant("83 - 47 = 36")], [assistant("83 - 47 = 130")]
    )


def test_message_list_rows_keep_the_system_message_in_the_prompt():
    pairs = load_preference_pairs(str(SAMPLES / "prefs_messages.jsonl"))
    assert len(pairs) == 10
    assert pairs[0] == PreferencePair(
        [{"role": "system", "content": SYSTEM}, user("What is 83 - 47?")],
        [assistant("83 - 47 = 36")],
        [assistant("83 - 47 = 130")],
    )
    assert pairs[1].prompt == [user("What is 87 - 56?")]


def test_hh_rlhf_text_is_split_into_turns_at_the_common_prefix():
    pairs = load_preference_pairs(str(SAMPLES / "prefs_hh.jsonl"))
    assert len(pairs) == 10
    assert pairs[0] == load_preference_pairs(str(SAMPLES / "prefs.jsonl"), max_rows=1)[0]
    assert pairs[2] == MULTI_TURN  # line 3 is a two-question conversation whose last answers differ


def test_full_conversations_as_message_lists_are_split_at_the_longest_common_prefix():
    shared = [{"role": "system", "content": SYSTEM}, user("What is 45 + 42?"), assistant("45 + 42 = 87")]
    row = {
        "chosen": [*shared, user("And 76 - 47?"), assistant("76 - 47 = 29")],
        "rejected": [*shared, user("And 76 - 47?"), assistant("76 - 47 = 31")],
    }
    assert to_pair(row, "x") == PreferencePair(
        [*shared, user("And 76 - 47?")], [assistant("76 - 47 = 29")], [assistant("76 - 47 = 31")]
    )


def test_answers_may_be_several_assistant_messages_and_the_prompt_may_end_after_an_assistant_turn():
    row = {
        "chosen": [user("2 + 2?"), assistant("Let me think."), assistant("4")],
        "rejected": [user("2 + 2?"), assistant("Let me think."), assistant("5")],
    }
    assert to_pair(row, "x") == PreferencePair(
        [user("2 + 2?"), assistant("Let me think.")], [assistant("4")], [assistant("5")]
    )
    row = {"prompt": [user("2 + 2?")], "chosen": [assistant("Hmm."), assistant("4")], "rejected": "5"}
    assert to_pair(row, "x").chosen == [assistant("Hmm."), assistant("4")]


def test_ultrafeedback_rows_split_the_repeated_prompt_off_both_conversations():
    pairs = load_preference_pairs(str(SAMPLES / "prefs_ultrafeedback.jsonl"))
    assert pairs[0] == PreferencePair(
        [user("What is 83 - 47?")], [assistant("83 - 47 = 36")], [assistant("83 - 47 = 130")]
    )
    assert pairs == load_preference_pairs(str(SAMPLES / "prefs.jsonl"), max_rows=2)


def test_with_a_prompt_field_full_conversations_keep_every_shared_turn_in_the_prompt():
    shared = [{"role": "system", "content": SYSTEM}, user("What is 45 + 42?"), assistant("45 + 42 = 87")]
    row = {
        "prompt": "And 76 - 47?",
        "chosen": [*shared, user("And 76 - 47?"), assistant("76 - 47 = 29")],
        "rejected": [*shared, user("And 76 - 47?"), assistant("76 - 47 = 31")],
    }
    assert to_pair(row, "x") == PreferencePair(
        [*shared, user("And 76 - 47?")], [assistant("76 - 47 = 29")], [assistant("76 - 47 = 31")]
    )


def test_sharegpt_messages_and_text_parts_are_read_in_preference_rows():
    row = {
        "chosen": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"}],
        "rejected": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "5"}],
    }
    assert to_pair(row, "x") == PreferencePair([user("2 + 2?")], [assistant("4")], [assistant("5")])
    parts = [{"type": "text", "text": "2 + "}, {"type": "text", "text": "2?"}]
    row = {"prompt": [{"role": "user", "content": parts}], "chosen": "4", "rejected": "5"}
    assert to_pair(row, "x") == PreferencePair([user("2 + 2?")], [assistant("4")], [assistant("5")])


def test_the_large_training_file_loads_with_max_rows():
    pairs = load_preference_pairs(str(REPO_DATA_DIR / "prefs_train.jsonl"), max_rows=5)
    assert len(pairs) == 5
    assert pairs[0].prompt == [user("What is 70 - 52?")] and pairs[0].rejected == [assistant("70 - 52 = 28")]


def test_a_folder_of_json_and_parquet_files_and_a_missing_hub_id_use_the_chat_readers(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "p1", "chosen": "c1", "rejected": "r1"}]))
    rows = [{"chosen": HH.format("c2"), "rejected": HH.format("r2")}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    pairs = load_preference_pairs(str(tmp_path))
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [("c1", "r1"), ("c2", "r2")]
    with pytest.raises(LLMTrainError, match="Could not load 'nobody-here/no-such-prefs'.*Hub data set"):
        load_preference_pairs("nobody-here/no-such-prefs")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (["chosen", "rejected"], "a row must be a JSON object"),
        ({"prompt": "q", "chosen": "a"}, r"the row has no 'rejected' \(keys: 'prompt', 'chosen'\)"),
        ({"question": "q"}, "the row has no 'chosen' and no 'rejected'"),
        ({"chosen": "4", "rejected": "5"}, "'chosen' is plain text but the row has no 'prompt'"),
        ({"chosen": HH.format("4"), "rejected": [assistant("5")]}, "must both be full conversations"),
        ({"prompt": "q", "chosen": "a", "rejected": 5}, "'rejected' must be a string or a non-empty list"),
        ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}, "must be an object with 'role'"),
    ],
)
def test_rows_of_unknown_shape_name_file_and_line_and_list_the_accepted_shapes(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(LLMTrainError, match=r"prefs\.jsonl, line 2: .*" + problem) as err:
        load_preference_pairs(str(path))
    assert "Accepted preference shapes" in str(err.value) and "HH-RLHF" in str(err.value)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": [assistant(" ")]}, "message 1 of 'rejected' is empty"),
        ({"chosen": HH.format("4"), "rejected": HH.format("")}, r"turn 2 of 'rejected' \(Assistant:\) is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are identical"),
        ({"chosen": HH.format("4"), "rejected": HH.format(" 4")}, "'chosen' and 'rejected' are identical"),
        (
            {"chosen": HH.format("4") + "\n\nHuman: Sure?\n\nAssistant: Yes.", "rejected": HH.format("4")},
            "'rejected' ends where the 2 messages it shares .* no answer of its own",
        ),
        (
            {"chosen": HH.format("4"), "rejected": "\n\nHuman: What is 2 + 3?\n\nAssistant: 4"},
            "'chosen' and 'rejected' share no prompt",
        ),
        (
            {"chosen": [assistant("4")], "rejected": [assistant("5")]},
            "'chosen' and 'rejected' share no prompt",
        ),
        (
            {"chosen": [user("q"), assistant("4")], "rejected": [user("q"), user("Sure?"), assistant("5")]},
            "message 2 of 'rejected' is a 'user' turn after the first 1 message",
        ),
        (
            {"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": "b"},
            "message 1 of 'chosen' is a 'user' turn, but with a 'prompt' field 'chosen' must hold only",
        ),
        ({"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown role 'human'"),
        ({"prompt": "q", "chosen": [{"role": "gpt", "content": "a"}], "rejected": "b"}, "unknown role 'gpt'"),
        (
            {
                "prompt": "What is 2 + 3?",
                "chosen": [user("What is 2 + 2?"), assistant("4")],
                "rejected": [user("What is 2 + 2?"), assistant("5")],
            },
            r"'prompt' is not the last user turn that 'chosen' and 'rejected' share \(message 1\)",
        ),
        (
            {"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("a")]},
            "'chosen' and 'rejected' are identical",
        ),
        (
            {"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("r"), assistant("b")]},
            "'chosen' and 'rejected' share no prompt",
        ),
        (
            {"prompt": [user([{"type": "text", "text": "Cat?"}, {"type": "image"}])], "chosen": "a", "rejected": "b"},
            "message 1 of 'prompt' has a part of type 'image'; only text is trained",
        ),
        (
            {
                "chosen": [{"from": "human", "value": "q"}, {"from": "observation", "value": "{}"}],
                "rejected": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
            "message 2 of 'chosen' is a tool-call or tool-result turn",
        ),
    ],
)
def test_bad_pairs_name_file_line_and_the_fix(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, "", row])
    with pytest.raises(LLMTrainError, match=r"^\S*prefs\.jsonl, line 3: .*" + problem):
        load_preference_pairs(str(path))


def test_pairs_all_skipped_as_bad_say_so_and_the_skips_are_listed_in_the_run_folder(tmp_path):
    from llmtrain.config import RewardConfig
    from llmtrain.data.splits import train_and_eval_rows
    from llmtrain.run_dir import Run

    same = {"prompt": "p", "chosen": "a", "rejected": "a"}
    data = write_jsonl(tmp_path / "same.jsonl", [same] * 5)
    with pytest.raises(LLMTrainError) as refused:
        load_preference_pairs(str(data), bad_rows=BadRows(100))
    message = str(refused.value)
    assert message.startswith(f"All 5 rows of {data} were skipped as unusable under --max_bad_rows 100")
    assert "line 1: 'chosen' and 'rejected' are identical" in message and "holds no rows" not in message

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [same, '{"prompt": "p", ', *[{**same, "rejected": "b"}] * 8])
    cfg = RewardConfig(data=str(mixed), eval_data=str(SAMPLES / "prefs.jsonl"), max_bad_rows=0.2)
    run = Run(tmp_path / "rm", "reward", True)
    train, *_ = train_and_eval_rows(cfg, run, load_preference_pairs, "prefs_train.jsonl", "prefs_val.jsonl")
    run.start({})
    listed = [json.loads(line) for line in (run.path / "bad_rows.jsonl").read_text().splitlines()]
    assert len(train) == 8 and [row["where"] for row in listed] == [f"{mixed}, line {n}" for n in (1, 2)]
    assert "not valid JSON" in listed[1]["reason"]


# ---------------------------------------------------------------- pairs -> token pairs


@pytest.mark.parametrize("name", PREF_FILES)
def test_only_the_answer_and_its_end_token_are_labelled_on_both_sides(tok, name):
    pairs = load_preference_pairs(str(SAMPLES / name))
    tokenized, stats = tokenize_pairs(tok, pairs, max_length=256)
    assert (stats.rows, stats.truncated, stats.dropped) == (10, 0, 0)
    for pair, tp in zip(pairs, tokenized):
        for answer, example in ((pair.chosen, tp.chosen), (pair.rejected, tp.rejected)):
            assert answer_text(tok, example) == answer[-1]["content"] + "<|end|>"
            assert tok.decode(example.input_ids) == tok.apply_chat_template(pair.prompt + answer, tokenize=False)
            # Labels are the input ids where set: the mask selects, it does not change tokens.
            assert all(label in (IGNORE_INDEX, t) for t, label in zip(example.input_ids, example.labels))


def test_an_earlier_assistant_turn_in_the_prompt_is_not_labelled(tok):
    (tp,), _ = tokenize_pairs(tok, [MULTI_TURN], max_length=256)
    assert answer_text(tok, tp.chosen) == "67 + 98 = 165<|end|>"
    assert answer_text(tok, tp.rejected) == "67 + 98 = 155<|end|>"
    prompt_len = len(tok.apply_chat_template(MULTI_TURN.prompt, add_generation_prompt=True)["input_ids"])
    assert tp.chosen.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tp.chosen.labels[prompt_len] != IGNORE_INDEX  # the answer starts right after the generation prompt


def test_long_pairs_are_truncated_while_both_sides_keep_an_answer_token_and_dropped_otherwise(tok):
    long_answer = PreferencePair([user("Hi")], [assistant("2 + 2 = 4, " * 10)], [assistant("5")])
    long_prompt = PreferencePair([user("What is 12 + 34? " * 10)], [assistant("46")], [assistant("47")])
    (fits, full), _ = tokenize_pairs(tok, [MULTI_TURN, long_answer], max_length=1000)
    # MULTI_TURN and the short rejected side fit; the long chosen side keeps part of its answer.
    cut = max(len(fits.chosen.input_ids), len(fits.rejected.input_ids), len(full.rejected.input_ids))
    assert cut < len(full.chosen.input_ids) - 5

    kept, stats = tokenize_pairs(tok, [MULTI_TURN, long_answer, long_prompt], max_length=cut)
    assert (stats.rows, stats.truncated, stats.dropped) == (3, 1, 1)
    assert len(kept) == 2 and kept[0] == fits and kept[1].rejected == full.rejected
    assert kept[1].chosen == Example(full.chosen.input_ids[:cut], full.chosen.labels[:cut])
    assert "1 truncated" in stats.summary(cut) and "1 dropped" in stats.summary(cut)


def test_pairs_whose_answer_cannot_be_located_are_an_error_naming_the_template_problem(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    header = "{{ '<|assistant|>\n' }}{%- endif"
    odd.chat_template = odd.chat_template.replace(header, header.replace("\n", "A:"))
    assert "A:" in odd.chat_template
    with pytest.raises(LLMTrainError, match="prefs.jsonl: the chat template's assistant spans could not be verified"):
        tokenize_pairs(odd, [MULTI_TURN], max_length=256, source="prefs.jsonl")


# ---------------------------------------------------------------- batches and scores


def test_collated_pairs_put_chosen_rows_first_then_rejected_padded_to_the_longest():
    pairs = [
        TokenizedPair(Example([1, 2, 3], [-100, 2, 3]), Example([1, 4], [-100, 4])),
        TokenizedPair(Example([5, 6], [-100, 6]), Example([5, 7, 8, 9], [-100, 7, 8, 9])),
    ]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [-100, 2, 3, -100],
        [-100, 6, -100, -100],
        [-100, 4, -100, -100],
        [-100, 7, 8, 9],
    ]


def test_sequence_logprobs_sums_the_shifted_log_probabilities_of_labelled_tokens():
    logits = torch.zeros(2, 4, 3)  # uniform over 3 tokens: each labelled token scores log(1/3)
    labels = torch.tensor([[-100, -100, 1, 2], [-100, 0, -100, -100]])
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.tensor([2 * math.log(1 / 3), math.log(1 / 3)]))

    # A confident model: position 1 predicts token 1 with logit 10, so the first answer token costs almost nothing.
    logits[0, 1, 1] = 10.0
    expected = (10 - math.log(math.exp(10) + 2)) + math.log(1 / 3)
    assert sequence_logprobs(logits, labels)[0].item() == pytest.approx(expected, rel=1e-6)


def test_sequence_logprobs_equals_minus_cross_entropy_summed_over_answer_positions():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(sequence_logprobs(logits, labels), -ce.sum(-1))
    torch.testing.assert_close(sequence_logprobs(logits.bfloat16(), labels), -ce.sum(-1), rtol=0.02, atol=0.1)


def test_one_padded_forward_pass_scores_each_side_as_if_it_ran_alone(tok):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("gpt-nano", len(tok), 256, {})).eval()
    pairs = load_preference_pairs(str(SAMPLES / "prefs_hh.jsonl"), max_rows=3)
    tokenized, _ = tokenize_pairs(tok, pairs, max_length=256)
    batch = collate_pairs(tokenized, tok.pad_token_id)
    with torch.no_grad():
        batched = sequence_logprobs(model(**batch, use_cache=False).logits, batch["labels"])
        alone = [
            sequence_logprobs(model(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels]))[0]
            for e in [tp.chosen for tp in tokenized] + [tp.rejected for tp in tokenized]
        ]
    assert batched.shape == (6,) and (batched < 0).all()
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-5)
