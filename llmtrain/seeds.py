"""Claims over seeds: each stage's test headline as mean ± std over seeds, and its gain over its parent and over the
same-seed "more SFT" control as a paired difference with a bootstrap interval.

`llmtrain pipeline --seeds 0,1,2 --control` makes the runs `<name>-s<seed>-<stage>` and `<name>-s<seed>-control`
(SFT continued from that seed's SFT run for one more epoch). This module reads what those runs measured on the test
split (the manifest's `test_*` metrics and `test_items.jsonl`, one score per test item), does the arithmetic on plain
numbers, and writes the table as `<runs_dir>/<name>-seeds.json` and `<name>-seeds.md`.

A gain pools the (test item, seed) pairs: for each seed the stage's score on an item minus the base's score on the
same item (its parent's, the `parent_score` the run recorded, or the control run's), so the interval covers both the
questions and the seeds. A stage "beats" a base at a seed when its test headline is better there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.errors import LLMTrainError
from llmtrain.registry import MANIFEST, read_manifest

TEST_ITEMS = "test_items.jsonl"
CONTROL = "control"
# The stages a control is a fair base for: they tune the SFT model on the same task for a short time.
CONTROLLED = ("dpo", "ppo")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class HeadlineMetric:
    """A stage's headline on the test split, the validation metric it is the test figure of, and its direction."""

    test: str
    validation: str
    higher_is_better: bool = True


TEST_HEADLINES: dict[str, HeadlineMetric] = {
    "pretrain": HeadlineMetric("test_bpb", "val_bpb", higher_is_better=False),
    "sft": HeadlineMetric("test_task_accuracy", "task_accuracy"),
    CONTROL: HeadlineMetric("test_task_accuracy", "task_accuracy"),
    "reward": HeadlineMetric("test_reward_accuracy", "reward_accuracy"),
    "dpo": HeadlineMetric("test_task_accuracy", "task_accuracy"),
    "ppo": HeadlineMetric("test_task_accuracy", "task_accuracy"),
}


# ---------------------------------------------------------------- arithmetic on plain numbers


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (ddof=1) of one figure over seeds; no std for one seed."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    data = np.asarray(values, dtype=float)
    return float(data.mean()), (float(data.std(ddof=1)) if len(data) > 1 else None)


def paired_differences(scores: Mapping[str, float], base: Mapping[str, float]) -> list[float]:
    """score - base for every item both hold, in item order; items only one side holds are left out."""
    return [float(scores[item]) - float(base[item]) for item in sorted(scores.keys() & base.keys())]


