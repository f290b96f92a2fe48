import math

import pytest
import torch

from llmtrain.optim import build_optimizer, lr_at


def test_warmup_is_linear_from_lr_over_warmup():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)


def test_cosine_goes_from_peak_to_min_lr_through_the_midpoint():
    # After warmup 10 of 110 steps, progress 0.5 at step 60: min + (peak - min) / 2 = 0.1 + 0.45.
    assert lr_at(10, 110, 1.0, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_at(60, 110, 1.0, 10, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_at(110, 110, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_at(35, 110, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_wsd_holds_the_peak_then_decays_linearly():
    # 100 steps, decay over the last 20: flat until step 80, halfway down at step 90.
    assert lr_at(79, 100, 1.0, 10, "wsd", 0.0, 0.2) == pytest.approx(1.0)
    assert lr_at(90, 100, 1.0, 10, "wsd", 0.0, 0.2) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 10, "wsd", 0.0, 0.2) == pytest.approx(0.0)


def test_norms_and_biases_get_no_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3  # linear bias, norm weight and bias
