"""How well a run fits: its validation metric beside the same metric on a fixed sample of training rows.

Each evaluation of a run measures its validation metric and, on as many training rows (capped), the same metric
(`trainset_*`). From that history `diagnose` gives one verdict, with the numbers behind it:

- `overfitting`: validation has been worse than its best for the last evaluations while the training sample
  kept improving;
- `underfitting`: the training sample is no better than the parent's, or validation was still improving at the
  end about as fast as on average over the run (more training would help);
- `reward_hacking`: the optimized reward rose while a validation measure it does not optimize (task accuracy, when
  a checker exists; a second reward model's score, `--val_reward_model`) fell, or the policy drifted past a KL
  bound from its parent;
- `ok` otherwise.

The thresholds are named below; they flag clear cases and leave noise alone (an accuracy must fall by more than
two binomial standard errors).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# Overfitting: validation worse than its best at this many evaluations in a row at the end, each by more than
# this share of the best value (losses) or these points (accuracies, rewards).
WORSE_EVALS = 2
RELATIVE_TOLERANCE = 0.01
ABSOLUTE_TOLERANCE = 0.01
# Underfitting: the last interval's improvement per step at least this share of the run's average per step.
STEEP_SHARE = 0.5
# Reward hacking: a guard accuracy must fall by more than this many binomial standard errors (and 2 points), a
# second reward model's mean score by more than this share of its size.
GUARD_STANDARD_ERRORS = 2.0
REWARD_TOLERANCE = 0.05

ADVICE = {
    "overfitting": "keep the best evaluation with --keep_best METRIC, stop early with --early_stopping_patience N, "
    "or train for fewer steps / on more data",
    "underfitting": "train longer (--epochs / --max_steps) or raise --lr",
    "reward_hacking": "the reward does not measure what you want: keep the best step by the unoptimized measure "
    "(--keep_best task_accuracy), raise --kl_coef, or fix the reward",
}


@dataclass
class Fit:
    verdict: str  # ok, overfitting, underfitting or reward_hacking
    reason: str  # one line, with the numbers
    best_step: int | None  # the evaluation where the metric was best

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The run's last words on its fit: the verdict and, when it is not ok, what to do."""
        if self.verdict == "ok":
            return f"fit: ok ({self.reason})"
        return f"fit: {self.verdict.upper()}: {self.reason}. What to do: {ADVICE[self.verdict]}."


def higher_is_better(metric: str) -> bool:
    """Losses, bits per byte and the KL fall as a model gets better; accuracies, rewards and margins rise."""
    return not any(word in metric for word in ("loss", "bpb", "kl"))


def improved(new: float, old: float, metric: str) -> bool:
    """Whether `new` is strictly better than `old` for `metric`."""
    return new > old if higher_is_better(metric) else new < old


def trainset_name(metric: str) -> str:
    """The name of a validation metric measured on the training sample: val_loss -> trainset_loss,
    task_accuracy -> trainset_task_accuracy."""
    return "trainset_" + metric.removeprefix("val_")


def metric_on_test(metric: str) -> str:
    """The name of a validation metric measured on the test set: val_loss -> test_loss, task_accuracy ->
    test_task_accuracy, reward_accuracy -> test_reward_accuracy."""
    return "test_" + metric.removeprefix("val_")


def diagnose(
    evals: list[dict[str, float]],
    metric: str,
    guards: tuple[str, ...] = (),
    guard_rows: int = 0,
    kl: float | None = None,
    kl_bound: float | None = None,
    reward: str | None = None,
) -> Fit:
    """The verdict on a run from its evaluations (dicts with `step`, `metric` and its training-sample twin; the
    first is the parent's when step is 0). `reward`: the optimized reward as validation measures it (`metric` when
    None: PPO's val_reward; DPO's implicit-reward margin); `guards`: validation measures the run does not optimize
    (task accuracy, a second reward model's score, a judge's win rate; `guard_rows` prompts behind each);
    `kl`/`kl_bound`: the final KL to the parent and its bound."""
    rows = [r for r in evals if metric in r and math.isfinite(r[metric])]
    if not rows:
        return Fit("ok", f"no evaluation measured {metric}", None)
    up = higher_is_better(metric)
    best = max(rows, key=lambda r: r[metric] if up else -r[metric])
    best_step = int(best["step"])
    hacking = _reward_hacking(evals, reward or metric, guards, guard_rows, kl, kl_bound)
    if hacking:
        return Fit("reward_hacking", hacking, best_step)
    overfit = _overfitting(rows, metric, best)
    if overfit:
        return Fit("overfitting", overfit, best_step)
    underfit = _underfitting(rows, metric)
    if underfit:
        return Fit("underfitting", underfit, best_step)
    twin = trainset_name(metric)
    last = rows[-1]
    on_train = f", on the training sample {last[twin]:.4g}" if twin in last else ""
    return Fit(
        "ok", f"{metric} {last[metric]:.4g} at step {int(last['step'])}{on_train}; best at step {best_step}", best_step
    )


