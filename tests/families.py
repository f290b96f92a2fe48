"""Tiny random models of real Hugging Face families, built offline, for tests that must see real-world models.

Each family imitates one published instruct model: its architecture (2 layers, width 64, 4 heads, 2 kv heads),
and above all its tokenizer as published on the Hub: the tokenizer class, where the special tokens sit and which
ones are special, bos/eos/pad/unk, whether a bos is added, the chat template and generation_config's eos list.
The vocabularies are small BPEs trained on the project's own data (data/sft_train.jsonl, data/corpus.txt), so the
models can be fine-tuned on it. Each family is saved as a normal Hugging Face folder that loads with
`AutoModelForCausalLM` / `AutoTokenizer` without trust_remote_code.

    from families import FAMILIES, build_all, build_family
    folder = build_family("qwen2.5", tmp_path)   # tmp_path/qwen2.5, built once

What differs from the real thing: ids (a ~500-token vocabulary), the published long tails of unused added tokens
(reserved/placeholder/vision tokens) and rope scaling; weights are random (torch.manual_seed(0)).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import trl
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[1]
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
LLAMA3_SPLIT = (  # Llama 3's tiktoken pre-tokenization regex, as in its tokenizer.json
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    hub_id: str  # the published model imitated
    model_type: str  # transformers config model_type; the architecture is its *ForCausalLM
    tokenizer: str  # tokenizer_class as published: byte-level (Qwen2/GPT2/PreTrainedTokenizerFast) or SentencePiece
    eos: str
    gen_eos: tuple[str, ...]  # generation_config.eos_token_id (an int when one token, as published)
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    end_of_turn: str | None = None  # the token that closes an assistant turn in the chat template
    first: tuple[str, ...] = ()  # special tokens at the start of the vocabulary
    last: tuple[str, ...] = ()  # special tokens appended after the trained vocabulary
    plain: tuple[str, ...] = ()  # added tokens that are not special (<think>, <tool_call>)
    rstrip: tuple[str, ...] = ()  # added tokens that swallow the whitespace after them (Phi-3's tokenizer.json)
    add_bos: bool = False  # the tokenizer prepends bos on add_special_tokens=True
    template: str | None = None  # a trl chat_templates/*.jinja name or the template itself
    tied: bool = True
    vocab_multiple: int = 1  # embedding rows rounded up past len(tokenizer), as Qwen and Phi-3 publish
    config: dict[str, Any] = field(default_factory=dict)  # extra config fields
    generation: dict[str, Any] = field(default_factory=dict)  # published sampling defaults in generation_config


QWEN = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SPECS: dict[str, Family] = {
    "qwen2.5": Family(
        "Qwen/Qwen2.5-0.5B-Instruct",
        "qwen2",
        "Qwen2Tokenizer",
        eos="<|im_end|>",
        pad="<|endoftext|>",
        gen_eos=("<|im_end|>", "<|endoftext|>"),
        end_of_turn="<|im_end|>",
        last=QWEN,
        plain=("<tool_call>", "</tool_call>"),
        template="qwen2_5.jinja",
        vocab_multiple=64,
        generation=dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1),
    ),
    "qwen3": Family(
        "Qwen/Qwen3-0.6B",
        "qwen3",
        "Qwen2Tokenizer",
        eos="<|im_end|>",
        pad="<|endoftext|>",
        gen_eos=("<|im_end|>", "<|endoftext|>"),
        end_of_turn="<|im_end|>",
        last=QWEN,
        plain=("<tool_call>", "</tool_call>", "<think>", "</think>"),
        template="qwen3.jinja",
        vocab_multiple=64,
        config=dict(head_dim=16),
        generation=dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=20),
    ),
    "llama3.2": Family(
        "meta-llama/Llama-3.2-1B-Instruct",
        "llama",
        "PreTrainedTokenizerFast",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        gen_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        end_of_turn="<|eot_id|>",
        last=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ),
        add_bos=True,
        template="llama3_2.jinja",
        generation=dict(do_sample=True, temperature=0.6, top_p=0.9),
    ),
    "smollm2": Family(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "llama",
        "GPT2Tokenizer",
        bos="<|im_start|>",
        eos="<|im_end|>",
        pad="<|im_end|>",
        unk="<|endoftext|>",
        gen_eos=("<|im_end|>",),
        end_of_turn="<|im_end|>",
        first=QWEN,
        template=SMOLLM2_TEMPLATE,
    ),
    "mistral": Family(
        "mistralai/Mistral-7B-Instruct-v0.1",
        "mistral",
        "LlamaTokenizer",
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        gen_eos=("</s>",),
        end_of_turn="</s>",
        first=("<unk>", "<s>", "</s>"),
        add_bos=True,
        template=MISTRAL_V01_TEMPLATE,
        tied=False,
    ),
    "gemma2": Family(
        "google/gemma-2-2b-it",
        "gemma2",
        "GemmaTokenizer",
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        gen_eos=("<eos>", "<end_of_turn>"),
        end_of_turn="<end_of_turn>",
        first=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        add_bos=True,
        template="gemma.jinja",
        config=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=128),
        generation=dict(cache_implementation="hybrid"),
        # Gemma 2 soft-caps attention logits, so Gemma2PreTrainedModel has _supports_sdpa = False: a plain
        # from_pretrained silently picks "eager" (no config field needed), attn_implementation="sdpa" raises
        # ValueError "Gemma2ForCausalLM does not support an attention implementation through ... sdpa yet".
    ),
    "gemma3": Family(
        "google/gemma-3-1b-it",
        "gemma3_text",
        "GemmaTokenizer",
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        gen_eos=("<eos>", "<end_of_turn>"),
        end_of_turn="<end_of_turn>",
        first=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        add_bos=True,
        template="gemma3.jinja",
        config=dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"],
        ),
        generation=dict(cache_implementation="hybrid", do_sample=True, top_k=64, top_p=0.95),
    ),
    "phi3": Family(
        "microsoft/Phi-3-mini-4k-instruct",
        "phi3",
        "LlamaTokenizer",
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<unk>",
        gen_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"),
        end_of_turn="<|end|>",
        first=("<unk>", "<s>", "</s>"),
        last=("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        rstrip=("</s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        template="phi3.jinja",
        tied=False,
        vocab_multiple=64,
    ),
    "gpt2": Family(
        "openai-community/gpt2",
        "gpt2",
        "GPT2Tokenizer",
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        unk="<|endoftext|>",
        gen_eos=("<|endoftext|>",),
        last=("<|endoftext|>",),
        config=dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512),
    ),
}
FAMILIES: tuple[str, ...] = tuple(SPECS)
VOCAB_SIZE = 512  # trained entries, specials and SentencePiece's 256 byte pieces included


@functools.cache
def corpus(rows: int = 400, docs: int = 200) -> tuple[str, ...]:
    """What the vocabularies learn from: SFT prompts and responses, then the first pretraining documents."""
    lines = (REPO / "data" / "sft_train.jsonl").read_text().splitlines()[:rows]
    texts = [str(value) for line in lines for value in json.loads(line).values()]
    return tuple(texts + (REPO / "data" / "corpus.txt").read_text().split("\n\n")[:docs])


def build_tokenizer(spec: Family) -> PreTrainedTokenizerBase:
    """Train a small BPE through the family's published pre-tokenization and wrap it in its tokenizer class."""
    sentencepiece = spec.tokenizer in ("LlamaTokenizer", "GemmaTokenizer")
    if spec.tokenizer == "PreTrainedTokenizerFast":  # Llama 3: tiktoken-style split, byte-level, bos added
        pipeline = Tokenizer(models.BPE())
        pipeline.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
        )
        pipeline.decoder = decoders.ByteLevel()
    else:  # the family class builds the published normalizer / pre-tokenizer / decoder around any vocabulary
        pipeline = getattr(transformers, spec.tokenizer)().backend_tokenizer
        pipeline.model = models.BPE()
        if sentencepiece:  # learn pieces within words, as SentencePiece does (the pipeline itself does not split)
            scheme = "never" if spec.tokenizer == "GemmaTokenizer" else "first"
            pipeline.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme=scheme, split=True)
    pipeline.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=list(spec.first) + [f"<0x{i:02X}>" for i in range(256 if sentencepiece else 0)],
            initial_alphabet=[] if sentencepiece else pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    trained = json.loads(pipeline.to_str())["model"]
    vocab, merges = trained["vocab"], [tuple(merge) for merge in trained["merges"]]
    names = dict(bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, unk_token=spec.unk)
    if spec.tokenizer == "PreTrainedTokenizerFast":
        pipeline.model = models.BPE(vocab, merges)
        pipeline.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in spec.last])
        pipeline.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{spec.bos} $A",
                    pair=f"{spec.bos} $A {spec.bos}:1 $B:1",
                    special_tokens=[(spec.bos, pipeline.token_to_id(spec.bos))],
                ),
            ]
        )
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=pipeline, **names)
    else:
        extra = dict(add_bos_token=True) if spec.add_bos else {}
        if spec.tokenizer == "GemmaTokenizer":
            extra["mask_token"] = "<mask>"
        tokenizer = getattr(transformers, spec.tokenizer)(vocab=vocab, merges=merges, **names, **extra)
    specials = [AddedToken(t, special=True, normalized=False, rstrip=t in spec.rstrip) for t in spec.first + spec.last]
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in spec.plain])
    if spec.template:
        path = TRL_TEMPLATES / spec.template
        tokenizer.chat_template = path.read_text() if spec.template.endswith(".jinja") else spec.template
    return tokenizer


