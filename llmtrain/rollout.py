"""PPO's rollouts: sampled answers to a step's prompts, as token rows with what is known of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmtrain.generate import sample_tokens, stop_token_ids
from llmtrain.rl import truncate_after_stop


@dataclass
class Rollout:
    """One step's responses on this process: [left-padded prompt | response] rows and what is known of them."""

    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    responses: torch.Tensor  # [B, R], padded after the first stop token
    mask: torch.Tensor  # [B, R] float, 1 on the response's tokens (its stop token included)
    ended: torch.Tensor  # [B] bool, the response stopped by itself
    prompt_len: int  # P
    conversations: list[list[dict]]
    texts: list[str]


@torch.no_grad()
def generate_rollout(
    policy, tokenizer, prompt_ids: list[list[int]], prompts, idx, cfg: Any, step: int, rank: int, world: int
) -> Rollout:
    """Sample `num_generations` responses to each prompt in `idx` (this process's share of the step's batch)."""
    device = next(policy.parameters()).device
    pad, stops = tokenizer.pad_token_id, stop_token_ids(tokenizer, policy)
    rows = [int(i) for i in idx for _ in range(cfg.num_generations)]
    # A row's seed depends on its place in the global batch, not on the process or batch that samples it.
    places = [(j * world + rank) * cfg.num_generations + k for j in range(len(idx)) for k in range(cfg.num_generations)]
    seeds = [int(np.random.SeedSequence([cfg.seed, step, g]).generate_state(1)[0]) for g in places]
    width = max(len(prompt_ids[i]) for i in rows)
    query = torch.full((len(rows), width), pad, dtype=torch.long)
    query_mask = torch.zeros_like(query)
    for r, i in enumerate(rows):
        query[r, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
        query_mask[r, width - len(prompt_ids[i]) :] = 1
    query, query_mask = query.to(device), query_mask.to(device)
    new = sample_tokens(
        policy, query, query_mask, cfg.max_new_tokens, stops, pad, seeds, cfg.temperature, cfg.top_k, cfg.top_p
    )
    responses, mask, ended = truncate_after_stop(new, stops, pad)
    longest = int(mask.sum(-1).max())
    responses, mask = responses[:, :longest], mask[:, :longest]
    attention = torch.cat([query_mask, mask], dim=1)
    return Rollout(
        input_ids=torch.cat([query, responses], dim=1),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        responses=responses,
        mask=mask.float(),
        ended=ended,
        prompt_len=width,
        conversations=[prompts[i] for i in rows],
        texts=[t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)],
    )
