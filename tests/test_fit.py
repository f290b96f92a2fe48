"""The fit verdict on evaluation histories written by hand (llmtrain/fit.py)."""

import pytest

from llmtrain.fit import diagnose, higher_is_better, improved, metric_on_test, trainset_name


def evals(metric: str, *points: tuple[int, float, float]) -> list[dict]:
    """Evaluations at (step, validation value, training-sample value)."""
    return [{"step": s, metric: v, trainset_name(metric): t} for s, v, t in points]


def test_metric_names_and_directions():
    assert trainset_name("val_loss") == "trainset_loss" and metric_on_test("val_loss") == "test_loss"
    assert trainset_name("task_accuracy") == "trainset_task_accuracy" and metric_on_test("val_bpb") == "test_bpb"
    assert not higher_is_better("val_loss") and not higher_is_better("val_bpb") and higher_is_better("val_reward")
    assert improved(0.5, 0.6, "val_loss") and improved(0.6, 0.5, "task_accuracy") and not improved(1, 1, "val_loss")


def test_validation_worse_than_its_best_while_training_improves_is_overfitting():
    history = evals("val_loss", (0, 3.0, 3.0), (100, 2.0, 1.9), (200, 2.2, 1.2), (300, 2.5, 0.6))
    fit = diagnose(history, "val_loss")
    assert fit.verdict == "overfitting" and fit.best_step == 100
    assert "best at step 100 (2)" in fit.reason and "2.5 at step 300" in fit.reason and "1.9 to 0.6" in fit.reason
    assert "--keep_best" in fit.line() and fit.line().startswith("fit: OVERFITTING")


def test_one_bad_evaluation_or_a_flat_training_sample_is_not_overfitting():
    # Worse only at the last evaluation (noise, or a single bump): not yet.
    assert (
        diagnose(evals("val_loss", (0, 3, 3), (100, 2, 1.9), (200, 1.9, 1.5), (300, 2.2, 1.2)), "val_loss").verdict
        == "ok"
    )
    # Validation worse, but the training sample got worse too: that is no overfitting (it is instability).
    history = evals("val_loss", (0, 3, 3), (100, 2, 1.9), (200, 2.3, 2.0), (300, 2.5, 2.1))
    assert diagnose(history, "val_loss").verdict != "overfitting"
    # Within the 1 % tolerance of the best: ok.
    assert (
        diagnose(evals("val_loss", (0, 3, 3), (100, 2, 1.9), (200, 2.01, 1.5), (300, 2.015, 1.2)), "val_loss").verdict
        == "ok"
    )


def test_a_training_sample_no_better_than_the_parents_is_underfitting():
    fit = diagnose(evals("val_loss", (0, 2.31, 2.30), (50, 2.31, 2.299), (100, 2.30, 2.295)), "val_loss")
    assert fit.verdict == "underfitting" and "2.3 (the parent's) to 2.295" in fit.reason
    assert "train longer" in fit.line()


def test_validation_still_improving_at_full_pace_at_the_end_is_underfitting():
    # A straight line down: the last interval improves as fast as the run's average.
    fit = diagnose(evals("val_loss", (0, 4.0, 4.0), (100, 3.5, 3.4), (200, 3.0, 2.9), (300, 2.5, 2.3)), "val_loss")
    assert fit.verdict == "underfitting" and "still improving" in fit.reason and "100%" in fit.reason
    # A curve that flattens: ok.
    history = evals("val_loss", (0, 4.0, 4.0), (100, 2.5, 2.4), (200, 2.2, 2.1), (300, 2.15, 2.0))
    assert diagnose(history, "val_loss").verdict == "ok"


def test_reward_up_while_unoptimized_accuracy_falls_is_reward_hacking():
    history = [
        {"step": 0, "val_reward": 0.58, "task_accuracy": 0.835},
        {"step": 32, "val_reward": 1.16, "task_accuracy": 0.33},
    ]
    fit = diagnose(history, "val_reward", guards=("task_accuracy",), guard_rows=400)
    assert fit.verdict == "reward_hacking"
    assert fit.reason == "val_reward rose from 0.58 to 1.16 while task_accuracy, which it does not optimize, fell " \
        "from 0.835 to 0.33"  # fmt: skip
    # A drop within two binomial standard errors of 40 answers (2 x sqrt(0.835 x 0.165 / 40) = 0.117) is noise.
    history[1]["task_accuracy"] = 0.75
    assert diagnose(history, "val_reward", guards=("task_accuracy",), guard_rows=40).verdict == "ok"
    # With 400 answers the same drop is real.
    assert diagnose(history, "val_reward", guards=("task_accuracy",), guard_rows=400).verdict == "reward_hacking"
    # Accuracy that rose with the reward: ok.
    history[1]["task_accuracy"] = 0.9
    assert diagnose(history, "val_reward", guards=("task_accuracy",), guard_rows=400).verdict == "ok"


def test_reward_up_while_a_second_reward_model_scores_lower_is_reward_hacking():
    history = [{"step": 0, "val_reward": 1.0, "val_check_reward": 2.0}, {"step": 9, "val_reward": 3.0}]
    history[1]["val_check_reward"] = 1.5
    fit = diagnose(history, "val_reward", guards=("task_accuracy", "val_check_reward"))
    assert fit.verdict == "reward_hacking" and "val_check_reward, which it does not optimize, fell" in fit.reason
    history[1]["val_check_reward"] = 1.95  # within 5 % of 2.0: noise
    assert diagnose(history, "val_reward", guards=("val_check_reward",)).verdict == "ok"


def test_a_dpo_margin_up_while_the_judges_win_rate_falls_is_reward_hacking():
    # DPO's optimized reward is its implicit margin (0 for the parent); its fit metric stays the loss.
    history = [
        {"step": 0, "val_margin": 0.0, "win_rate": 0.5},
        {"step": 100, "val_loss": 0.6, "trainset_loss": 0.55, "val_margin": 2.0, "win_rate": 0.3},
    ]
    fit = diagnose(history, "val_loss", guards=("win_rate",), guard_rows=400, reward="val_margin")
    assert fit.verdict == "reward_hacking" and fit.reason.startswith("val_margin rose from 0 to 2 while win_rate")
    history[1]["win_rate"] = 0.55
    assert diagnose(history, "val_loss", guards=("win_rate",), guard_rows=400, reward="val_margin").verdict == "ok"


def test_reward_up_with_a_kl_past_the_bound_is_reward_hacking_without_a_checker():
    history = [{"step": 0, "val_reward": 1.0}, {"step": 20, "val_reward": 2.0}]
    fit = diagnose(history, "val_reward", kl=14.2, kl_bound=10)
    assert fit.verdict == "reward_hacking" and "KL to the parent reached 14.2 nats" in fit.reason
    assert diagnose(history, "val_reward", kl=4.0, kl_bound=10).verdict == "ok"
    # The reward fell: whatever the KL, nothing was hacked.
    history[1]["val_reward"] = 0.5
    assert diagnose(history, "val_reward", kl=14.2, kl_bound=10).verdict != "reward_hacking"


@pytest.mark.parametrize("history", [[], [{"step": 0, "val_loss": float("nan")}]])
def test_nothing_measured_is_ok_and_says_so(history):
    fit = diagnose(history, "val_loss")
    assert fit.verdict == "ok" and "no evaluation measured val_loss" in fit.reason and fit.best_step is None
