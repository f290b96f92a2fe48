import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmtrain.errors import LLMTrainError
from llmtrain.registry import PRESETS, format_runs_table, list_runs, preset_config, resolve_init, resolve_model


def n_params(preset: str, vocab: int) -> float:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config(preset, vocab, 1024, {}))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "preset,vocab,low,high",
    [
        ("gpt-nano", 512, 0.08e6, 0.15e6),
        ("gpt-micro", 512, 0.4e6, 0.6e6),
        ("gpt-small", 50304, 115e6, 130e6),
        ("gpt2-small", 50304, 115e6, 130e6),
        ("gpt-medium", 50304, 330e6, 380e6),
    ],
)
def test_presets_have_their_advertised_size(preset, vocab, low, high):
    assert low <= n_params(preset, vocab) <= high


def test_presets_are_native_transformers_architectures():
    assert preset_config("gpt-micro", 512, 128, {}).model_type == "llama"
    assert preset_config("gpt2-small", 512, 128, {}).model_type == "gpt2"


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(LLMTrainError, match="Unknown preset 'gpt-huge'. Valid presets: " + ", ".join(PRESETS)):
        preset_config("gpt-huge", 512, 128, {})


def test_model_specs_resolve_to_preset_run_local_or_hub(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "my-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "llmtrain.json").write_text(json.dumps({"stage": "pretrain"}))
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert resolve_model("gpt-micro", runs).kind == "preset"
    assert resolve_model("my-run", runs).kind == "run" and resolve_model("my-run", runs).run_name == "my-run"
    assert resolve_model(str(local), runs).kind == "local"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M", runs).kind == "hub"
    with pytest.raises(LLMTrainError, match="not a Hugging Face checkpoint"):
        resolve_model(str(tmp_path), runs)
    with pytest.raises(LLMTrainError, match="Could not resolve model 'gpt-tiny'"):
        resolve_model("gpt-tiny", runs)


@pytest.mark.parametrize("offline", [True, False])
def test_init_with_a_mistyped_run_name_fails_at_once_naming_the_run_it_resembles(tmp_path, monkeypatch, offline):
    from huggingface_hub import constants

    run = tmp_path / "runs" / "sft-gpt-micro-20261130-101500"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "llmtrain.json").write_text(json.dumps({"stage": "sft", "status": "finished"}))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)  # online here: no network, so the Hub is unreachable
    with pytest.raises(LLMTrainError, match=r"--init sft-gpt-micro-20261130-1015: there is no run.*did you mean "
                       r"sft-gpt-micro-20261130-101500\?.*no model to load from the Hub"):  # fmt: skip
        resolve_init("sft-gpt-micro-20261130-1015", tmp_path / "runs", "pretrain")  # not a ~40 s download retry


def test_runs_table_shows_lineage_and_headline(tmp_path):
    for name, manifest in {
        "a": {
            "stage": "pretrain",
            "status": "finished",
            "preset": "gpt-micro",
            "created": "2026-01-01T10:00:00",
            "metrics": {"val_loss": 1.5, "val_bpb": 0.81234},
        },
        "b": {"stage": "sft", "status": "running", "parent": "a", "created": "2026-01-02T10:00:00"},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "llmtrain.json").write_text(json.dumps(manifest))
    runs = list_runs(tmp_path)
    assert [r["stage"] for r in runs] == ["pretrain", "sft"]
    table = format_runs_table(runs).splitlines()
    assert table[0].split() == ["name", "stage", "status", "parent", "preset", "headline", "created"]
    assert "val_bpb=0.8123" in table[1] and table[2].split()[:4] == ["b", "sft", "running", "a"]