def bootstrap_interval(
    differences: Sequence[float],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean difference: `resamples` (10,000) resamples of the pairs with
    replacement, drawn by numpy's default_rng(`seed`) (seed 0), and the (1 - confidence)/2 and (1 + confidence)/2
    quantiles of their means (numpy's linear interpolation)."""
    data = np.asarray(differences, dtype=float)
    if data.size == 0:
        raise ValueError("bootstrap_interval needs at least one difference")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 1_000_000 // data.size)  # rows per draw, so that memory stays small for many pairs
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        means[start : start + rows] = data[rng.integers(0, data.size, size=(rows, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def beats(value: float, base: float, higher_is_better: bool) -> bool:
    """Whether a figure is strictly better than the base's, in the metric's direction."""
    return value > base if higher_is_better else value < base


# ---------------------------------------------------------------- one stage over the seeds


@dataclass
class StageRun:
    """What one stage's run at one seed measured: its manifest metrics and its per-item test scores."""

    run: str
    metrics: dict[str, float] = field(default_factory=dict)
    items: dict[str, float] = field(default_factory=dict)
    parent_items: dict[str, float] = field(default_factory=dict)


@dataclass
class Gain:
    """A stage against a base (its parent, or the control) over the seeds."""

    base: str
    mean: float | None  # the mean paired difference (stage - base) over the (item, seed) pairs
    low: float | None  # the bootstrap interval (None without per-item scores)
    high: float | None
    pairs: int  # (item, seed) pairs; 0 when the mean comes from the headlines
    beats: dict[int, bool]  # seed -> the stage's test headline is better than the base's there


@dataclass
class StageSummary:
    """One row of the seeds table."""

    stage: str
    runs: list[str]
    metric: str | None  # the test headline, or the validation one when the runs have no test figure
    higher_is_better: bool
    values: dict[int, float]
    mean: float | None
    std: float | None
    vs_parent: Gain | None = None
    vs_control: Gain | None = None


def choose_metric(stage: str, runs: Sequence[StageRun]) -> str | None:
    """The stage's test headline if every run has it, else its validation headline if every run has that."""
    headline = TEST_HEADLINES[stage]
    for key in (headline.test, headline.validation):
        if runs and all(key in r.metrics for r in runs):
            return key
    return None


def compare(
    base: str,
    values: Mapping[int, float],
    base_values: Mapping[int, float],
    pairs_by_seed: Mapping[int, list[float]],
    higher_is_better: bool,
) -> Gain | None:
    """The gain over a base from each seed's figures and paired item differences. With paired items at every seed the
    mean pools them and gets an interval; without, it is the mean over seeds of the headline differences."""
    seeds = [s for s in values if s in base_values]
    if not seeds:
        return None
    won = {s: beats(values[s], base_values[s], higher_is_better) for s in seeds}
    pooled = [d for s in seeds for d in pairs_by_seed.get(s, [])]
    if pooled and all(pairs_by_seed.get(s) for s in seeds):
        low, high = bootstrap_interval(pooled)
        return Gain(base, float(np.mean(pooled)), low, high, len(pooled), won)
    mean = float(np.mean([values[s] - base_values[s] for s in seeds]))
    return Gain(base, mean, None, None, 0, won)


def summarize_stage(
    stage: str, runs: Mapping[int, StageRun], control: Mapping[int, StageRun] | None = None
) -> StageSummary:
    """Mean ± std of a stage's test headline over seeds, its gain over its parent (when the runs recorded the
    parent's figure) and, given the control's runs, over the control."""
    higher = TEST_HEADLINES[stage].higher_is_better
    metric = choose_metric(stage, list(runs.values()))
    names = [r.run for r in runs.values()]
    if metric is None:
        return StageSummary(stage, names, None, higher, {}, None, None)
    values = {s: float(r.metrics[metric]) for s, r in runs.items()}
    mean, std = mean_std(list(values.values()))
    summary = StageSummary(stage, names, metric, higher, values, mean, std)
    parent_key = f"parent_{metric}"
    parent_values = {s: float(r.metrics[parent_key]) for s, r in runs.items() if parent_key in r.metrics}
    # Per-item scores are test scores: they pair only with a test headline, never with a validation fallback.
    paired = metric == TEST_HEADLINES[stage].test
    parent_pairs = {s: paired_differences(r.items, r.parent_items) for s, r in runs.items() if paired}
    summary.vs_parent = compare("parent", values, parent_values, parent_pairs, higher)
    if control and choose_metric(CONTROL, list(control.values())) == metric:
        control_values = {s: float(control[s].metrics[metric]) for s in runs if s in control}
        control_pairs = {
            s: paired_differences(r.items, control[s].items) for s, r in runs.items() if s in control and paired
        }
        summary.vs_control = compare(CONTROL, values, control_values, control_pairs, higher)
    return summary


# ---------------------------------------------------------------- reading the runs, writing the table


def read_items(run_dir: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """A run's test_items.jsonl as {item: score} and {item: parent_score} (empty when the run wrote none)."""
    path = Path(run_dir) / TEST_ITEMS
    scores: dict[str, float] = {}
    parent: dict[str, float] = {}
    if not path.is_file():
        return scores, parent
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            scores[str(row["item"])] = float(row["score"])
            if row.get("parent_score") is not None:
                parent[str(row["item"])] = float(row["parent_score"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise LLMTrainError(
                f"{path}, line {number}: not a test item ({e.__class__.__name__}: {e}). Each line is a JSON object "
                '{"item": KEY, "score": NUMBER} with an optional "parent_score"; remove the file to report the run '
                "without per-item scores, or run the stage again to write it anew."
            ) from None
    return scores, parent


def read_stage_run(run_dir: str | Path, parent_dir: str | Path | None = None) -> StageRun:
    """What a run measured; the parent's per-item scores come from the run's own `parent_score`s, else from the
    parent run's test_items.jsonl (the same test rows) when `parent_dir` is given."""
    metrics = read_manifest(run_dir).get("metrics", {})
    items, parent_items = read_items(run_dir)
    if not parent_items and parent_dir is not None and (Path(parent_dir) / MANIFEST).is_file():
        parent_items = read_items(parent_dir)[0]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StageRun(Path(run_dir).name, numbers, items, parent_items)


def summarize_seeds(
    runs_dir: str | Path, name: str, seeds: Sequence[int], parents: Mapping[str, str | None]
) -> list[StageSummary]:
    """One summary per stage of a seeds pipeline, in `parents`' order (stage -> the stage its run starts from)."""

    def run_dir(seed: int, stage: str) -> Path:
        return Path(runs_dir) / f"{name}-s{seed}-{stage}"

    runs = {
        stage: {
            s: read_stage_run(run_dir(s, stage), run_dir(s, parent) if parent in parents else None)
            for s in seeds
            if (run_dir(s, stage) / MANIFEST).is_file()
        }
        for stage, parent in parents.items()
    }
    control = runs.get(CONTROL)
    return [
        summarize_stage(stage, by_seed, control if stage in CONTROLLED else None)
        for stage, by_seed in runs.items()
        if by_seed
    ]


def _figure(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _gain(gain: Gain | None) -> str:
    if gain is None or gain.mean is None:
        return "-"
    if gain.low is None:
        return f"{gain.mean:+.4f}"
    return f"{gain.mean:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}]"


def _wins(gain: Gain | None) -> str:
    if gain is None:
        return "-"
    lost = [str(s) for s, won in gain.beats.items() if not won]
    count = f"{len(gain.beats) - len(lost)}/{len(gain.beats)}"
    return count if not lost else f"{count} (not at seed{'s' if len(lost) > 1 else ''} {', '.join(lost)})"


def _metric(summary: StageSummary) -> str:
    if summary.metric is None:
        return "-"
    lower = "" if summary.higher_is_better else ", lower is better"
    checked = "" if summary.metric.startswith("test_") else " (validation: no test figure)"
    return f"{summary.metric}{checked}{lower}"


def format_seeds_table(summaries: Sequence[StageSummary], seeds: Sequence[int]) -> str:
    """The seeds table as aligned Markdown: one row per stage, then a line that says how the gains are computed."""
    level = f"{CONFIDENCE:.0%}".replace("%", " %")
    header = (
        "stage",
        "metric",
        f"mean ± std ({len(seeds)} seeds)",
        f"gain over parent [{level} CI]",
        "beats parent",
        f"gain over control [{level} CI]",
        "beats control",
    )
    rows = [header] + [
        (
            s.stage,
            _metric(s),
            _figure(s.mean, s.std),
            _gain(s.vs_parent),
            _wins(s.vs_parent),
            _gain(s.vs_control),
            _wins(s.vs_control),
        )
        for s in summaries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    note = (
        f"Seeds {', '.join(map(str, seeds))}. A gain is the mean paired difference (stage - base) over (test item, "
        f"seed) pairs, with a percentile bootstrap interval of {BOOTSTRAP_RESAMPLES:,} resamples of the pairs (numpy "
        f"seed {BOOTSTRAP_SEED}); without per-item scores it is the mean of the seeds' differences, with no interval. "
        "'beats' counts the seeds at which the stage's figure is better than the base's. The control is SFT "
        "continued from the same seed's SFT run for one more epoch."
    )
    return "\n".join(lines) + "\n\n" + note


def write_seeds_report(runs_dir: str | Path, name: str, seeds: Sequence[int], parents: Mapping[str, str | None]) -> str:
    """Summarize a seeds pipeline, write `<name>-seeds.json` (every number) and `<name>-seeds.md` (the table) in
    the registry, and return the table."""
    summaries = summarize_seeds(runs_dir, name, seeds, parents)
    table = format_seeds_table(summaries, seeds)
    report: dict[str, Any] = {
        "name": name,
        "seeds": list(seeds),
        "confidence": CONFIDENCE,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "bootstrap_seed": BOOTSTRAP_SEED,
        "stages": [asdict(s) for s in summaries],
    }
    root = Path(runs_dir)
    (root / f"{name}-seeds.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / f"{name}-seeds.md").write_text(f"# {name}: test figures over seeds\n\n{table}\n")
    return table
