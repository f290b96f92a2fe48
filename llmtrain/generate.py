"""Sampling from any run: plain-text continuation now, chat once a run has a chat template."""

from __future__ import annotations

import torch

from llmtrain.distributed import params_sharded


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    greedy: bool = False,
    stop_token_ids: list[int] | None = None,
) -> list[str]:
    """Continue each prompt (batched, left-padded, KV cache); returns only the new text."""
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    batch = {k: v.to(model.device) for k, v in batch.items()}
    eos = stop_token_ids or [tokenizer.eos_token_id]
    kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": top_k}
    if top_p is not None and not greedy:
        kwargs["top_p"] = top_p
    out = model.generate(
        **batch,
        synced_gpus=params_sharded(model),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    if was_training:
        model.train()
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


@torch.no_grad()
def sample_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: list[int],
    pad_token_id: int,
    row_seeds: list[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Sample continuations of left-padded token rows (KV cache); returns the new tokens, [B, <= max_new_tokens].

    Each row's sample is a pure function of its seed in `row_seeds` (Gumbel-max with one generator per row),
    whatever batch or process the row is generated in. The logits are divided by `temperature` and cut to
    `top_k` / `top_p` exactly as the RL stages' log-probabilities assume.
    """
    from transformers import LogitsProcessorList

    sampler = _RowSeededSampler(row_seeds, temperature, top_k, top_p, input_ids.device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids,
        pad_token_id=pad_token_id,
        synced_gpus=params_sharded(model),
        # Greedy over perturbed logits is sampling; set explicitly so that no processor from the model's own
        # generation config (a repetition penalty, say) changes the distribution.
        do_sample=False,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        use_cache=True,
        logits_processor=LogitsProcessorList([sampler]),
    )
    return out[:, input_ids.shape[1] :]


class _RowSeededSampler:
    """A logits processor that turns greedy decoding into sampling from softmax(logits / T) (top-k/top-p cut)."""

    def __init__(self, seeds: list[int], temperature: float, top_k: int | None, top_p: float | None, device):
        if temperature <= 0:
            raise ValueError("sampling needs a temperature above 0")
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_scores.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        uniform = torch.stack(
            [torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators]
        )
        # argmax(log p + Gumbel) is a sample from p.
        return scores - torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Tokens that end an answer: the model's own generation-config EOS ids, the tokenizer's EOS, and the chat
    template's end-of-turn token (in that order, each once)."""
    from llmtrain.data.template import chat_format

    ids = _as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids += _as_list(tokenizer.eos_token_id)
    if tokenizer.chat_template:
        ids.append(chat_format(tokenizer).end_of_turn_id)
    return list(dict.fromkeys(ids))


def _as_list(ids) -> list[int]:
    return [] if ids is None else [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def chat_replies(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 64, **sampling
) -> list[str]:
    """The assistant's next reply to each conversation, rendered with the chat template; stops at end of turn."""
    from llmtrain.data.template import chat_format

    fmt = chat_format(tokenizer)
    prompts = [fmt.render(fmt.fit(c), add_generation_prompt=True) for c in conversations]
    stops = stop_token_ids(tokenizer, model)
    replies: list[str] = []
    for i in range(0, len(prompts), batch_size):
        replies += sample(
            model, tokenizer, prompts[i : i + batch_size], max_new_tokens, stop_token_ids=stops, **sampling
        )
    return [r.strip() for r in replies]


def load_for_generation(
    spec: str, runs_dir: str, device: str | None = None, trust_remote_code: bool = False, command: str = "generate"
):
    """Load a run ('latest': the newest finished language-model run), local checkpoint or Hub model and its
    tokenizer for sampling; a model's own code runs only with `trust_remote_code`. A reward model is refused:
    `command` (generate, chat, eval) names what it was loaded for."""
    from llmtrain.errors import LLMTrainError
    from llmtrain.models import load_causal_lm
    from llmtrain.registry import LM_STAGES, hub_snapshot, is_reward_model, resolve_latest, resolve_model
    from llmtrain.tokenizer import load_tokenizer

    source = resolve_model(resolve_latest(spec, runs_dir, LM_STAGES, command), runs_dir)
    if source.kind == "preset":
        raise LLMTrainError(f"'{spec}' is a preset with untrained weights; give a run name (see `llmtrain runs`).")
    source = hub_snapshot(source, runs_dir, "model")
    if is_reward_model(source):
        raise LLMTrainError(
            f"'{spec}' is a reward model: it scores an answer, it does not write one, so `llmtrain {command}` cannot "
            f"use it as a language model. Score an answer with `llmtrain score {spec} --prompt ... --response ...`"
            + (", or evaluate it with `llmtrain eval`" if command != "eval" else "")
            + f"; to {command} with a language model, give a pretrain, sft, dpo or ppo run (see `llmtrain runs`)."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(source, runs_dir, trust_remote_code=trust_remote_code, dtype="auto").to(device)
    return model, load_tokenizer(source.path, trust_remote_code=trust_remote_code)