def build_model(spec: Family, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A seeded random 2-layer model of the family's architecture whose ids agree with the tokenizer."""
    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(getattr(spec, name)) if getattr(spec, name) else None
        for name in ("bos", "eos", "pad")
    }
    vocab_size = math.ceil(len(tokenizer) / spec.vocab_multiple) * spec.vocab_multiple
    shape = (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        if spec.model_type != "gpt2"
        else {}
    )
    config = AutoConfig.for_model(
        spec.model_type, vocab_size=vocab_size, tie_word_embeddings=spec.tied, **shape, **ids, **spec.config
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    eos = [tokenizer.convert_tokens_to_ids(token) for token in spec.gen_eos]
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        pad_token_id=ids["pad_token_id"],
        eos_token_id=eos if len(eos) > 1 else eos[0],
        **spec.generation,
    )
    return model


def build_family(name: str, root: Path) -> Path:
    """Build family `name` into root/name (kept if already there) and return that folder."""
    folder = Path(root) / name
    if (folder / "config.json").is_file():
        return folder
    spec, partial = SPECS[name], Path(root) / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = build_tokenizer(spec)
    build_model(spec, tokenizer).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    saved = partial / "tokenizer_config.json"  # v5 writes "TokenizersBackend" for PreTrainedTokenizerFast
    saved.write_text(json.dumps(json.loads(saved.read_text()) | {"tokenizer_class": spec.tokenizer}, indent=2))
    os.replace(partial, folder)
    return folder


def build_all(root: Path) -> dict[str, Path]:
    """Every family, in FAMILIES order, as {name: folder}."""
    return {name: build_family(name, root) for name in FAMILIES}
