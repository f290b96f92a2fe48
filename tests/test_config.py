import dataclasses
from pathlib import Path

import pytest

from llmtrain.config import (
    STAGE_CONFIGS,
    DpoConfig,
    PpoConfig,
    PretrainConfig,
    RewardConfig,
    SftConfig,
    config_from_dict,
    parse_config,
)
from llmtrain.errors import LLMTrainError


def test_command_line_overrides_yaml_which_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.01\nmax_steps: 7\npreset: gpt-nano\n")
    cfg = parse_config(PretrainConfig, ["--config", str(recipe), "--max_steps", "9", "--compile"])
    assert (cfg.lr, cfg.max_steps, cfg.preset, cfg.compile) == (0.01, 9, "gpt-nano", True)
    assert cfg.batch_size == PretrainConfig().batch_size


def test_unknown_key_on_the_command_line_suggests_and_lists_valid_keys():
    with pytest.raises(LLMTrainError, match=r"Unknown config key 'max_step'.*Did you mean 'max_steps'.*Valid keys:"):
        parse_config(PretrainConfig, ["--max_step", "3"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("learning_rate: 0.1\n")
    with pytest.raises(LLMTrainError, match=r"'learning_rate' in .*bad.yaml.*Valid keys: .*\blr\b"):
        parse_config(PretrainConfig, ["--config", str(recipe)])


def test_missing_or_malformed_recipe_is_reported(tmp_path):
    with pytest.raises(LLMTrainError, match="does not exist"):
        parse_config(PretrainConfig, ["--config", str(tmp_path / "nope.yaml")])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(LLMTrainError, match="mapping"):
        parse_config(PretrainConfig, ["--config", str(tmp_path / "list.yaml")])


def test_runs_dir_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLMTRAIN_RUNS_DIR", "/somewhere/runs")
    assert parse_config(PretrainConfig, []).runs_dir == "/somewhere/runs"


@pytest.mark.parametrize("stage,cls", list(STAGE_CONFIGS.items()))
def test_every_shipped_recipe_parses(stage, cls):
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs" / stage).glob("*.yaml"))
    assert len(recipes) >= 2, f"no {stage} recipes shipped"
    for recipe in recipes:
        parse_config(cls, ["--config", str(recipe)])


def test_the_cpu_recipes_equal_the_defaults():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    for stage, cls in STAGE_CONFIGS.items():
        assert parse_config(cls, ["--config", str(configs / stage / "cpu-tiny.yaml")]) == cls()


# ---------------------------------------------------------------- validation: choices


def test_an_unknown_schedule_is_refused_with_the_closest_choice_and_where_it_was_set():
    with pytest.raises(
        LLMTrainError,
        match=r"Unknown schedule 'cosin': choose one of cosine, wsd, constant\. Did you mean 'cosine'\? "
        r"\(schedule was set on the command line\.\)",
    ):
        parse_config(PretrainConfig, ["--schedule", "cosin"])


@pytest.mark.parametrize(
    "cls, name, value, suggestion",
    [
        (SftConfig, "mixed_precision", "bf61", "bf16"),
        (RewardConfig, "schedule", "constnt", "constant"),
        (DpoConfig, "loss_type", "sigmod", "sigmoid"),
        (PpoConfig, "value_model", "rewards", "reward"),
        (PpoConfig, "advantage", "grup", "group"),
    ],
)
def test_every_choice_field_refuses_an_unknown_word_and_suggests_the_closest(cls, name, value, suggestion):
    with pytest.raises(LLMTrainError, match=rf"{value}.*choose one of .*Did you mean '{suggestion}'\?"):
        cls(**{name: value})


def test_the_choice_lists_are_defined_once_in_the_config():
    import llmtrain.losses
    import llmtrain.optim
    import llmtrain.runtime
    from llmtrain import config

    assert llmtrain.optim.SCHEDULES is config.SCHEDULES
    assert llmtrain.losses.DPO_LOSS_TYPES is config.DPO_LOSS_TYPES
    assert llmtrain.runtime.MIXED_PRECISIONS is config.MIXED_PRECISIONS


def test_importing_the_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, llmtrain.config; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- validation: numbers


@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_learning_rate_that_is_not_positive_is_refused(value):
    with pytest.raises(LLMTrainError, match=rf"--lr must be positive, got {value}.0\..*lr was set on the command line"):
        parse_config(PretrainConfig, ["--lr", value])
    with pytest.raises(LLMTrainError, match=rf"--value_lr must be positive, got {value}.0"):
        parse_config(PpoConfig, ["--value_lr", value])


@pytest.mark.parametrize("cls", list(STAGE_CONFIGS.values()))
def test_a_zero_batch_size_is_refused_in_every_stage(cls):
    with pytest.raises(LLMTrainError, match=r"--batch_size must be at least 1, got 0\."):
        cls(batch_size=0)


@pytest.mark.parametrize(
    "cls, name",
    [
        (PretrainConfig, "grad_accum"),
        (PretrainConfig, "seq_len"),
        (PretrainConfig, "max_steps"),
        (PretrainConfig, "eval_batches"),
        (PretrainConfig, "log_every"),
        (PretrainConfig, "max_tokens"),
        (SftConfig, "max_length"),
        (SftConfig, "max_steps"),
        (SftConfig, "max_new_tokens"),
        (RewardConfig, "max_rows"),
        (DpoConfig, "num_proc"),
        (PpoConfig, "ppo_epochs"),
        (PpoConfig, "num_mini_batches"),
        (PpoConfig, "num_generations"),
        (PpoConfig, "kl_horizon"),
    ],
)
def test_counts_below_one_are_refused(cls, name):
    with pytest.raises(LLMTrainError, match=rf"--{name} must be at least 1, got 0\."):
        cls(**{name: 0})


@pytest.mark.parametrize(
    "cls, name",
    [
        (PretrainConfig, "eval_every"),
        (PretrainConfig, "save_every"),
        (PretrainConfig, "sample_every"),
        (PretrainConfig, "warmup_steps"),
        (PretrainConfig, "grad_clip"),
        (SftConfig, "keep_checkpoints"),
        (SftConfig, "task_eval_rows"),
        (SftConfig, "num_samples"),
        (PpoConfig, "sample_every"),
        (PpoConfig, "top_k"),
        (PpoConfig, "kl_coef"),
    ],
)
def test_settings_where_zero_means_off_take_zero_but_not_a_negative(cls, name):
    assert getattr(cls(**{name: 0}), name) == 0
    with pytest.raises(LLMTrainError, match=rf"--{name} must be at least 0, got -1"):
        cls(**{name: -1})


def test_unset_limits_stay_unset():
    assert SftConfig(max_steps=None).max_steps is None
    assert PretrainConfig(max_tokens=None, max_time_s=None).max_time_s is None


@pytest.mark.parametrize(
    "cls, name, bad, message",
    [
        (PretrainConfig, "val_fraction", 0.0, r"must be in \(0, 1\)"),
        (SftConfig, "val_fraction", 1.0, r"must be in \(0, 1\)"),
        (PretrainConfig, "min_lr_ratio", 1.5, r"must be in \[0, 1\]"),
        (RewardConfig, "decay_fraction", -0.1, r"must be in \[0, 1\]"),
        (PretrainConfig, "beta2", 1.0, r"must be in \[0, 1\)"),
        (DpoConfig, "label_smoothing", 0.5, r"must be in \[0, 0.5\)"),
        (PpoConfig, "top_p", 0.0, r"must be in \(0, 1\]"),
        (PpoConfig, "gamma", 1.1, r"must be in \[0, 1\]"),
        (PpoConfig, "temperature", 0.0, r"must be positive"),
        (DpoConfig, "beta", 0.0, r"must be positive"),
        (SftConfig, "epochs", 0.0, r"must be positive"),
        (PretrainConfig, "max_time_s", -5.0, r"must be positive"),
        (PpoConfig, "target_kl", 0.0, r"must be positive"),
        (PretrainConfig, "lr", float("nan"), r"must be positive"),
        (SftConfig, "seed", -1, r"must be in \[0, 4294967295\]"),
    ],
)
def test_values_out_of_their_range_are_refused_naming_the_range(cls, name, bad, message):
    with pytest.raises(LLMTrainError, match=rf"--{name} {message}, got {bad}"):
        cls(**{name: bad})


def test_the_edges_of_the_ranges_that_make_sense_are_taken():
    cfg = PpoConfig(top_p=1.0, gamma=1.0, lam=0.0)
    assert (cfg.top_p, cfg.gamma, cfg.lam) == (1.0, 1.0, 0.0)
    assert DpoConfig(label_smoothing=0.0, nll_weight=0.0).label_smoothing == 0.0
    assert PretrainConfig(min_lr_ratio=1.0, decay_fraction=0.0, beta1=0.0).min_lr_ratio == 1.0


def test_a_range_error_from_a_yaml_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "zero.yaml"
    recipe.write_text("batch_size: 0\n")
    with pytest.raises(
        LLMTrainError, match=r"--batch_size must be at least 1, got 0\. .*batch_size was set in .*zero\.yaml"
    ):
        parse_config(RewardConfig, ["--config", str(recipe)])


def test_the_command_line_is_named_when_it_overrides_a_good_yaml_value(tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("lr: 0.001\n")
    with pytest.raises(LLMTrainError, match=r"lr was set on the command line"):
        parse_config(SftConfig, ["--config", str(recipe), "--lr", "-1"])


# ---------------------------------------------------------------- validation: PPO across fields


def test_group_advantages_need_two_generations_per_prompt():
    with pytest.raises(LLMTrainError, match=r"--advantage group compares.*--num_generations to 2 or more"):
        PpoConfig(advantage="group", num_generations=1)
    assert PpoConfig(advantage="group", num_generations=4, batch_size=4).num_generations == 4


def test_ppo_responses_must_split_evenly_into_micro_batches():
    with pytest.raises(LLMTrainError, match=r"= 6 responses per process must split evenly.*num_mini_batches \(4\)"):
        PpoConfig(batch_size=6)


def test_ppo_responses_must_fit_inside_max_length():
    with pytest.raises(LLMTrainError, match=r"--max_new_tokens \(128\) must be below --max_length \(128\)"):
        PpoConfig(max_new_tokens=128)


def test_a_ppo_cross_field_error_in_a_pipeline_section_names_the_section():
    with pytest.raises(LLMTrainError, match=r"num_generations to 2 or more.*was set in the pipeline's ppo section"):
        config_from_dict(PpoConfig, {"advantage": "group"}, "the pipeline's ppo section")


# ---------------------------------------------------------------- validation: types from YAML and pipelines


@pytest.mark.parametrize(
    "line, message",
    [
        ("batch_size: 8.5", r"--batch_size takes a whole number, not 8\.5\."),
        ("batch_size: 8.0", r"--batch_size takes a whole number, not 8\.0\."),
        ("batch_size: [8, 16]", r"--batch_size takes a whole number, not \[8, 16\]\."),
        ("batch_size:", r"--batch_size takes a whole number, not null\."),
        ("lr: fast", r"--lr takes a number, not 'fast'\."),
        ("lr: true", r"--lr takes a number, not True\."),
        ("compile: maybe", r"--compile takes true or false, not 'maybe'\."),
        ("compile: 1", r"--compile takes true or false, not 1\."),
        ("preset: 7", r"--preset takes text, not 7\. Write it in quotes to mean the text\."),
        ("max_tokens: lots", r"--max_tokens takes a whole number \(or null\), not 'lots'\."),
    ],
)
def test_a_yaml_value_of_the_wrong_type_names_key_value_type_and_file(tmp_path, line, message):
    recipe = tmp_path / "typed.yaml"
    recipe.write_text(line + "\n")
    name = line.split(":")[0]
    with pytest.raises(LLMTrainError, match=rf"{message} \({name} was set in .*typed\.yaml\.\)"):
        parse_config(PretrainConfig, ["--config", str(recipe)])


def test_a_pipeline_section_value_of_the_wrong_type_names_the_section():
    with pytest.raises(
        LLMTrainError, match=r"--batch_size takes a whole number, not 8\.5\. .*the pipeline's sft section"
    ):
        config_from_dict(SftConfig, {"batch_size": 8.5}, "the pipeline's sft section")


def test_yaml_numbers_are_read_as_the_command_line_reads_them(tmp_path):
    recipe = tmp_path / "numbers.yaml"
    # YAML reads 3e-4 (no dot) as text and 1 as an int; both are a learning rate all the same
    recipe.write_text("lr: 3e-4\nepochs: 1\nbatch_size: '8'\ncompile: 'yes'\n")
    cfg = parse_config(SftConfig, ["--config", str(recipe)])
    assert (cfg.lr, cfg.batch_size, cfg.compile) == (3e-4, 8, True)
    assert type(cfg.epochs) is float and cfg.epochs == 1.0
    assert type(config_from_dict(SftConfig, {"lr": 1}, "a section").lr) is float


def test_plain_construction_and_replace_still_work_and_replace_is_checked():
    cfg = SftConfig(runs_dir="somewhere", max_steps=2)
    assert dataclasses.replace(cfg, lr=1e-3).lr == 1e-3
    with pytest.raises(LLMTrainError, match="--lr must be positive"):
        dataclasses.replace(cfg, lr=0.0)


def test_the_threads_key_is_a_count_of_at_least_one():
    assert parse_config(SftConfig, ["--threads", "3"]).threads == 3
    assert SftConfig().threads is None
    with pytest.raises(
        LLMTrainError, match=r"--threads must be at least 1, got 0\..*threads was set on the command line"
    ):
        parse_config(SftConfig, ["--threads", "0"])


def test_every_pipeline_recipe_section_builds(monkeypatch):
    import yaml

    from llmtrain.pipeline import _section

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # sections name stage recipes relative to the repository
    recipes = sorted((repo / "recipes" / "configs" / "pipeline").glob("*.yaml"))
    assert len(recipes) >= 2
    for recipe in recipes:
        values = yaml.safe_load(recipe.read_text())
        for stage, cls in STAGE_CONFIGS.items():
            if stage in values:
                config_from_dict(cls, _section(values, stage), f"{recipe.name}'s {stage} section")


@pytest.mark.parametrize(
    "name, fix",
    [
        ("../escaped", "--run_name escaped"),
        ("/tmp/elsewhere/run", "--run_name tmp-elsewhere-run"),
        ("team/exp1", "--run_name team-exp1"),
        ("my run", "--run_name my-run"),
    ],
)
def test_a_run_name_that_is_not_one_folder_name_is_refused_with_a_name_that_works(name, fix):
    with pytest.raises(LLMTrainError, match=rf"--run_name '{name}' is not a run name: a run is one folder inside "
                       rf"--runs_dir.*no '/', no '\.\.', no absolute path.*{fix};.*set --runs_dir.*"
                       r"\(run_name was set on the command line\.\)"):  # fmt: skip
        parse_config(SftConfig, ["--run_name", name])
    SftConfig(run_name=fix.split()[-1])  # the suggested name is taken


def test_a_run_name_kept_for_bookkeeping_or_for_the_newest_run_is_refused():
    with pytest.raises(LLMTrainError, match="names starting with '.' are kept for llmtrain's own bookkeeping"):
        PretrainConfig(run_name=".overwrite")
    with pytest.raises(LLMTrainError, match="'latest' is kept for the newest finished run"):
        DpoConfig(run_name="latest")


def test_help_is_argparse_help_not_an_unknown_key(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as done:
            parse_config(SftConfig, [flag])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert "--run_name RUN_NAME" in out and "--max_bad_rows MAX_BAD_ROWS" in out


def test_every_option_that_shapes_training_is_an_option_of_its_stage():
    for cls in STAGE_CONFIGS.values():
        names = {f.name for f in dataclasses.fields(cls)}
        assert cls.SHAPES_TRAINING <= names, cls.SHAPES_TRAINING - names
    assert {"lr", "warmup_steps", "max_steps", "save_every"}.isdisjoint(SftConfig.SHAPES_TRAINING)
    assert {"seed", "data", "batch_size", "max_length", "lora"} <= SftConfig.SHAPES_TRAINING
    assert "max_new_tokens" in PpoConfig.SHAPES_TRAINING and "max_new_tokens" not in SftConfig.SHAPES_TRAINING