def _worse(value: float, best: float, metric: str) -> bool:
    """Worse than the best by more than noise."""
    tolerance = RELATIVE_TOLERANCE * abs(best) if not higher_is_better(metric) else ABSOLUTE_TOLERANCE
    return (best - value if higher_is_better(metric) else value - best) > tolerance


def _overfitting(rows: list[dict[str, float]], metric: str, best: dict[str, float]) -> str | None:
    twin = trainset_name(metric)
    tail = rows[-WORSE_EVALS:]
    if len(rows) <= WORSE_EVALS or any(r["step"] <= best["step"] for r in tail):
        return None
    if not all(_worse(r[metric], best[metric], metric) for r in tail):
        return None
    last = rows[-1]
    if twin not in best or twin not in last or not improved(last[twin], best[twin], twin):
        return None
    return (
        f"{metric} was best at step {int(best['step'])} ({best[metric]:.4g}) and is {last[metric]:.4g} at step "
        f"{int(last['step'])}, while on the training sample it went on from {best[twin]:.4g} to {last[twin]:.4g}"
    )


def _underfitting(rows: list[dict[str, float]], metric: str) -> str | None:
    twin = trainset_name(metric)
    first, last = rows[0], rows[-1]
    if first["step"] == 0 and twin in first and twin in last and not _worse(first[twin], last[twin], twin):
        return (
            f"on the training sample {metric} went from {first[twin]:.4g} (the parent's) to {last[twin]:.4g}: "
            "training did not fit its own data"
        )
    if len(rows) < 3:
        return None
    sign = 1 if higher_is_better(metric) else -1
    before = rows[-2]
    overall = sign * (last[metric] - first[metric]) / (last["step"] - first["step"])
    recent = sign * (last[metric] - before[metric]) / (last["step"] - before["step"])
    if overall > 0 and recent >= STEEP_SHARE * overall and _worse(before[metric], last[metric], metric):
        return (
            f"{metric} was still improving at the end: {before[metric]:.4g} at step {int(before['step'])} to "
            f"{last[metric]:.4g} at step {int(last['step'])}, {recent / overall:.0%} of its average pace over the run"
        )
    return None


def _reward_hacking(
    evals: list[dict[str, float]],
    metric: str,
    guards: tuple[str, ...],
    guard_rows: int,
    kl: float | None,
    kl_bound: float | None,
) -> str | None:
    rows = [r for r in evals if metric in r]
    if len(rows) < 2 or not improved(rows[-1][metric], rows[0][metric], metric):
        return None
    first, last = rows[0], rows[-1]
    rose = f"{metric} rose from {first[metric]:.4g} to {last[metric]:.4g}"
    for guard in guards:
        if guard in first and guard in last and first[guard] - last[guard] > _noise(guard, first[guard], guard_rows):
            return (
                f"{rose} while {guard}, which it does not optimize, fell from {first[guard]:.4g} to {last[guard]:.4g}"
            )
    if kl is not None and kl_bound is not None and kl > kl_bound:
        return f"{rose} while the KL to the parent reached {kl:.3g} nats per response, past the bound {kl_bound:g}"
    return None


def _noise(guard: str, value: float, rows: int) -> float:
    """How far a guard may fall by chance: an accuracy or a win rate, two binomial standard errors of `rows` answers
    (and two points); a mean score, REWARD_TOLERANCE of its size (and 0.02)."""
    if "accuracy" in guard or guard == "win_rate":
        return max(GUARD_STANDARD_ERRORS * math.sqrt(max(value * (1 - value), 0.01) / max(rows, 1)), 0.02)
    return max(REWARD_TOLERANCE * abs(value), 0.02)
