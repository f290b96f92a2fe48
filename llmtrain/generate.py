"""Sampling from any run: plain-text continuation now, chat once a run has a chat template."""

from __future__ import annotations

import torch


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
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    if was_training:
        model.train()
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: the chat end-of-turn token when the vocabulary has one, and EOS."""
    from llmtrain.tokenizer import END_OF_TURN

    ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN)] if END_OF_TURN in tokenizer.get_vocab() else []
    return ids + [tokenizer.eos_token_id]


def chat_replies(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 64, **sampling
) -> list[str]:
    """The assistant's next reply to each conversation, rendered with the chat template; stops at end of turn."""
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    replies: list[str] = []
    for i in range(0, len(prompts), batch_size):
        replies += sample(
            model,
            tokenizer,
            prompts[i : i + batch_size],
            max_new_tokens,
            stop_token_ids=stop_token_ids(tokenizer),
            **sampling,
        )
    return [r.strip() for r in replies]


def load_for_generation(spec: str, runs_dir: str, device: str | None = None):
    """Load a run, local checkpoint or Hub model and its tokenizer for sampling."""
    from llmtrain.errors import LLMTrainError
    from llmtrain.registry import load_causal_lm, resolve_model
    from llmtrain.tokenizer import load_tokenizer

    source = resolve_model(spec, runs_dir)
    if source.kind == "preset":
        raise LLMTrainError(f"'{spec}' is a preset with untrained weights; give a run name (see `llmtrain runs`).")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(source, runs_dir, dtype="auto").to(device)
    return model, load_tokenizer(source.path)
