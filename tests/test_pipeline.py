import json

import pytest
import yaml

from llmtrain.cli import main


def tiny_recipe(path, corpus):
    """A pipeline recipe whose every stage takes seconds on a CPU, written to `path`."""
    recipe = {
        "tokenizer": {"vocab_size": 320},
        "pretrain": {
            "data": str(corpus),
            "preset": "gpt-nano",
            "seq_len": 64,
            "batch_size": 8,
            "max_steps": 30,
            "eval_every": 0,
            "num_samples": 1,
            "sample_tokens": 4,
        },
        "sft": {
            "max_rows": 200,
            "batch_size": 16,
            "max_steps": 10,
            "task_eval_rows": 8,
            "eval_every": 0,
            "num_samples": 1,
            "max_new_tokens": 12,
            "max_length": 64,
        },
        "reward": {"max_rows": 200, "batch_size": 16, "max_steps": 8, "eval_every": 0, "max_length": 64},
        "dpo": {
            "max_rows": 200,
            "batch_size": 8,
            "max_steps": 4,
            "task_eval_rows": 8,
            "eval_every": 0,
            "num_samples": 1,
            "max_new_tokens": 12,
            "max_length": 64,
        },
        "ppo": {
            "max_rows": 64,
            "batch_size": 8,
            "max_steps": 2,
            "task_eval_rows": 8,
            "num_samples": 1,
            "max_new_tokens": 12,
            "max_length": 64,
            "sample_every": 0,
        },
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_pipeline_runs_the_stages_in_order_then_skips_what_exists(tmp_path, small_corpus, capsys):
    recipe = tiny_recipe(tmp_path / "pipeline.yaml", small_corpus)
    runs = tmp_path / "runs"
    assert main(["pipeline", "--config", str(recipe), "--runs_dir", str(runs), "--name", "p"]) == 0
    table = capsys.readouterr().out.strip().splitlines()[-6:]
    assert [line.split()[:2] for line in table] == [
        ["tokenizer", "p-tokenizer"],
        ["pretrain", "p-pretrain"],
        ["sft", "p-sft"],
        ["reward", "p-reward"],
        ["dpo", "p-dpo"],
        ["ppo", "p-ppo"],
    ]
    assert "test_bpb=" in table[1] and "test_task_accuracy=" in table[2]  # the test set's figures
    assert "reward_accuracy=" in table[3] and "task_accuracy=" in table[4] and "task_accuracy=" in table[5]
    sft = json.loads((runs / "p-sft" / "llmtrain.json").read_text())
    assert sft["parent"] == "p-pretrain" and sft["status"] == "finished"
    dpo = json.loads((runs / "p-dpo" / "llmtrain.json").read_text())
    assert dpo["parent"] == "p-sft" and dpo["model"]["judge"] == "p-reward" and "win_rate" in dpo["metrics"]
    assert json.loads((runs / "p-reward" / "llmtrain.json").read_text())["parent"] == "p-sft"
    ppo = json.loads((runs / "p-ppo" / "llmtrain.json").read_text())
    assert "p-sft" in str(ppo["parent"]) and "p-reward" in json.dumps(ppo)
    assert json.loads((runs / "p-pretrain" / "llmtrain.json").read_text())["config"]["tokenizer"].endswith(
        "p-tokenizer"
    )

    before = (runs / "p-pretrain" / "model.safetensors").stat().st_mtime_ns
    assert main(["pipeline", "--config", str(recipe), "--runs_dir", str(runs), "--name", "p", "--redo", "reward"]) == 0
    table = capsys.readouterr().out.strip().splitlines()[-6:]
    # The reward model is made again, and DPO and PPO with it; what comes before is kept.
    assert ["skipped" in line for line in table] == [True, True, True, False, False, False]
    assert (runs / "p-pretrain" / "model.safetensors").stat().st_mtime_ns == before


def test_a_pipeline_section_with_an_unknown_key_is_named(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("sft:\n  learning_rate: 0.1\n")
    assert main(["pipeline", "--config", str(recipe), "--runs_dir", str(tmp_path)]) == 2
    assert "Unknown config key 'learning_rate' in the pipeline's sft section" in capsys.readouterr().err


def test_a_pipeline_name_that_would_make_a_run_name_outside_the_runs_folder_is_refused(tmp_path, capsys):
    assert main(["pipeline", "--runs_dir", str(tmp_path / "runs"), "--name", "../out"]) == 2
    err = capsys.readouterr().err
    assert "--name '../out': the pipeline names its runs ../out-<stage>, and a run name is one folder" in err
    assert list(tmp_path.iterdir()) == []


def test_the_gpu_pipeline_recipe_reads_every_stage_recipe(monkeypatch):
    from pathlib import Path

    from llmtrain.config import STAGE_CONFIGS, config_from_dict
    from llmtrain.pipeline import INPUTS, _section

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the recipe names stage recipes relative to the repository
    recipe = yaml.safe_load((repo / "recipes" / "configs" / "pipeline" / "gpt-small.yaml").read_text())
    assert set(recipe) == {"tokenizer", *INPUTS}
    for stage in INPUTS:
        cfg = config_from_dict(STAGE_CONFIGS[stage], _section(recipe, stage), stage)
        assert cfg != STAGE_CONFIGS[stage]()  # the GPU recipe, not the CPU defaults


@pytest.mark.slow
def test_a_recipe_that_names_a_model_starts_at_sft_from_it_with_its_own_template(
    tmp_path, family_models, monkeypatch, capsys
):
    """The SmolLM2 recipe, with the Hub model replaced by a tiny local SmolLM2 and sizes cut to a CPU's."""
    from pathlib import Path

    from llmtrain.pipeline import run_pipeline
    from llmtrain.registry import read_manifest

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    recipe = yaml.safe_load((repo / "recipes" / "configs" / "pipeline" / "smollm2-135m.yaml").read_text())
    assert recipe["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "pretrain" not in recipe
    recipe["model"] = str(family_models["smollm2"])
    tiny = dict(max_rows=16, batch_size=4, grad_accum=1, max_steps=2, max_length=128, eval_every=0, save_every=0)
    files = {"sft": "sft", "reward": "prefs", "dpo": "prefs", "ppo": "prompts"}
    for stage, kind in files.items():
        recipe[stage].update(tiny, data=f"data/{kind}_train.jsonl", eval_data=f"data/samples/{kind}.jsonl")
    for stage in ("dpo", "ppo"):
        recipe[stage].update(task_eval_rows=4, max_new_tokens=4)
    recipe["ppo"].update(num_mini_batches=1, ppo_epochs=1)
    recipe["sft"]["eval_data"] = "data/samples/sft_messages.jsonl"

    results = run_pipeline(str(tmp_path), "own", recipe, set())
    assert [r.stage for r in results] == ["sft", "reward", "dpo", "ppo"]
    sft = read_manifest(tmp_path / "own-sft")
    assert sft["parent"] == str(family_models["smollm2"]) and sft["config"]["chat_template"] == "auto"
    assert read_manifest(tmp_path / "own-ppo")["parents"] == ["own-sft", "own-reward"]
    assert (tmp_path / "own-dpo" / "llmtrain.json").is_file()


# ---------------------------------------------------------------- seeds and the control


def write_run(runs, name: str, stage: str, metrics: dict, items=None) -> None:
    """A finished run folder as the seeds report reads it: a manifest and, given `items`, its test_items.jsonl
    ({item: score} or {item: (score, parent_score)})."""
    run = runs / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "llmtrain.json").write_text(json.dumps({"stage": stage, "status": "finished", "metrics": metrics}))
    rows = []
    for item, score in (items or {}).items():
        score, parent = score if isinstance(score, tuple) else (score, None)
        rows.append({"item": item, "score": score, **({"parent_score": parent} if parent is not None else {})})
    if items is not None:
        (run / "test_items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def scores(*values) -> dict:
    return {f"q{i}": v for i, v in enumerate(values, 1)}


def test_mean_and_sample_std_over_seeds_by_hand():
    from llmtrain.seeds import mean_std

    mean, std = mean_std([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and std == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert mean_std([0.62, 0.64]) == (pytest.approx(0.63), pytest.approx(0.02 / 2**0.5))
    assert mean_std([0.7]) == (0.7, None)  # one seed has no spread to report


def test_paired_differences_match_items_by_key_and_leave_out_unmatched_ones():
    from llmtrain.seeds import paired_differences

    stage = {"b": 1.0, "a": 0.0, "c": 1.0}
    base = {"a": 1.0, "b": 0.0, "d": 1.0}
    assert paired_differences(stage, base) == [-1.0, 1.0]  # a, b; c and d have no partner


def test_the_bootstrap_interval_of_identical_scores_is_zero_and_holds_the_mean_deterministically():
    from llmtrain.seeds import bootstrap_interval

    assert bootstrap_interval([0.0] * 50) == (0.0, 0.0)
    diffs = [1.0, 0.0, 0.0, -1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0] * 8
    low, high = bootstrap_interval(diffs)
    assert low < sum(diffs) / len(diffs) < high and -1 <= low and high <= 1
    assert bootstrap_interval(diffs) == (low, high)  # the same draws every time
    assert bootstrap_interval(diffs, confidence=0.5)[0] > low  # a narrower interval inside


@pytest.mark.parametrize("diffs", [[-1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
def test_the_bootstrap_interval_is_the_exact_percentiles_of_every_resample(diffs):
    """All n**n equally likely resamples enumerated: the 2.5th and 97.5th percentiles of their means (each jump of
    the distribution is far enough from 2.5 % and 97.5 % for 10,000 draws to land on the same values)."""
    import itertools

    import numpy as np

    from llmtrain.seeds import bootstrap_interval

    n = len(diffs)
    means = np.sort([sum(diffs[i] for i in pick) / n for pick in itertools.product(range(n), repeat=n)])
    exact = (np.quantile(means, 0.025, method="inverted_cdf"), np.quantile(means, 0.975, method="inverted_cdf"))
    assert bootstrap_interval(diffs) == pytest.approx(exact)
    assert exact == pytest.approx({5: (-0.4, 0.8), 4: (0.0, 0.75)}[n])


def test_a_stage_over_two_seeds_against_its_parent_and_the_control_by_hand():
    from llmtrain.seeds import StageRun, summarize_stage

    def run(name, accuracy, parent, items, parent_items=None):
        metrics = {"test_task_accuracy": accuracy, "parent_test_task_accuracy": parent, "task_accuracy": 0.1}
        return StageRun(name, metrics, scores(*items), scores(*parent_items) if parent_items else {})

    dpo = {
        0: run("p-s0-dpo", 1.0, 0.5, [1, 1, 1, 1], [1, 1, 0, 0]),
        1: run("p-s1-dpo", 0.75, 0.75, [1, 1, 1, 0], [1, 1, 1, 0]),
    }
    control = {0: run("p-s0-control", 0.75, 0.5, [1, 1, 1, 0]), 1: run("p-s1-control", 0.75, 0.75, [1, 1, 1, 0])}
    s = summarize_stage("dpo", dpo, control)
    assert s.metric == "test_task_accuracy" and s.values == {0: 1.0, 1: 0.75}
    assert s.mean == pytest.approx(0.875) and s.std == pytest.approx(0.25 / 2**0.5)
    # Over the parent: seed 0 differs by [0, 0, 1, 1], seed 1 by [0, 0, 0, 0]: 2 of 8 pairs.
    assert s.vs_parent.mean == pytest.approx(0.25) and s.vs_parent.pairs == 8
    assert 0 <= s.vs_parent.low <= 0.25 <= s.vs_parent.high <= 1
    assert s.vs_parent.beats == {0: True, 1: False}  # 0.75 is not better than 0.75
    # Over the control: seed 0 by [0, 0, 0, 1], seed 1 by nothing.
    assert s.vs_control.mean == pytest.approx(0.125) and s.vs_control.beats == {0: True, 1: False}


def test_without_test_figures_the_validation_headline_is_used_and_named_and_gains_have_no_interval():
    from llmtrain.seeds import StageRun, format_seeds_table, summarize_stage

    runs = {
        0: StageRun("p-s0-sft", {"task_accuracy": 0.6, "parent_task_accuracy": 0.2}, scores(1, 1), scores(0, 0)),
        1: StageRun("p-s1-sft", {"task_accuracy": 0.8, "parent_task_accuracy": 0.3}, scores(1, 1), scores(0, 0)),
    }  # test items, which never pair with a validation figure
    s = summarize_stage("sft", runs)
    assert s.metric == "task_accuracy" and s.mean == pytest.approx(0.7)
    assert s.vs_parent.mean == pytest.approx(0.45) and s.vs_parent.low is None and s.vs_parent.pairs == 0
    row = format_seeds_table([s], [0, 1]).splitlines()[2]
    assert "task_accuracy (validation: no test figure)" in row and "0.7000 ± 0.1414" in row
    assert "| +0.4500 " in row and "2/2" in row
    assert summarize_stage("reward", {0: StageRun("p-s0-reward", {})}).metric is None


def test_the_seeds_report_reads_each_seeds_runs_and_writes_the_table(tmp_path):
    from llmtrain.seeds import write_seeds_report

    runs = tmp_path / "runs"
    for seed, bpb, sft, dpo in ((0, 0.62, [1, 1, 0, 0], [1, 1, 1, 1]), (1, 0.64, [1, 1, 1, 0], [1, 1, 1, 0])):
        acc = {"sft": sum(sft) / 4, "dpo": sum(dpo) / 4}
        write_run(runs, f"p-s{seed}-pretrain", "pretrain", {"test_bpb": bpb, "val_bpb": 0.5})
        write_run(runs, f"p-s{seed}-sft", "sft", {"test_task_accuracy": acc["sft"]}, scores(*sft))
        # The control's items carry no parent_score: its parent's come from the SFT run's own file.
        control = {"test_task_accuracy": 0.75, "parent_test_task_accuracy": acc["sft"]}
        write_run(runs, f"p-s{seed}-control", "sft", control, scores(1, 1, 1, 0))
        pairs = dict(zip(scores(*dpo), zip(dpo, sft)))
        write_run(
            runs,
            f"p-s{seed}-dpo",
            "dpo",
            {"test_task_accuracy": acc["dpo"], "parent_test_task_accuracy": acc["sft"]},
            pairs,
        )
    parents = {"pretrain": None, "sft": "pretrain", "control": "sft", "reward": "sft", "dpo": "sft"}

    table = write_seeds_report(runs, "p", [0, 1], parents)
    report = json.loads((runs / "p-seeds.json").read_text())
    assert report["seeds"] == [0, 1] and report["bootstrap_resamples"] == 10_000
    by_stage = {s["stage"]: s for s in report["stages"]}
    assert list(by_stage) == ["pretrain", "sft", "control", "dpo"]  # no reward runs: no row
    assert by_stage["pretrain"]["metric"] == "test_bpb" and by_stage["pretrain"]["mean"] == pytest.approx(0.63)
    assert by_stage["pretrain"]["vs_parent"] is None and by_stage["sft"]["vs_parent"] is None
    assert by_stage["dpo"]["runs"] == ["p-s0-dpo", "p-s1-dpo"]
    assert by_stage["dpo"]["vs_parent"]["mean"] == pytest.approx(0.25)
    assert by_stage["dpo"]["vs_parent"]["beats"] == {"0": True, "1": False}
    assert by_stage["dpo"]["vs_control"]["mean"] == pytest.approx(0.125)
    control = by_stage["control"]["vs_parent"]  # [0, 0, 1, 0] and [0, 0, 0, 0] against the SFT runs' items
    assert control["mean"] == pytest.approx(0.125) and control["pairs"] == 8
    assert by_stage["control"]["vs_control"] is None
    assert (runs / "p-seeds.md").read_text().endswith(table + "\n")
    lines = table.splitlines()
    assert lines[0].startswith("| stage") and [line.split("|")[1].strip() for line in lines[2:6]] == list(by_stage)
    assert "test_bpb, lower is better" in lines[2] and "0.6300 ± 0.0141" in lines[2]
    assert "1/2 (not at seed 1)" in lines[5] and "+0.1250 [" in lines[5]


def test_a_seeds_pipeline_plans_every_stage_per_seed_with_the_control_after_sft(tmp_path):
    from llmtrain.config import SftConfig
    from llmtrain.pipeline import plan_stages, stage_inputs

    stages = stage_inputs(None, control=True)
    assert list(stages) == ["pretrain", "sft", "control", "reward", "dpo", "ppo"]
    recipe = {"sft": {"max_rows": 50, "epochs": 3}, "dpo": {"beta": 0.2}}
    configs = plan_stages(str(tmp_path), "p", recipe, None, stages, seed=1)
    assert {stage: cfg.run_name for stage, cfg in configs.items()} == {s: f"p-s1-{s}" for s in stages}
    assert {cfg.seed for cfg in configs.values()} == {1}
    assert configs["sft"].init == "p-s1-pretrain" and configs["sft"].epochs == 3
    control = configs["control"]
    assert isinstance(control, SftConfig) and control.init == "p-s1-sft"
    assert control.epochs == 1 and control.max_rows == 50  # the sft section, one more epoch
    assert configs["dpo"].judge == "p-s1-reward" and configs["dpo"].beta == 0.2
    assert configs["ppo"].init == "p-s1-sft" and configs["ppo"].reward_model == "p-s1-reward"
    plain = plan_stages(str(tmp_path), "p", recipe, None, stage_inputs(None, control=False), seed=None)
    assert plain["sft"].run_name == "p-sft" and plain["sft"].seed == 1337 and "control" not in plain
    own = plan_stages(str(tmp_path), "own", {}, "org/model", stage_inputs("org/model", control=True), seed=0)
    assert list(own) == ["sft", "control", "reward", "dpo", "ppo"] and own["sft"].init == "org/model"


@pytest.fixture
def fake_stages(monkeypatch):
    """Every stage's run replaced by one that writes a finished manifest (and test items) at once; the calls in
    order come back as (run name, seed, init)."""
    from llmtrain import pipeline
    from llmtrain.stages import dpo, ppo, pretrain, reward, sft

    calls = []

    def fake_run(cfg):
        calls.append((cfg.run_name, cfg.seed, getattr(cfg, "init", None)))
        stage = cfg.run_name.rsplit("-", 1)[1]
        metrics = {"test_bpb": 0.6 + cfg.seed / 100} if stage == "pretrain" else {}
        items = None
        if stage in ("sft", "control", "dpo", "ppo"):
            right = {"sft": 2, "control": 3, "dpo": 4, "ppo": 3}[stage] - cfg.seed % 2
            items = scores(*[1.0 if i < right else 0.0 for i in range(4)])
            metrics = {"test_task_accuracy": right / 4}
        write_run(__import__("pathlib").Path(cfg.runs_dir), cfg.run_name, stage, metrics, items)
        return cfg.run_name

    def fake_tokenizer(cfg, out, opts):
        out.mkdir(parents=True)
        (out / "tokenizer.json").write_text("{}")

    for module in (pretrain, sft, reward, dpo, ppo):
        monkeypatch.setattr(module, "run", fake_run)
    monkeypatch.setattr(pipeline, "_train_tokenizer", fake_tokenizer)
    return calls


def test_seeds_and_control_run_every_stage_per_seed_then_skip_and_redo_per_seed(tmp_path, fake_stages, capsys):
    runs = tmp_path / "runs"
    args = ["pipeline", "--runs_dir", str(runs), "--name", "p", "--seeds", "0,1", "--control"]
    assert main(args) == 0
    order = ["pretrain", "sft", "control", "reward", "dpo", "ppo"]
    assert [name for name, _, _ in fake_stages] == [f"p-s{s}-{stage}" for s in (0, 1) for stage in order]
    assert ("p-s1-control", 1, "p-s1-sft") in fake_stages and ("p-s0-sft", 0, "p-s0-pretrain") in fake_stages
    assert not (runs / "p-s1-tokenizer").exists()  # one tokenizer for every seed
    out = capsys.readouterr().out
    assert "p-tokenizer" in out and "| control" in out and (runs / "p-seeds.md").is_file()
    report = json.loads((runs / "p-seeds.json").read_text())
    dpo = next(s for s in report["stages"] if s["stage"] == "dpo")
    assert dpo["values"] == {"0": 1.0, "1": 0.75} and dpo["vs_control"]["mean"] == pytest.approx(0.25)

    fake_stages.clear()
    assert main([*args, "--redo", "sft"]) == 0
    # Each seed's SFT is made again, and with it everything built on it; pretraining is kept.
    assert [name for name, _, _ in fake_stages] == [f"p-s{s}-{stage}" for s in (0, 1) for stage in order[1:]]
    fake_stages.clear()
    assert main([*args, "--redo", "control"]) == 0
    assert [name for name, _, _ in fake_stages] == ["p-s0-control", "p-s1-control"]


def test_without_seeds_the_control_is_one_run_and_the_names_are_unchanged(tmp_path, fake_stages, capsys):
    assert main(["pipeline", "--runs_dir", str(tmp_path), "--name", "p", "--control"]) == 0
    assert [name for name, _, _ in fake_stages] == ["p-pretrain", "p-sft", "p-control", "p-reward", "p-dpo", "p-ppo"]
    assert {seed for _, seed, _ in fake_stages} == {1337} and not (tmp_path / "p-seeds.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0,x"], "--seeds 0,x: give distinct whole numbers"),
        (["--seeds", "1,1"], "--seeds 1,1: give distinct whole numbers"),
        (["--seeds", "0", "--redo", "control"], "--redo control: not a stage"),
    ],
)
def test_bad_seeds_options_are_named(tmp_path, capsys, args, message):
    assert main(["pipeline", "--runs_dir", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_seeds_pipeline_refuses_to_push_every_seed_to_one_repository(tmp_path, capsys):
    recipe = tmp_path / "push.yaml"
    recipe.write_text("sft:\n  push_to_hub: true\n  hub_repo_id: me/model\n")
    assert main(["pipeline", "--config", str(recipe), "--runs_dir", str(tmp_path), "--seeds", "0,1"]) == 2
    err = capsys.readouterr().err
    assert "push_to_hub: true in the pipeline's sft section with --seeds 0,1" in err and "me/model" in err


@pytest.mark.slow
def test_the_seeds_benchmark_runs_every_stage_per_seed_with_a_control_and_reports_the_table(tmp_path, small_corpus):
    """benchmarks/bench_seeds.py on the tiny recipe with two seeds: each seed's runs, the control continued from that
    seed's SFT run, and the seeds table with the machine, threads and versions beside it."""
    import subprocess
    import sys

    from helpers import REPO, env_for, manifest

    recipe = tiny_recipe(tmp_path / "pipeline.yaml", small_corpus)
    runs, out = tmp_path / "runs", tmp_path / "seeds.json"
    script = REPO / "benchmarks" / "bench_seeds.py"
    cmd = [sys.executable, str(script), "--config", str(recipe), "--seeds", "0,1", "--name", "p", "--threads", "1"]
    cmd += ["--runs_dir", str(runs), "--out", str(out)]
    result = subprocess.run(cmd, env=env_for(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    order = ["pretrain", "sft", "control", "reward", "dpo", "ppo"]
    for seed in (0, 1):
        for stage in order:
            run = manifest(runs / f"p-s{seed}-{stage}")
            assert run["status"] == "finished" and run["config"]["seed"] == seed
    control = manifest(runs / "p-s1-control")
    assert control["parent"] == "p-s1-sft" and control["config"]["epochs"] == 1
    assert manifest(runs / "p-s0-dpo")["parent"] == "p-s0-sft" and not (runs / "p-s0-tokenizer").exists()

    report = json.loads(out.read_text())
    assert report["threads"] == 1 and {"python", "torch", "transformers", "datasets"} <= set(report["versions"])
    assert report["command"].startswith("OMP_NUM_THREADS=1 python recipes/pipeline.py --seeds 0,1")
    stages = {s["stage"]: s for s in report["seeds_report"]["stages"]}
    assert list(stages) == order and all(set(s["values"]) == {"0", "1"} for s in stages.values())
    assert stages["dpo"]["vs_control"]["beats"].keys() == {"0", "1"}
    assert stages["dpo"]["metric"] == "test_task_accuracy" and (runs / "p-s0-dpo" / "test_items.jsonl").is_file()
    gain = stages["dpo"]["vs_control"]  # per-item test scores: a paired interval over items x seeds
    assert gain["pairs"] > 0 and gain["low"] <= gain["mean"] <= gain["high"]
    table = out.with_suffix(".md").read_text()
    assert "mean ± std (2 seeds)" in table and [f"| {stage} " in table for stage in order] == [True] * 6
    assert (runs / "p-seeds.json").is_file() and (runs / "p-seeds.md").is_file()


def test_a_damaged_test_items_file_is_named_with_its_line(tmp_path):
    from llmtrain.errors import LLMTrainError
    from llmtrain.seeds import read_items

    (tmp_path / "test_items.jsonl").write_text('{"item": "q1", "score": 1}\n{"item": "q2"}\n')
    with pytest.raises(LLMTrainError, match=r"test_items.jsonl, line 2: not a test item \(KeyError"):
        read_items(tmp_path)
