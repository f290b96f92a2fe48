import math

import pytest
import torch

from llmtrain.losses import bradley_terry_loss, dpo_loss

# One pair by hand: policy log-probs -10 (chosen), -12 (rejected); reference -11 and -11.
# Log-ratios: chosen +1, rejected -1, so h = 2.
PC, PR, RC, RR = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_dpo_matches_the_closed_form():
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert out.loss.item() == pytest.approx(-log_sigmoid(0.5 * 2))  # = log(1 + e^-1) = 0.31326
    assert out.loss.item() == pytest.approx(0.3132617, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5) and out.rejected_rewards.item() == pytest.approx(-0.5)
    assert out.margin.item() == pytest.approx(1.0) and out.accuracy.item() == 1.0


def test_conservative_dpo_mixes_both_directions():
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="conservative", label_smoothing=0.1)
    expected = -0.9 * log_sigmoid(1.0) - 0.1 * log_sigmoid(-1.0)  # 0.9 * 0.31326 + 0.1 * 1.31326
    assert out.loss.item() == pytest.approx(expected) and out.loss.item() == pytest.approx(0.4132617, abs=1e-6)


def test_ipo_is_the_squared_distance_to_one_over_two_beta():
    out = dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo")
    assert out.loss.item() == pytest.approx((2 - 1 / 0.5) ** 2) == 0.0
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    assert out.loss.item() == pytest.approx((2 - 5) ** 2)


def test_dpo_equals_log_two_when_the_policy_is_the_reference():
    out = dpo_loss(RC, RR, RC, RR, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2)) and out.accuracy.item() == 0.0


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.5).loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending the loss raises log pi(chosen)


def test_bradley_terry_matches_its_formula_with_and_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    expected = -(log_sigmoid(1.0) + log_sigmoid(-1.0)) / 2  # (0.31326 + 1.31326) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.8132617, abs=1e-6)
    with_margin = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    assert with_margin.item() == pytest.approx(-(log_sigmoid(0.0) + log_sigmoid(-1.0)) / 2)


def test_unknown_dpo_loss_type_is_rejected():
    with pytest.raises(ValueError, match="unknown DPO loss type 'hinge2'"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge2")
