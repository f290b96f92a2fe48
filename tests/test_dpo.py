import json
import math

import pytest
from helpers import logged, tiny_dpo_config, write_taught_sums
from transformers import AutoModelForCausalLM

from llmtrain.errors import LLMTrainError
from llmtrain.stages import dpo


@pytest.fixture(scope="module")
def dpo_run(sft_run, reward_run):
    # 32 pairs seen ten times each: the tiny model must learn to prefer the chosen answers it is shown.
    cfg = tiny_dpo_config(sft_run.parent, run_name="dpo-tiny", judge="rm-tiny", eval_every=10, max_rows=32)
    return dpo.run(cfg)


def test_dpo_separates_chosen_from_rejected_and_records_the_evaluation(dpo_run):
    m = json.loads((dpo_run / "llmtrain.json").read_text())
    assert m["stage"] == "dpo" and m["status"] == "finished" and m["parent"] == "sft-tiny"
    assert m["model"]["reference"] == "copy" and m["model"]["judge"] == "rm-tiny"
    rows = logged(dpo_run)
    # Step 1: the policy is the reference, so h = 0 and the sigmoid loss is log 2 with zero rewards.
    assert rows[1]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[1]["chosen_reward"] == pytest.approx(0, abs=1e-5)
    # By the last steps the pairs it is shown are told apart: the implicit reward margin, 0 at step 1, is
    # positive, more pairs are ranked right than wrong, and the loss is below its starting log 2 (the sizes depend
    # on the seed: the late margin was 0.11 at seed 0, 0.12 at seed 1, above 0.15 at seeds 2 and 1337).
    late = [rows[s] for s in range(16, 21)]
    assert sum(r["margin"] for r in late) / 5 > 0
    assert sum(r["accuracy"] for r in late) / 5 > 0.5 and sum(r["train_loss"] for r in late) / 5 < math.log(2)
    # On held-out pairs 20 steps on 32 pairs move nothing measurable (accuracy 0.49 to 0.53, task accuracy 0 before
    # and after over three seeds), so the evaluation is only checked to be recorded.
    metrics = m["metrics"]
    assert {"val_accuracy", "val_margin", "task_accuracy", "parent_task_accuracy", "win_rate"} <= set(metrics)
    assert math.isfinite(metrics["val_loss"])
    assert "val_loss" in rows[10]  # evaluated during training too
    assert AutoModelForCausalLM.from_pretrained(dpo_run).config.use_cache


@pytest.mark.parametrize(
    "overrides, first_loss",
    [
        ({"loss_type": "ipo", "beta": 0.1}, (1 / (2 * 0.1)) ** 2),  # (h - 1/(2 beta))^2 at h = 0
        ({"loss_type": "conservative", "label_smoothing": 0.2}, math.log(2)),  # both terms are log 2 at h = 0
    ],
)
def test_the_loss_variants_start_from_their_closed_form(sft_run, overrides, first_loss):
    out = dpo.run(
        tiny_dpo_config(sft_run.parent, max_steps=3, task="none", run_name=f"dpo-{overrides['loss_type']}", **overrides)
    )
    assert logged(out)[1]["train_loss"] == pytest.approx(first_loss, rel=1e-5)


def test_precomputed_reference_gives_the_same_curve_as_a_reference_copy(sft_run):
    runs = sft_run.parent
    common = dict(max_steps=6, task="none", lr=3e-3)
    copy = logged(dpo.run(tiny_dpo_config(runs, run_name="dpo-copy", **common)))
    pre = dpo.run(tiny_dpo_config(runs, run_name="dpo-pre", precompute_ref=True, **common))
    assert json.loads((pre / "llmtrain.json").read_text())["model"]["reference"] == "precomputed"
    pre = logged(pre)
    for step in range(1, 7):
        assert pre[step]["train_loss"] == pytest.approx(copy[step]["train_loss"], abs=1e-4), step
        assert pre[step]["margin"] == pytest.approx(copy[step]["margin"], abs=1e-4), step


