from transformers import AutoTokenizer

from llmtrain.tokenizer import END_OF_TURN, token_byte_lengths, train_tokenizer

TEXTS = ["What is 23 + 45? 23 + 45 = 68. The sum of 12 and 30 is 42.", "Ann had 7 apples, café and naïve."] * 50


def test_round_trip_is_exact_for_any_text_and_digits_are_split():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    for text in ["What is 123 + 4567?", "unseen wörds, emoji 🙂 and\ttabs\n", "  leading spaces"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    pieces = tok.tokenize("12345")
    assert [p for p in pieces] == ["1", "2", "3", "4", "5"]


def test_special_tokens_and_chat_template_survive_save_and_load(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.pad_token == "<|pad|>" and loaded.eos_token == "<|eos|>" and loaded.bos_token == "<|bos|>"
    assert len({loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id}) == 3  # pad is never EOS
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4"},
    ]
    text = loaded.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>\nBe brief.<|end|><|user|>\nWhat is 2 + 2?<|end|><|assistant|>\n2 + 2 = 4<|end|>"
    prompt = loaded.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")


def test_assistant_mask_covers_the_answer_and_its_end_of_turn_token():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4"}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "2 + 2 = 4" + END_OF_TURN


def test_token_byte_lengths_add_up_to_the_utf8_length():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    lengths = token_byte_lengths(tok)
    text = "The sum of 12 and 30 is 42, café 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert lengths[tok.eos_token_id] == 0
