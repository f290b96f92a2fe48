"""Train a byte-level BPE tokenizer with `tokenizers` and save it in Hugging Face format.

Digits are split one per token (arithmetic stays learnable), and the special tokens and the chat
template that the chat stages use are stored with the tokenizer, so any run directory loads with
`AutoTokenizer.from_pretrained` and renders chats the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llmtrain.errors import LLMTrainError, refuse_without_remote_code

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, BOS, EOS, END_OF_TURN, *ROLE_TOKENS]

# Each turn is `<|role|>\n{content}<|end|>`. The assistant's content and its end-of-turn token sit
# inside {% generation %} so that the SFT mask (and TRL's assistant-only loss) trains exactly the
# tokens the model must produce, the stop token included.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def project_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The project's chat template; on a vocabulary without `<|end|>` each turn ends with the tokenizer's EOS
    token instead, so that the end of a turn is always one token the model can learn to produce."""
    if END_OF_TURN in tokenizer.get_vocab():
        return CHAT_TEMPLATE
    return CHAT_TEMPLATE.replace("'<|end|>'", "eos_token")


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (digits split) on `texts` and wrap it with special tokens and chat template."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise LLMTrainError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return wrap_tokenizer(tok, model_max_length)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Give a raw `tokenizers` object the project's special tokens and chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TURN, *ROLE_TOKENS],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(
    name_or_path: str | Path, chat_template: str = "auto", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a folder or a Hub id with a pad token and the chat template `chat_template` names:
    auto (its own, else the project's), llmtrain (the project's), or a Jinja file. A tokenizer class a model's
    repository ships runs only with `trust_remote_code`."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        refuse_without_remote_code(str(name_or_path), e)
        raise LLMTrainError(
            f"Could not load a tokenizer from '{name_or_path}': it is neither a folder with tokenizer files "
            f"nor a reachable Hub id ({e.__class__.__name__}: {str(e).splitlines()[0]})."
        ) from None
    if tokenizer.pad_token is None:
        # A dedicated pad token is safest, but adding one would resize the model; reuse EOS only
        # for batching, where the attention mask hides it.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = choose_chat_template(tokenizer, chat_template)
    return tokenizer


def choose_chat_template(tokenizer: PreTrainedTokenizerBase, choice: str) -> str:
    """The template text for `choice`: auto (the tokenizer's own, else the project's), llmtrain, or a .jinja file."""
    if choice == "auto":
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: the default one is the chat template
            own = own.get("default")
        return own or project_chat_template(tokenizer)
    if choice == "llmtrain":
        return project_chat_template(tokenizer)
    path = Path(choice)
    if not path.is_file():
        raise LLMTrainError(
            f"chat_template: '{choice}' is not a file. Give auto (the model's own template), llmtrain (the "
            "project's), or the path of a Jinja template file."
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LLMTrainError(f"chat_template: {path} is not UTF-8 text; a chat template is a Jinja text file.") from None


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens); used for bits-per-byte."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    lengths = [0] * len(tokenizer)
    byte_level = "ByteLevel" in str(tokenizer.backend_tokenizer.decoder) if tokenizer.is_fast else False
    for token, idx in vocab.items():
        if idx in special or idx >= len(lengths):
            continue
        if byte_level:
            lengths[idx] = len(token)  # one printable character per byte in byte-level BPE
        else:
            lengths[idx] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return lengths


def plain_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """A copy of the Rust tokenizer with padding and truncation off.

    Batched calls with `padding=True` leave padding switched on in the shared backend (and in a
    tokenizer.json saved afterwards); encoding a corpus with it would pad documents with pad ids.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Save with padding and truncation switched off in tokenizer.json, whatever calls came before."""
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.save_pretrained(str(path))