def test_lora_uses_the_adapter_disabled_base_as_reference(sft_run):
    out = dpo.run(tiny_dpo_config(sft_run.parent, run_name="dpo-lora", lora=True, max_steps=8, task="none", lr=3e-3))
    m = json.loads((out / "llmtrain.json").read_text())
    assert m["model"]["reference"] == "adapter-disabled base"
    rows = logged(out)
    assert rows[1]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # adapter starts at zero
    # The adapter trains while the reference stays the base: the implicit rewards, 0 at step 1, move (the sign of
    # the margin after 8 steps depends on the seed; that DPO learns is the test above's).
    assert rows[1]["chosen_reward"] == pytest.approx(0, abs=1e-6)
    assert abs(rows[8]["chosen_reward"]) + abs(rows[8]["rejected_reward"]) > 1e-3
    AutoModelForCausalLM.from_pretrained(out)  # merged on save


@pytest.mark.slow
def test_dpo_resumes_after_a_crash_on_the_same_curve(sft_run, monkeypatch):
    runs = sft_run.parent
    reference = logged(
        dpo.run(tiny_dpo_config(runs, max_steps=10, task="none", run_name="dpo-ref", precompute_ref=True))
    )
    original = dpo.batch_indices

    def crash_at_step_7(n, global_batch, seed, j):
        if j == 7:
            raise RuntimeError("simulated crash")
        return original(n, global_batch, seed, j)

    monkeypatch.setattr(dpo, "batch_indices", crash_at_step_7)
    cfg = tiny_dpo_config(runs, max_steps=10, task="none", save_every=5, run_name="dpo-crash", precompute_ref=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dpo.run(cfg)
    monkeypatch.setattr(dpo, "batch_indices", original)
    resumed = dpo.run(cfg)
    rows = logged(resumed)
    assert sorted(s for s in rows if "train_loss" in rows[s]) == list(range(1, 11))
    for step in range(1, 11):
        assert rows[step]["train_loss"] == pytest.approx(reference[step]["train_loss"], abs=1e-5), step
    assert json.loads((resumed / "llmtrain.json").read_text())["resumed_at_steps"] == [5]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_type": "hinge"}, r"--loss_type hinge: choose one of sigmoid, ipo, conservative"),
        ({"beta": 0.0}, r"--beta must be positive"),
        ({"judge": "gpt-nano"}, r"--judge gpt-nano is a preset"),
    ],
)
def test_bad_settings_are_refused_before_training(sft_run, overrides, message):
    with pytest.raises(LLMTrainError, match=message):
        dpo.run(tiny_dpo_config(sft_run.parent, run_name="dpo-bad", **overrides))


def test_pairs_with_identical_answers_name_the_file_and_row(sft_run, tmp_path):
    data = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"},
        {"prompt": "Hi", "chosen": "a", "rejected": "a"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LLMTrainError, match=r"prefs.jsonl.*line 2"):
        dpo.run(tiny_dpo_config(sft_run.parent, data=str(data), run_name="dpo-same"))


def test_dpo_raises_the_task_accuracy_of_the_pairs_it_was_taught(sft_run, tmp_path):
    # As for SFT, held-out accuracy does not move in a test's budget; on eight pairs taught by heart (chosen: the
    # right sum; rejected: ten too high) the parent's task accuracy rises from 0. 100 steps reached only 0.375 at
    # seed 0 once the task's training rows were redrawn; 200 steps pass at seeds 0, 1, 2 and 1337.
    data = write_taught_sums(tmp_path / "pairs.jsonl", "pairs")
    taught = dict(data=str(data), eval_data=str(data), batch_size=8, max_steps=200, lr=1e-2, nll_weight=1.0)
    cfg = tiny_dpo_config(sft_run.parent, run_name="dpo-taught", warmup_steps=3, **taught)
    metrics = json.loads((dpo.run(cfg) / "llmtrain.json").read_text())["metrics"]
    assert metrics["val_accuracy"] == 1.0
    assert metrics["task_accuracy"] >= metrics["parent_task_accuracy"] + 0.5
