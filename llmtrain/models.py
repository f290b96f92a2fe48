"""Loading and saving the models the stages train: causal LMs, reward models (sequence classifiers) and the
scores a reward model gives a conversation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.data.preferences import answer_example
from llmtrain.data.template import Unverifiable, chat_format
from llmtrain.distributed import prepare_frozen
from llmtrain.errors import LLMTrainError, refuse_without_remote_code
from llmtrain.generate import stop_token_ids
from llmtrain.lora import add_lora, model_to_save
from llmtrain.registry import PRESETS, ModelSource
from llmtrain.tokenizer import save_tokenizer

# ---------------------------------------------------------------- loading


def load_pretrained(cls, path: str, attn_implementation: str = "auto", trust_remote_code: bool = False, **kwargs: Any):
    """`cls.from_pretrained` with the attention the architecture supports: `auto` is SDPA where the architecture
    has it, else eager (Gemma 2 refuses SDPA); any other value is passed on as it is."""
    kwargs["trust_remote_code"] = trust_remote_code
    if attn_implementation != "auto":
        return cls.from_pretrained(path, attn_implementation=attn_implementation, **kwargs)
    try:
        return cls.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    except ValueError as e:
        if "sdpa" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        return cls.from_pretrained(path, attn_implementation="eager", **kwargs)


def load_causal_lm(
    source: ModelSource,
    runs_dir: str | Path,
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    **kwargs: Any,
):
    """`AutoModelForCausalLM.from_pretrained` for a run, local checkpoint or Hub id, with a clear error. The code a
    model's repository ships runs only with `trust_remote_code`."""
    from transformers import AutoModelForCausalLM

    try:
        return load_pretrained(AutoModelForCausalLM, source.path, attn_implementation, trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        refuse_without_remote_code(source.spec, e)
        where = {
            "hub": f"It is not a preset ({', '.join(PRESETS)}), not a run in {runs_dir} and not a local folder, "
            "and loading it as a Hub model id failed",
            "run": "The run folder could not be loaded",
            "local": "The checkpoint folder could not be loaded",
        }[source.kind]
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise LLMTrainError(f"Could not load model '{source.spec}'. {where}: {first_line}") from None


def load_policy(init: ModelSource, tokenizer, cfg: Any, accelerator, use_cache: bool = False):
    """The causal LM a fine-tuning stage tunes, checked against its tokenizer, with LoRA adapters if `cfg.lora`.
    Training never needs the KV cache (and packed rows must not use one); a stage that samples keeps it."""
    model = load_causal_lm(init, cfg.runs_dir, cfg.attn_implementation, cfg.trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise LLMTrainError(f"The tokenizer of '{cfg.init}' has more tokens than the model's embedding.")
    check_positions(model, cfg.max_length, "--max_length", cfg.init, accelerator.print)
    if not use_cache:
        model.config.use_cache = False
    return add_lora(model, cfg, "CAUSAL_LM", accelerator) if cfg.lora else model


@contextmanager
def parent_model(init: ModelSource, cfg: Any, accelerator, policy, reference=None) -> Iterator[Any]:
    """The model a fine-tuning run started from, to evaluate it on the test set beside the result (before the
    result is saved: saving merges LoRA): the policy with its LoRA adapter disabled, the frozen reference the stage
    holds, or a frozen copy loaded for the evaluation and freed after it."""
    if cfg.lora:
        with policy.disable_adapter():
            yield policy
    elif reference is not None:
        yield reference
    else:
        model = load_causal_lm(init, cfg.runs_dir, cfg.attn_implementation, cfg.trust_remote_code)
        yield prepare_frozen(model, accelerator)


def use_gradient_checkpointing(model, accelerator) -> None:
    """Keep only each decoder layer's input in the forward pass and recompute the layer in the backward pass:
    activation memory no longer grows with depth, for one more forward pass per step. Non-reentrant checkpointing, which
    needs no gradient on the layers' inputs (LoRA freezes the embeddings) and works under FSDP2, ZeRO-3 and compile.
    Applied to every Hugging Face model inside `model` (PPO's policy and its critic model)."""
    from transformers import PreTrainedModel

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "activation_checkpointing", False):
        return  # the launch config's fsdp_activation_checkpointing already wraps each layer: once is enough
    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    unable = [type(m).__name__ for m in models if not m.supports_gradient_checkpointing]
    if not models or unable:
        raise LLMTrainError(
            f"--gradient_checkpointing: {', '.join(unable) or type(model).__name__} does not support gradient "
            "checkpointing in transformers. Train without it (lower --batch_size and raise --grad_accum to save "
            "memory instead)."
        )
    for m in models:
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name is deprecated there
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_positions(model, length: int, flag: str, spec: str, note=print) -> None:
    """Sequences of `length` tokens against the positions a checkpoint has: past learned position embeddings
    (GPT-2's `wpe`, OPT's) an index error would stop training, so refuse; rotary positions exist at any length, but
    the model never saw those past its `max_position_embeddings`, so say so, and raise that number to `length`
    (the model saved after training has been trained on them). A scaled rotary embedding (dynamic, YaRN, ...)
    computes its frequencies from that number, so there it stays, and the note says why."""
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not limit or length <= limit:
        return
    learned = any(
        isinstance(m, nn.Embedding) and ("wpe" in name or "position" in name) for name, m in model.named_modules()
    )
    if learned:
        raise LLMTrainError(
            f"{flag} {length} is longer than the {limit} positions of model '{spec}' (it learned one embedding per "
            f"position, {limit} of them): lower {flag} to at most {limit}."
        )
    said = (
        f"Note: {flag} {length} is past the {limit} positions model '{spec}' was trained with "
        "(max_position_embeddings); its rotary positions extend to them, but it has not learned them"
    )
    if _rope_types(config) - {"default"}:
        note(
            f"{said}. Its saved config keeps max_position_embeddings {limit}, on which its scaled rotary embedding "
            "is based."
        )
        return
    config.max_position_embeddings = length
    note(f"{said} yet. This run trains on them: its saved config has max_position_embeddings {length}.")


def _rope_types(config) -> set[str]:
    """The rotary embedding types of a config ('default' is plain RoPE), per layer type where it has several."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    layers = [p for p in params.values() if isinstance(p, dict)] or [params]
    return {p.get("rope_type", p.get("type", "default")) for p in layers}


def load_reward_model(
    path: str, tokenizer, spec: str, attn_implementation: str = "auto", trust_remote_code: bool = False
):
    """A native sequence classifier with one output; a causal LM checkpoint gets a fresh score head. Its score is
    read at the last token that is not padding, so padding uses `reward_pad_id` (which no answer ends with)."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = load_pretrained(
            AutoModelForSequenceClassification, path, attn_implementation, trust_remote_code, num_labels=1
        )
    except (OSError, ValueError) as e:
        refuse_without_remote_code(spec, e)
        raise LLMTrainError(f"Could not load '{spec}' as a sequence classifier: {str(e).splitlines()[0]}") from None
    model.config.pad_token_id = reward_pad_id(tokenizer)
    head = _score_head(model)
    if type(head) is nn.Linear:
        head.__class__ = ScoreHead  # the same parameters and checkpoint keys, computed in fp32
    return model


