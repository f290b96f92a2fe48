import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl, metadata_load
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtrain.cli import main, run_stage
from llmtrain.config import RewardConfig

TOKEN = "hf_TestSecretToken1234567890"
REPO_ID = "someone/tiny-chat"
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture
def runs(tmp_path, finished_run, sft_run) -> Path:
    """A private copy of the registry's `tiny` -> `sft-tiny` lineage, for tests that push (and so edit manifests)."""
    runs = tmp_path / "runs"
    for run in (finished_run, sft_run):
        shutil.copytree(run, runs / run.name)
    return runs


@pytest.fixture
def hub(monkeypatch):
    """HfApi patched at its API boundary: records what create_repo and upload_folder were given."""
    calls: dict = {"fail": None}
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        if calls["fail"]:
            raise calls["fail"]
        folder = Path(folder_path)
        calls["upload_folder"] = {"repo_id": repo_id, "folder": folder, **kwargs}
        calls["files"] = {p.name: p.read_bytes() for p in folder.iterdir()}
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc123",
            commit_message=kwargs.get("commit_message", ""),
            commit_description="",
            oid="abc123",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def first_rows(name: str, n: int, tmp_path: Path) -> str:
    """The first `n` rows of one of the task's files: a held-out set that evaluates in no time."""
    path = tmp_path / name
    path.write_text("".join((REPO / "data" / name).read_text().splitlines(keepends=True)[:n]))
    return str(path)


