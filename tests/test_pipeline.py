import json

import pytest
import yaml

from llmtrain.cli import main


@pytest.mark.slow
def test_pipeline_runs_the_stages_in_order_then_skips_what_exists(tmp_path, small_corpus, capsys):
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "tokenizer": {"vocab_size": 320},
                "pretrain": {
                    "data": str(small_corpus),
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
        )
    )
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
    assert "val_bpb=" in table[1] and "task_accuracy=" in table[2]
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
