import math

import pytest
import torch

from llmtrain.rl import (
    KLController,
    entropy_of,
    explained_variance,
    gae,
    group_advantages,
    kl_penalty_rewards,
    logprobs_of,
    masked_mean,
    masked_whiten,
    policy_loss,
    truncate_after_stop,
    value_loss,
)


def gae_plain_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """The textbook recursion on one unpadded episode, in plain Python."""
    advantages, next_advantage = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        next_advantage = rewards[t] + gamma * next_value - values[t] + gamma * lam * next_advantage
        advantages[t] = next_advantage
    return advantages


def test_gae_matches_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.95)
    # t=2: 1 - 0.7 = 0.3; t=1: 0.9*0.7 - 0.6 + 0.855*0.3 = 0.2865; t=0: 0.9*0.6 - 0.5 + 0.855*0.2865
    torch.testing.assert_close(advantages, torch.tensor([[0.2849575, 0.2865, 0.3]]))
    torch.testing.assert_close(returns, torch.tensor([[0.7849575, 0.8865, 1.0]]))


def test_gae_treats_the_token_after_the_last_real_one_as_terminal_and_ignores_padding():
    rewards = torch.tensor([[0.5, 1.0, 9.0]])
    values = torch.tensor([[0.2, 0.4, 5.0]])  # the padded position's value and reward must not leak in
    advantages, returns = gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.3, 0.6, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.5, 1.0, 0.0]]))


def test_gae_on_a_padded_batch_equals_a_plain_loop_per_episode():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 7, 5]
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).float()
    advantages, returns = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    for i, n in enumerate(lengths):
        expected = gae_plain_loop(rewards[i, :n].tolist(), values[i, :n].tolist(), 0.97, 0.9)
        torch.testing.assert_close(advantages[i, :n], torch.tensor(expected))
        torch.testing.assert_close(returns[i, :n], torch.tensor(expected) + values[i, :n])
        assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0


def test_clipped_policy_loss_matches_hand_computed_values():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros(1, 4)
    out = policy_loss(ratios.log(), old, advantages, torch.ones(1, 4), clip_range=0.2)
    # per token: max(-A r, -A clip(r)) = [-1.2 (clipped), -0.5, 0.8 (clipped), 1.5]
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    assert out.approx_kl.item() == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2))


def test_policy_loss_ignores_padding_and_divides_by_the_given_token_count():
    logprobs = torch.tensor([[0.1, 5.0]], requires_grad=True)
    advantages = torch.tensor([[2.0, 100.0]])
    out = policy_loss(logprobs, torch.zeros(1, 2), advantages, torch.tensor([[1.0, 0.0]]), 0.2, normaliser=4.0)
    assert out.loss.item() == pytest.approx(-2.0 * math.exp(0.1) / 4)
    out.loss.backward()
    assert logprobs.grad[0, 1] == 0  # no gradient through a padded token
    # At ratio 1 the gradient of the surrogate is -A (per token, over the normaliser).
    fresh = torch.zeros(1, 2, requires_grad=True)
    policy_loss(fresh, torch.zeros(1, 2), advantages, torch.ones(1, 2), 0.2).loss.backward()
    torch.testing.assert_close(fresh.grad, -advantages / 2)


def test_clipped_value_loss_matches_hand_computed_values():
    values = torch.tensor([[1.0, 0.0, 0.6]])
    old_values = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    loss, clip_fraction = value_loss(values, old_values, returns, torch.ones(1, 3), clip_range_value=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max(0, 0.3^2) = 0.09; token 2: unclipped 0.36
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 0.36) / 3)
    assert clip_fraction.item() == pytest.approx(2 / 3)


def test_kl_penalty_rewards_are_k1_per_token_with_the_score_at_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalty_rewards(torch.tensor([3.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 3.0], [-0.1, -1.0, 0.0]]))


def test_the_k1_penalty_is_positive_on_average_and_estimates_kl_policy_to_reference():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)
    k1 = p.log()[tokens] - q.log()[tokens]
    exact = (p * (p / q).log()).sum()
    assert exact > 0 and k1.mean().item() == pytest.approx(exact.item(), abs=0.01)
    # The reward moves against the KL: a policy further from the reference earns less.
    _, kl = kl_penalty_rewards(torch.zeros(1), p.log()[None, :1], q.log()[None, :1], torch.ones(1, 1), 0.1)
    assert kl.item() > 0


def test_whitening_gives_zero_mean_unit_variance_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([[-1.5, -0.5, 0.5, 1.5, 0.0]]) / math.sqrt(5 / 3), atol=1e-5, rtol=0)
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[0, :4], w[0, :4] + 2.5)


def test_whitening_across_processes_uses_the_statistics_of_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    x, mask = torch.randn(6, 5, generator=g) * 3 + 1, (torch.rand(6, 5, generator=g) > 0.3).float()
    whole = masked_whiten(x, mask)
    recorded: list[torch.Tensor] = []

    def record(t):
        recorded.append(t)
        return t

    masked_whiten(x[3:], mask[3:], all_reduce=record)  # "process 1" contributes its sums
    first = masked_whiten(x[:3], mask[:3], all_reduce=lambda t: t + recorded[0])  # "process 0" adds them
    torch.testing.assert_close(first, whole[:3])
    other = torch.stack([(x[3:] * mask[3:]).sum(), mask[3:].sum()]).double()
    torch.testing.assert_close(masked_mean(x[:3], mask[:3], all_reduce=lambda t: t + other), masked_mean(x, mask))
    torch.testing.assert_close(masked_mean(x, mask), (x * mask).sum() / mask.sum())


def test_group_advantages_are_relative_to_the_group_and_zero_for_a_tied_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    one = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([one, -one, -one, one, 0.0, 0.0, 0.0, 0.0]))
    unscaled = group_advantages(torch.tensor([3.0, 1.0]), group_size=2, scale=False)
    torch.testing.assert_close(unscaled, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)


def test_truncation_keeps_the_first_stop_token_and_pads_the_rest():
    responses = torch.tensor([[5, 7, 3, 9, 3], [5, 6, 8, 9, 1], [4, 2, 2, 2, 2]])
    out, mask, ended = truncate_after_stop(responses, stop_ids=[3, 4], pad_id=0)
    assert out.tolist() == [[5, 7, 3, 0, 0], [5, 6, 8, 9, 1], [4, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_logprobs_and_entropy_divide_the_logits_by_the_temperature():
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])
    lp = logprobs_of(logits, torch.tensor([[0]]), temperature=2.0)
    assert lp.item() == pytest.approx(1.0 - math.log(math.e + 2))
    assert entropy_of(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))
    assert entropy_of(logits, temperature=0.01).item() == pytest.approx(0.0, abs=1e-6)


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_a_constant_one():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.5), returns, mask) == pytest.approx(0.0)


def test_adaptive_kl_controller_moves_toward_the_target_and_the_fixed_one_stays():
    fixed = KLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    adaptive = KLController(0.05, target=6.0, horizon=10_000)
    adaptive.update(12.0, 64)  # KL far above the target: the error is clipped at +0.2
    assert adaptive.value == pytest.approx(0.05 * (1 + 0.2 * 64 / 10_000))
    adaptive.update(5.7, 64)  # below the target: the coefficient shrinks
    assert adaptive.value == pytest.approx(0.05 * (1 + 0.2 * 64 / 10_000) * (1 - 0.05 * 64 / 10_000))
