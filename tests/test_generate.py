import torch

from llmtrain.generate import load_for_generation, sample_tokens, stop_token_ids
from llmtrain.rl import logprobs_of


def _prompt(tokenizer, text: str) -> torch.Tensor:
    messages = [{"role": "user", "content": text}]
    return torch.tensor(
        [tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]]
    )


def test_row_seeded_sampling_draws_from_softmax_of_logits_over_temperature(sft_run):
    model, tokenizer = load_for_generation(str(sft_run), str(sft_run.parent), device="cpu")
    ids = _prompt(tokenizer, "What is 12 + 30?")
    temperature, n = 0.7, 5000
    first = sample_tokens(
        model,
        ids.repeat(n, 1),
        torch.ones(n, ids.shape[1], dtype=torch.long),
        1,
        stop_token_ids(tokenizer),
        tokenizer.pad_token_id,
        row_seeds=list(range(n)),
        temperature=temperature,
    )[:, 0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    vocab = logits.shape[-1]
    # The probability the RL stages compute for each token, at the same temperature.
    expected = logprobs_of(logits.expand(vocab, vocab), torch.arange(vocab), temperature).exp()
    empirical = torch.bincount(first, minlength=vocab).float() / n
    # Total variation distance: ~0.02 from sampling noise here; 0.09 if the sampler ignored the temperature.
    assert 0.5 * (empirical - expected).abs().sum() < 0.05


def test_a_rows_sample_depends_on_its_seed_not_on_its_batch(sft_run):
    model, tokenizer = load_for_generation(str(sft_run), str(sft_run.parent), device="cpu")
    a, b = _prompt(tokenizer, "What is 12 + 30?"), _prompt(tokenizer, "What is 45 - 17?")
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id

    def sample(rows, seeds):
        ids = torch.cat(rows)
        return sample_tokens(model, ids, torch.ones_like(ids), 8, stops, pad, seeds, temperature=1.0)

    alone = sample([a], [7])[0]
    together = sample([b, a, b], [1, 7, 2])[1]
    assert alone.tolist() == together[: len(alone)].tolist()
    assert sample([a] * 4, [1, 2, 3, 4]).unique(dim=0).shape[0] > 1  # different seeds, different samples


def test_top_k_sampling_never_leaves_the_k_likeliest_tokens(sft_run):
    model, tokenizer = load_for_generation(str(sft_run), str(sft_run.parent), device="cpu")
    ids = _prompt(tokenizer, "What is 12 + 30?")
    n = 400
    first = sample_tokens(
        model, ids.repeat(n, 1), torch.ones(n, ids.shape[1], dtype=torch.long), 1, [0], 0, list(range(n)), 1.0, top_k=3
    )[:, 0]
    with torch.no_grad():
        top3 = model(input_ids=ids).logits[0, -1].topk(3).indices
    assert set(first.tolist()) <= set(top3.tolist()) and len(set(first.tolist())) > 1
