"""tests/families.py builds folders that look like the published models: tokens, templates, ids, and they run."""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, TRL_TEMPLATES
from transformers import AutoModelForCausalLM, AutoTokenizer

SYSTEM, USER, ASSISTANT = "Be brief.", "What is 2 + 3?", "2 + 3 = 5"
CHATML = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
GEMMA_TURNS = "<start_of_turn>user\n{}What is 2 + 3?<end_of_turn>\n<start_of_turn>model\n2 + 3 = 5<end_of_turn>\n"

# name: architecture, bos, eos, pad, generation eos, special tokens, trl template, [system?, user, assistant] rendered
PUBLISHED = {
    "qwen2.5": (
        "Qwen2ForCausalLM",
        None,
        "<|im_end|>",
        "<|endoftext|>",
        ["<|im_end|>", "<|endoftext|>"],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "qwen2_5.jinja",
        CHATML + "2 + 3 = 5<|im_end|>\n",
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        None,
        "<|im_end|>",
        "<|endoftext|>",
        ["<|im_end|>", "<|endoftext|>"],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "qwen3.jinja",
        CHATML + "<think>\n\n</think>\n\n2 + 3 = 5<|im_end|>\n",
    ),
    "llama3.2": (
        "LlamaForCausalLM",
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        "llama3_2.jinja",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is 2 + 3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5<|eot_id|>",
    ),
    "smollm2": (
        "LlamaForCausalLM",
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|im_end|>",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        CHATML + "2 + 3 = 5<|im_end|>\n",
    ),
    "mistral": (
        "MistralForCausalLM",
        "<s>",
        "</s>",
        None,
        "</s>",
        ["<unk>", "<s>", "</s>"],
        None,
        "<s>[INST] What is 2 + 3? [/INST]2 + 3 = 5</s>",
    ),
    "gemma2": (
        "Gemma2ForCausalLM",
        "<bos>",
        "<eos>",
        "<pad>",
        ["<eos>", "<end_of_turn>"],
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "gemma.jinja",
        "<bos>" + GEMMA_TURNS.format(""),
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        "<bos>",
        "<eos>",
        "<pad>",
        ["<eos>", "<end_of_turn>"],
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "gemma3.jinja",
        "<bos>" + GEMMA_TURNS.format("Be brief.\n\n"),
    ),
    "phi3": (
        "Phi3ForCausalLM",
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        ["<|endoftext|>", "<|assistant|>", "<|end|>"],
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        "phi3.jinja",
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 + 3?<|end|>\n<|assistant|>\n2 + 3 = 5<|end|>\n<|endoftext|>",
    ),
    "gpt2": ("GPT2LMHeadModel", "<|endoftext|>", "<|endoftext|>", None, "<|endoftext|>", ["<|endoftext|>"], None, None),
}
REFUSE_SYSTEM = {"mistral", "gemma2"}
TIED = {"qwen2.5", "qwen3", "llama3.2", "smollm2", "gemma2", "gemma3", "gpt2"}


def test_every_family_has_a_published_row_in_the_same_order():
    assert FAMILIES == tuple(PUBLISHED)


@pytest.mark.parametrize("name", FAMILIES)
def test_tokenizer_as_published(family_models, name):
    _, bos, eos, pad, gen_eos, specials, trl_template, _ = PUBLISHED[name]
    tok = AutoTokenizer.from_pretrained(family_models[name])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
    for token in specials:  # one id each, marked special, skipped on decode
        (token_id,) = tok(token, add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(token_id) == token and tok.added_tokens_decoder[token_id].special
        assert tok.decode([token_id], skip_special_tokens=True) == ""
    ids = tok("What is 2 + 3?").input_ids  # bos added by the tokenizer exactly where the published one adds it
    assert (ids[0] == tok.bos_token_id) == (name in {"llama3.2", "mistral", "gemma2", "gemma3"})
    if trl_template:  # byte-identical, so trl recognises the template
        assert tok.chat_template == (TRL_TEMPLATES / trl_template).read_text()
    generation = json.loads((family_models[name] / "generation_config.json").read_text())
    expected = [tok.convert_tokens_to_ids(t) for t in gen_eos] if isinstance(gen_eos, list) else tok.eos_token_id
    assert generation["eos_token_id"] == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_chat_template_renders_as_published(family_models, name):
    rendered = PUBLISHED[name][-1]
    tok = AutoTokenizer.from_pretrained(family_models[name])
    if rendered is None:
        assert tok.chat_template is None
        return
    chat = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER},
        {"role": "assistant", "content": ASSISTANT},
    ]
    if name in REFUSE_SYSTEM:
        with pytest.raises(Exception, match="upported|alternate"):
            tok.apply_chat_template(chat, tokenize=False)
        chat = chat[1:]
    assert tok.apply_chat_template(chat, tokenize=False, date_string="26 Jul 2024") == rendered
    if name == "smollm2":  # no system message: the published default one is injected
        default = tok.apply_chat_template(chat[1:], tokenize=False)
        assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging")


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_loads_as_its_published_class_and_gives_finite_logits(family_models, name):
    folder = family_models[name]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == PUBLISHED[name][0]
    config = model.config
    assert (config.bos_token_id, config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    assert config.eos_token_id == tok.eos_token_id and config.vocab_size >= len(tok)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (name in TIED)
    ids = tok(["What is 2 + 3? 2 + 3 = 5"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and torch.isfinite(logits).all()