def usage_snippet(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def run_snippet(card: str, folder: Path) -> str:
    """Run the card's usage snippet against the local folder instead of the Hub repo; returns what it prints."""
    code = usage_snippet(card).replace(f'"{REPO_ID}"', repr(str(folder)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})
    return out.getvalue()


def test_the_dry_run_folder_loads_with_transformers_and_has_a_valid_model_card(runs, capsys):
    assert main(["push", "sft-tiny", "--repo_id", REPO_ID, "--dry_run", "--runs_dir", str(runs)]) == 0
    folder = runs / "sft-tiny" / "hub_upload"
    out = capsys.readouterr().out
    assert str(folder) in out and "model.safetensors" in out and "total, 7 files" in out
    # Only what the model needs: no manifest, metrics, plot or checkpoints.
    assert {p.name for p in folder.iterdir()} == MODEL_FILES | {"chat_template.jinja", "README.md"}

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and model.config.vocab_size >= len(tokenizer)
    assert "<|assistant|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )

    meta = metadata_load(folder / "README.md")
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and {"llmtrain", "sft"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta  # a preset and local / embedded data
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0"
    for text in (
        "| `sft-tiny` | sft | `tiny` |",
        "| `tiny` | pretrain | preset `gpt-nano`",
        "## Metrics",
        "task_accuracy",
    ):
        assert text in card.text
    assert "runs_dir" not in card.text and str(runs) not in card.text  # nothing about this machine
    assert "AutoModelForCausalLM" in usage_snippet(card.content) and "apply_chat_template" in card.content
    run_snippet(card.content, folder)  # the usage snippet runs as written


def test_push_uploads_the_staged_folder_and_records_the_commit(runs, hub, capsys):
    before = json.loads((runs / "sft-tiny" / "llmtrain.json").read_text())
    args = ["push", "sft-tiny", "--repo_id", REPO_ID, "--private", "--license", "mit", "--runs_dir", str(runs)]
    assert main(args) == 0
    assert hub["create_repo"]["repo_id"] == REPO_ID and hub["create_repo"]["private"] is True
    assert hub["upload_folder"]["repo_id"] == REPO_ID
    assert set(hub["files"]) == MODEL_FILES | {"chat_template.jinja", "README.md"}
    assert hub["files"]["model.safetensors"] == (runs / "sft-tiny" / "model.safetensors").read_bytes()
    assert b"license: mit" in hub["files"]["README.md"]
    assert not hub["upload_folder"]["folder"].exists()  # the temporary staging folder is gone
    assert not (runs / "sft-tiny" / "hub_upload").exists()

    after = json.loads((runs / "sft-tiny" / "llmtrain.json").read_text())
    assert after["status"] == "finished" and after["metrics"] == before["metrics"]
    assert after["hub"]["repo_id"] == REPO_ID and after["hub"]["commit"] == "abc123"
    assert after["hub"]["url"] == f"https://huggingface.co/{REPO_ID}"
    assert "abc123" in capsys.readouterr().out


def test_a_failed_upload_leaves_the_run_untouched_and_says_why(runs, hub, capsys):
    run = runs / "sft-tiny"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    hub["fail"] = ConnectionError("Network is unreachable")
    assert main(["push", "sft-tiny", "--repo_id", REPO_ID, "--runs_dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "Network is unreachable" in err and "unchanged and still finished" in err
    assert f"llmtrain push {run} --repo_id {REPO_ID}" in err and "Traceback" not in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_hub_token_appears_in_no_file_and_no_message(runs, hub, capsys):
    assert main(["push", "sft-tiny", "--repo_id", REPO_ID, "--dry_run", "--runs_dir", str(runs)]) == 0
    assert main(["push", "sft-tiny", "--repo_id", REPO_ID, "--runs_dir", str(runs)]) == 0
    hub["fail"] = PermissionError(f"401 Unauthorized: token {TOKEN} is invalid")  # a server echoing the token
    assert main(["push", "sft-tiny", "--repo_id", REPO_ID, "--runs_dir", str(runs)]) == 2
    out, err = capsys.readouterr()
    assert TOKEN not in out + err and "write access" in err
    assert all(TOKEN.encode() not in content for content in hub["files"].values())
    for path in runs.rglob("*"):
        assert path.is_dir() or TOKEN.encode() not in path.read_bytes(), path


def test_the_card_names_hub_base_models_and_data_sets(runs):
    from llmtrain.hub import model_card

    # Pretend the lineage started from a Hub model and tuned on a Hub data set.
    for name, edit in (("tiny", {"model": {"source": "hub", "spec": "org/base-model"}}), ("sft-tiny", None)):
        path = runs / name / "llmtrain.json"
        manifest = json.loads(path.read_text())
        if edit:
            manifest.update(edit)
        else:
            manifest["config"]["data"] = "HuggingFaceTB/smol-smoltalk"
        path.write_text(json.dumps(manifest))
    card = ModelCard(model_card(runs / "sft-tiny", REPO_ID))
    assert card.data.base_model == "org/base-model"
    assert card.data.datasets == ["HuggingFaceTB/smol-smoltalk"]
    assert "(https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk)" in card.text


def test_a_reward_model_card_uses_the_sequence_classification_snippet(runs, tmp_path):
    from llmtrain.hub import push_run
    from llmtrain.stages import reward

    config = RewardConfig(
        runs_dir=str(runs), init="sft-tiny", run_name="rm-hub", max_rows=32, batch_size=8, max_steps=2, max_length=64
    )
    config.eval_every = config.save_every = 0
    config.eval_data = first_rows("prefs_val.jsonl", 16, tmp_path)
    run = reward.run(config)
    folder = Path(push_run(run, REPO_ID, dry_run=True)["staged"])
    card = (folder / "README.md").read_text()
    meta = metadata_load(folder / "README.md")
    assert meta["pipeline_tag"] == "text-classification" and "reward-model" in meta["tags"]
    assert "AutoModelForSequenceClassification" in usage_snippet(card) and "AutoModelForCausalLM" not in card
    assert "| `rm-hub` | reward | `sft-tiny` |" in card and "| `tiny` | pretrain |" in card
    float(run_snippet(card, folder).split()[0])  # prints a score


def test_push_to_hub_without_a_repo_id_is_refused_before_training(tmp_path, capsys):
    assert run_stage("pretrain", ["--push_to_hub", "true", "--runs_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "push_to_hub is true but hub_repo_id is not set" in err and "--hub_repo_id user/my-model" in err
    assert not (tmp_path / "runs").exists()


def test_a_stage_with_push_to_hub_uploads_at_the_end_and_a_failure_keeps_the_run(runs, hub, tmp_path, capsys):
    args = [
        "--runs_dir", str(runs), "--init", "tiny", "--max_rows", "32", "--max_steps", "2", "--batch_size", "8",
        "--max_length", "64", "--task", "none", "--eval_every", "0", "--save_every", "0", "--num_samples", "0",
        "--eval_data", first_rows("sft_val.jsonl", 8, tmp_path), "--push_to_hub", "true", "--hub_repo_id", REPO_ID,
    ]  # fmt: skip
    hub["fail"] = ConnectionError("Network is unreachable")
    assert run_stage("sft", [*args, "--run_name", "sft-push"]) == 2
    err = capsys.readouterr().err
    assert f"llmtrain push {runs / 'sft-push'} --repo_id {REPO_ID}" in err
    manifest = json.loads((runs / "sft-push" / "llmtrain.json").read_text())
    assert manifest["status"] == "finished" and "hub" not in manifest
    assert manifest["config"]["push_to_hub"] is True

    hub["fail"] = None
    assert main(["push", "sft-push", "--repo_id", REPO_ID, "--runs_dir", str(runs)]) == 0  # the retry it suggests
    assert json.loads((runs / "sft-push" / "llmtrain.json").read_text())["hub"]["commit"] == "abc123"
    assert run_stage("sft", [*args, "--run_name", "sft-push-2"]) == 0
    assert json.loads((runs / "sft-push-2" / "llmtrain.json").read_text())["hub"]["repo_id"] == REPO_ID
    assert "model.safetensors" in hub["files"]


def test_the_model_card_shows_no_absolute_local_paths(runs, tmp_path):
    from llmtrain.hub import model_card

    # As a run started with --init <run folder> --data /abs/chats.jsonl --eval_data /abs/val.jsonl records them.
    path = runs / "sft-tiny" / "llmtrain.json"
    manifest = json.loads(path.read_text())
    manifest["parent"] = str(runs / "tiny")
    manifest["config"] |= {
        "init": str(runs / "tiny"),
        "data": str(tmp_path / "private" / "chats.jsonl"),
        "eval_data": str(tmp_path / "private" / "val.jsonl"),
        "chat_template": "~/templates/chat.jinja",
        "task": "arithmetic",
    }
    path.write_text(json.dumps(manifest))
    card = model_card(runs / "sft-tiny", REPO_ID)
    assert str(tmp_path) not in card and "~/" not in card
    assert "init: tiny\n" in card and "data: chats.jsonl\n" in card and "eval_data: val.jsonl\n" in card
    assert "chat_template: chat.jinja\n" in card and "task: arithmetic\n" in card
    assert "local `chats.jsonl`" in card and "| `sft-tiny` | sft | `tiny` |" in card