class ScoreHead(nn.Linear):
    """A linear head whose output is a reward or a value, computed in the precision of its weights (fp32) whatever
    the autocast: bf16 keeps 3 significant digits, and a fresh reward model's chosen and rejected scores then tied
    (12 of 16 pairs on the tiny test model). One output per token: the fp32 matmul costs nothing next to the model."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return super().forward(hidden.to(self.weight.dtype))


def _score_head(base) -> nn.Module | None:
    """A sequence classifier's head: `score`, or `classifier` in some families."""
    return getattr(base, "score", None) or getattr(base, "classifier", None)


def reward_pad_id(tokenizer) -> int:
    """The padding id of reward batches. A sequence classifier reads its score at the last token that is not
    padding, and every answer ends with a stop token, so the padding must never be one: where pad == eos
    (Llama 3, SmolLM2) another special token (or id 0) pads instead."""
    stops = set(stop_token_ids(tokenizer))
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, *tokenizer.all_special_ids]
    return next(c for c in [*candidates, 0, 1, 2] if c is not None and c not in stops)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in every layer, and eval mode: sampling, scoring and training see the same function, in either
    mode (attention modules of Llama-style models keep their dropout rate as a number, not as an nn.Dropout)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    model.eval()


# ---------------------------------------------------------------- reward scores


def token_scores(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """A sequence classifier's score at every position, [B, T] (its usual output is the one at the last token)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model
    backbone, head = getattr(base, base.base_model_prefix), _score_head(base)
    if head is None:
        raise LLMTrainError(f"The sequence classifier {type(base).__name__} has no 'score' head to read values from.")
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return head(hidden).squeeze(-1).float()


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 64) -> list[float]:
    """The reward model's score of each conversation's final assistant answer, read at the answer's last token
    (its end-of-turn token), the same place reward training and PPO read it."""
    pad = reward_pad_id(tokenizer)
    scores: list[float] = []
    for i in range(0, len(conversations), batch_size):
        rows = [_answer_ids(tokenizer, c) for c in conversations[i : i + batch_size]]
        longest = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=model.device)
        mask = (torch.arange(longest)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).to(model.device)
        scores += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return scores


def _answer_ids(tokenizer, conversation: list[dict]) -> list[int]:
    try:
        return answer_example(tokenizer, conversation[:-1], conversation[-1:]).input_ids
    except Unverifiable:
        # A generated reply the template renders in a way that cannot be located: score it as it was generated,
        # the prompt, the reply's tokens and the end-of-turn token.
        fmt = chat_format(tokenizer)
        reply = tokenizer(conversation[-1]["content"], add_special_tokens=False)["input_ids"]
        return fmt.prompt_ids(conversation[:-1]) + list(reply) + [fmt.end_of_turn_id]


# ---------------------------------------------------------------- saving


def save_policy(raw_model, state_dict, tokenizer, path: Path, cfg: Any, accelerator) -> None:
    """Save a tuned causal LM as a Hugging Face checkpoint that generates until the end of its turn: merged
    weights by default, or the LoRA adapter with --merge_lora false."""
    if not accelerator.is_main_process:
        return
    model = model_to_save(raw_model, cfg)
    if model is not raw_model and cfg.merge_lora:
        state_dict = None  # the merged model's own weights, not the adapter-wrapped state
    base = model.get_base_model() if cfg.lora and not cfg.merge_lora else model
    # The model's own end-of-sequence ids stay; the template's end-of-turn token is added to them.
    base.generation_config.eos_token_id = stop_token_ids(tokenizer, base)
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.config.use_cache = True
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    save_tokenizer(tokenizer, path)


def save_reward_model(raw_model, state_dict, tokenizer, path: Path, cfg: Any, accelerator) -> None:
    """Save a reward model (merged, or the adapter with --merge_lora false) with the tokenizer that pads it."""
    if not accelerator.is_main_process:
        return
    model = model_to_save(raw_model, cfg)
    model.save_pretrained(path, state_dict=None if model is not raw_model else state_dict, safe_serialization=True)
    save_tokenizer(tokenizer, path)
