import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmtrain.errors import LLMTrainError
from llmtrain.registry import (
    PRESETS,
    ModelSource,
    format_runs_table,
    hub_revision,
    list_runs,
    preset_config,
    resolve_init,
    resolve_model,
)


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


# ---------------------------------------------------------------- Hub models: one revision's folder


def a_hub_cache(root: Path, repo_id: str, revision: str) -> Path:
    """A Hugging Face cache (huggingface_hub's layout) whose `main` of `repo_id` is `revision`, a tiny checkpoint."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_hub_id_resolves_to_the_folder_of_the_revision_the_cache_holds_and_keeps_its_id(tmp_path, hub_cache):
    snapshot = a_hub_cache(hub_cache, "org/tiny-lm", "a" * 40)
    source = resolve_init("org/tiny-lm", tmp_path / "runs", "pretrain")
    assert source == ModelSource("hub", "org/tiny-lm", str(snapshot.resolve()))
    assert source.label == "org/tiny-lm" and hub_revision(source.path) == ("org/tiny-lm", "a" * 40)
    # That folder given as a path is the same model: the id and the revision it pins.
    assert resolve_init(str(snapshot), tmp_path / "runs", "pretrain") == source
    plain = tmp_path / "my-checkpoint"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert resolve_model(str(plain), tmp_path) == ModelSource("local", str(plain), str(plain.resolve()))


def fake_hub(monkeypatch, revision: str, files: list[str], error: Exception | None = None) -> list[dict]:
    """The Hub as `huggingface_hub` sees it (no network here): `files` at `revision`; returns the downloads asked."""
    import huggingface_hub
    from huggingface_hub import constants

    asked: list[dict] = []

    class Api:
        def model_info(self, repo_id, timeout=None):
            return SimpleNamespace(sha=revision, siblings=[SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(repo_id, revision, allow_patterns):
        asked.append({"repo_id": repo_id, "revision": revision, "files": sorted(allow_patterns)})
        if error is not None:
            raise error
        return a_hub_cache(Path(constants.HF_HUB_CACHE), repo_id, revision)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def test_online_the_newest_revision_is_fetched_with_only_the_files_loading_reads(tmp_path, hub_cache, monkeypatch):
    a_hub_cache(hub_cache, "org/tiny-lm", "a" * 40)  # an older revision in the cache: the Hub's newest wins
    weights = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin"]
    tokenizer = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", "merges.txt"]
    other = [".gitattributes", "README.md", "original/consolidated.00.pth", "original/params.json", "onnx/model.onnx"]
    config = ["config.json", "generation_config.json", "model.safetensors.index.json", "modeling_x.py"]
    other += ["original/convert.py"]
    asked = fake_hub(monkeypatch, "b" * 40, config + weights + tokenizer + other)
    source = resolve_init("org/tiny-lm", tmp_path / "runs", "pretrain")
    assert hub_revision(source.path) == ("org/tiny-lm", "b" * 40)
    fetched = sorted(config + weights[:2] + tokenizer)  # no subfolder, no second copy of the weights
    assert asked == [{"repo_id": "org/tiny-lm", "revision": "b" * 40, "files": fetched}]

    asked = fake_hub(monkeypatch, "c" * 40, ["config.json", "pytorch_model.bin", "vocab.json", "training_args.bin"])
    resolve_init("org/old-lm", tmp_path / "runs", "pretrain")  # no safetensors: the .bin weights
    assert asked[0]["files"] == ["config.json", "pytorch_model.bin", "training_args.bin", "vocab.json"]


def test_a_gated_hub_model_says_how_to_get_access(tmp_path, hub_cache, monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    gated = GatedRepoError("403 gated", response=SimpleNamespace(headers={}, request=None))
    fake_hub(monkeypatch, "d" * 40, ["config.json", "model.safetensors"], error=gated)
    with pytest.raises(LLMTrainError, match=r"--init meta-llama/Llama-3.2-1B: the model is gated.*hf auth login"):
        resolve_init("meta-llama/Llama-3.2-1B", tmp_path / "runs", "pretrain")


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
