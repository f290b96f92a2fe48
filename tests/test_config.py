import pytest

from llmtrain.config import STAGE_CONFIGS, PretrainConfig, parse_config
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
