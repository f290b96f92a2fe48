"""Publish a run on the Hugging Face Hub: a staging folder (weights, config, tokenizer, model card), then one upload.

The staging folder holds exactly what goes to the Hub; `llmtrain push RUN --dry_run` writes it to
RUN/hub_upload for inspection, a real push builds the same folder in a temporary directory and hands it
to `HfApi.upload_folder`. The token is read by huggingface_hub itself (HF_TOKEN or `hf auth login`) and
never passes through this module, except to scrub it from error messages.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from llmtrain.errors import LLMTrainError
from llmtrain.registry import MANIFEST, headline, read_manifest, timestamp, write_manifest

DRY_RUN_DIR = "hub_upload"
# What a Hub repo of a run needs to load: weights (safetensors only), configs, tokenizer and chat template, and the
# code of a model trained with --trust_remote_code (.py).
UPLOAD_NAMES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
}
DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv")
# Keys of the resolved config that describe this machine (where runs and caches lived), not the training.
LOCAL_KEYS = ("runs_dir", "cache_dir")
DEFAULT_LICENSE = "apache-2.0"


# ---------------------------------------------------------------- the run and its lineage


def find_run(spec: str, runs_dir: str | Path) -> Path:
    """A finished run by name (in `runs_dir`) or folder."""
    for candidate in (Path(runs_dir) / spec, Path(spec)):
        if (candidate / MANIFEST).is_file():
            status = read_manifest(candidate).get("status")
            if status != "finished":
                raise LLMTrainError(
                    f"Run '{candidate.name}' is {status}, not finished; only finished runs are pushed. "
                    f"Finish it first (resume it with --run_name {candidate.name})."
                )
            return candidate.resolve()
    raise LLMTrainError(f"No run '{spec}' in {runs_dir} (and no run folder at that path). See `llmtrain runs`.")


def lineage(run_path: Path) -> list[dict[str, Any]]:
    """This run's manifest, then its parent's, and so on up to the run that started from a preset or a
    checkpoint outside the registry (parents are looked up beside the run, then as a path)."""
    chain = [{**read_manifest(run_path), "_dir": str(run_path)}]
    while len(chain) < 50:  # a guard against a (hand-edited) cycle
        last = chain[-1]
        parent = last.get("parent")
        if not parent or last.get("model", {}).get("source", "run") != "run":
            break
        found = next(
            (c for c in (Path(last["_dir"]).parent / parent, Path(parent)) if (c / MANIFEST).is_file()),
            None,
        )
        if found is None:
            break
        chain.append({**read_manifest(found), "_dir": str(found)})
    return chain


def base_model(chain: list[dict[str, Any]]) -> str | None:
    """The Hub model the lineage starts from, if it starts from one."""
    root = chain[-1].get("model", {})
    return root.get("spec") if root.get("source") == "hub" else None


def data_specs(manifest: dict[str, Any]) -> list[str]:
    """The data sets one run trained and evaluated on, as given in its config."""
    config = manifest.get("config", {})
    specs = [config.get(key) for key in ("data", "eval_data")]  # PPO's prompts are its `data` too
    return [s for s in dict.fromkeys(specs) if isinstance(s, str) and s]


def is_hub_dataset(spec: str) -> bool:
    """A data spec that names a Hub data set: not the embedded default, not a local path or file."""
    if spec == "default" or Path(spec).exists() or spec.lower().endswith(DATA_SUFFIXES):
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) is not None


def is_reward_model(run_path: Path) -> bool:
    """A sequence classifier (one score) rather than a causal LM."""
    config = run_path / "config.json"
    architectures = json.loads(config.read_text()).get("architectures", []) if config.is_file() else []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def is_adapter(run_path: Path) -> bool:
    """A LoRA adapter saved alone (merge_lora false), which loads on top of its base model."""
    return (run_path / "adapter_config.json").is_file() and not (run_path / "config.json").is_file()


# ---------------------------------------------------------------- the model card


def model_card(run_path: Path, repo_id: str, license: str = DEFAULT_LICENSE) -> str:
    """README.md for the Hub: YAML metadata, then lineage, data, metrics, usage and the resolved config."""
    from huggingface_hub import ModelCardData

    chain = lineage(run_path)
    manifest = chain[0]
    reward = is_reward_model(run_path)
    adapter = is_adapter(run_path)
    datasets = [s for m in chain for s in data_specs(m) if is_hub_dataset(s)]
    tags = (
        ["llmtrain", manifest.get("stage", "run")]
        + (["reward-model"] if reward else [])
        + (["lora"] if adapter else [])
    )
    metadata = ModelCardData(
        license=license,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification" if reward else "text-generation",
        tags=tags,
        datasets=list(dict.fromkeys(datasets)) or None,
        base_model=base_model(chain),
    )
    stage = manifest.get("stage", "?")
    trusts_remote_code = bool(manifest.get("config", {}).get("trust_remote_code"))
    kind = "reward model (one score per sequence)" if reward else "causal language model"
    sections = [
        f"---\n{metadata.to_yaml()}\n---",
        f"# {repo_id.split('/')[-1]}\n\nA {kind} trained with llmtrain: the `{stage}` run `{manifest['name']}` "
        f"(finished {manifest.get('updated', '?')}), {_architecture(run_path, manifest)}.",
        "## Usage\n\n```python\n" + usage_snippet(repo_id, reward, stage, adapter, trusts_remote_code) + "```",
        "## Lineage\n\nFrom this run back to the run that started from fresh weights or an outside checkpoint:\n\n"
        + _lineage_table(chain),
        "## Data\n\n" + "\n".join(f"- `{m['name']}` ({m.get('stage')}): {_data_line(m)}" for m in chain),
        "## Metrics\n\n" + _metrics_table(manifest.get("metrics", {})),
        "## Training config\n\nThe resolved config of this run (llmtrain defaults, recipe file and "
        "command-line overrides):\n\n```yaml\n" + _config_yaml(manifest) + "```",
        "## Framework versions\n\n"
        + "\n".join(f"- {name} {version}" for name, version in manifest.get("versions", {}).items()),
    ]
    return "\n\n".join(sections) + "\n"


def usage_snippet(
    repo_id: str, reward: bool, stage: str, adapter: bool = False, trust_remote_code: bool = False
) -> str:
    """Python that loads the pushed repo with transformers and uses it (chat template included); a model trained
    with --trust_remote_code loads with its repository's code too."""
    source = f'"{repo_id}", trust_remote_code=True' if trust_remote_code else f'"{repo_id}"'
    if reward:
        return (
            "import torch\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained({source})\n"
            f"model = AutoModelForSequenceClassification.from_pretrained({source})\n"
            'messages = [{"role": "user", "content": "What is 12 + 30?"}, '
            '{"role": "assistant", "content": "12 + 30 = 42"}]\n'
            'inputs = tokenizer.apply_chat_template(messages, return_dict=True, return_tensors="pt")\n'
            "with torch.no_grad():\n"
            '    reward = model(input_ids=inputs["input_ids"]).logits[0, 0].item()\n'
            "print(reward)  # higher means a better answer\n"
        )
    load = (
        f"from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained({source})\n"
        if adapter
        else f"model = AutoModelForCausalLM.from_pretrained({source})\n"
    )
    head = "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n" if not adapter else ""
    head += load + f"tokenizer = AutoTokenizer.from_pretrained({source})\n"
    if stage == "pretrain":  # a base model continues text; its chat template is there for the stages after
        prompt = 'inputs = tokenizer("The sum of 12 and 30 is", return_tensors="pt")\n'
    else:
        prompt = (
            'messages = [{"role": "user", "content": "What is 12 + 30?"}]\n'
            "inputs = tokenizer.apply_chat_template(\n"
            '    messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"\n'
            ")\n"
        )
    return (
        head
        + prompt
        + "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
        + 'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))\n'
    )


def _architecture(run_path: Path, manifest: dict[str, Any]) -> str:
    """'preset `gpt-nano`, LlamaForCausalLM, 0.10M parameters' read from the saved files themselves."""
    from safetensors import safe_open

    config = run_path / "config.json"
    architectures = (json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []
    n = 0
    for path in run_path.glob("*.safetensors"):
        with safe_open(str(path), framework="np") as f:
            n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    parts = [f"preset `{manifest['preset']}`" if manifest.get("preset") else "", *architectures[:1]]
    parts.append(f"{n / 1e6:.2f}M parameters" if n else "")
    return ", ".join(p for p in parts if p) or "a transformers model"


def _lineage_table(chain: list[dict[str, Any]]) -> str:
    rows = ["| run | stage | started from | headline metric |", "|---|---|---|---|"]
    for m in chain:
        model = m.get("model", {})
        source = model.get("source")
        if source == "preset":
            start = f"preset `{model.get('spec')}` (fresh weights)"
        elif source == "hub":
            start = f"[{model.get('spec')}](https://huggingface.co/{model.get('spec')})"
        else:
            start = f"`{Path(str(m.get('parent') or '-')).name}`"
        rows.append(f"| `{m.get('name')}` | {m.get('stage')} | {start} | {headline(m)} |")
    return "\n".join(rows)


def _data_line(manifest: dict[str, Any]) -> str:
    specs = data_specs(manifest)
    if not specs:
        return "-"

    def one(spec: str) -> str:
        if spec == "default":
            return "the embedded default data set (llmtrain's arithmetic task and corpus)"
        if is_hub_dataset(spec):
            return f"[{spec}](https://huggingface.co/datasets/{spec})"
        return f"local `{Path(spec).name}`"

    return ", ".join(dict.fromkeys(one(s) for s in specs))


def _metrics_table(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "No metrics recorded."
    rows = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        rows.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(rows)


def _config_yaml(manifest: dict[str, Any]) -> str:
    config = {k: public_value(v) for k, v in manifest.get("config", {}).items() if k not in LOCAL_KEYS}
    return yaml.safe_dump(config, sort_keys=False)


def public_value(value: Any) -> Any:
    """A config value as a model card shows it: a local path (`init`, `data`, `eval_data`, `tokenizer`...) by its
    last part only, a run's name or a file's name, so the card says nothing of the machine it was trained on;
    presets, Hub ids and other values as they are."""
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_value(v) for v in value]
    if not isinstance(value, str) or not value:
        return value
    path = Path(value)
    nested = len(path.parts) > 1 and (path.exists() or value.lower().endswith(DATA_SUFFIXES))
    if path.is_absolute() or value.startswith(("~", "./", "../")) or nested:
        return path.name or value
    return value


# ---------------------------------------------------------------- staging and upload


def stage_upload(run_path: Path, out: Path, repo_id: str, license: str = DEFAULT_LICENSE) -> Path:
    """Write into `out` (emptied first) exactly what goes to the Hub: the run's model files and a model card."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = [p for p in sorted(run_path.iterdir()) if p.is_file() and _belongs(p.name)]
    if not any(p.suffix == ".safetensors" for p in files):
        raise LLMTrainError(f"Run '{run_path.name}' has no safetensors weights to push; was it saved?")
    if is_adapter(run_path):
        base = json.loads((run_path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if not is_hub_dataset(base):  # the same test: a Hub id, not a local path
            raise LLMTrainError(
                f"Run '{run_path.name}' holds a LoRA adapter only (merge_lora false) on top of the local model "
                f"'{base}', which nobody who downloads it can load. Run the stage again with --merge_lora true "
                f"to save the merged model, and push that."
            )
    for path in files:
        shutil.copy2(path, out / path.name)
    (out / "README.md").write_text(model_card(run_path, repo_id, license))
    return out


def _belongs(name: str) -> bool:
    return name in UPLOAD_NAMES or name.endswith((".safetensors", ".py"))


def listing(folder: Path) -> str:
    """The staged files with their sizes, and the total."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    lines = [f"  {_size(p.stat().st_size):>9}  {p.relative_to(folder)}" for p in files]
    lines.append(f"  {_size(sum(p.stat().st_size for p in files)):>9}  total, {len(files)} files")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def check_repo_id(repo_id: str | None, field: str) -> str:
    """A repo id the Hub accepts ('user/name'), or an error naming the option to fix."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise LLMTrainError(f"{field} is not set: give the Hub repository to upload to, e.g. {field} user/my-model.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LLMTrainError(f"{field} '{repo_id}' is not a valid Hub repository id (user/name): {e}") from None
    return repo_id


def check_push_config(cfg: Any) -> None:
    """Before training: a stage config that asks to push must say where, and a token must be there."""
    if not getattr(cfg, "push_to_hub", False):
        return
    if not cfg.hub_repo_id:
        raise LLMTrainError(
            "push_to_hub is true but hub_repo_id is not set, so the run would have nowhere to go. Give the Hub "
            "repository: --hub_repo_id user/my-model (or hub_repo_id: user/my-model in the recipe)."
        )
    check_repo_id(cfg.hub_repo_id, "hub_repo_id")
    require_token(
        "push_to_hub is true but no Hugging Face token was found, so the upload after training would fail. "
        "Set HF_TOKEN (a token with write access) or run `hf auth login`, or set push_to_hub false and "
        "push later with `llmtrain push RUN --repo_id ...`."
    )


def require_token(message: str) -> None:
    """Fail with `message` when huggingface_hub finds no token (HF_TOKEN or the stored login)."""
    from huggingface_hub import get_token

    if get_token() is None:
        raise LLMTrainError(message)


def push_run(
    run_path: Path, repo_id: str, private: bool = False, license: str = DEFAULT_LICENSE, dry_run: bool = False
) -> dict[str, Any]:
    """Stage the run and upload it (or, with dry_run, only stage it into RUN/hub_upload).

    Returns what happened: the staging folder and its listing, and after an upload the repo url and commit,
    which are also recorded in the run's manifest under "hub". A failed upload changes nothing in the run."""
    check_repo_id(repo_id, "--repo_id")
    if dry_run:
        out = stage_upload(run_path, run_path / DRY_RUN_DIR, repo_id, license)
        return {"staged": str(out), "listing": listing(out)}
    require_token(
        f"No Hugging Face token found to push run '{run_path.name}'. Set HF_TOKEN to a token with write access "
        f"or run `hf auth login`, then retry; --dry_run shows what would be uploaded without one."
    )
    with tempfile.TemporaryDirectory(prefix="llmtrain-hub-") as tmp:
        out = stage_upload(run_path, Path(tmp) / run_path.name, repo_id, license)
        files = listing(out)
        result = upload_folder(out, repo_id, private, run_path)
    manifest = read_manifest(run_path)
    manifest["hub"] = result
    write_manifest(run_path, manifest)
    return {**result, "listing": files}


def upload_folder(folder: Path, repo_id: str, private: bool, run_path: Path) -> dict[str, Any]:
    """Create the repo if needed and upload `folder` in one commit; any failure becomes one clear message."""
    from huggingface_hub import HfApi

    api = HfApi()  # the token comes from HF_TOKEN or the stored login, inside huggingface_hub
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=f"Upload {run_path.name} (llmtrain)"
        )
    except Exception as e:  # network, auth, repo errors alike: the run is finished, only the upload failed
        raise LLMTrainError(_upload_error(e, repo_id, run_path)) from None
    return {
        "repo_id": repo_id,
        "url": str(getattr(commit, "repo_url", None) or repo_url),
        "commit": getattr(commit, "oid", None),
        "commit_url": getattr(commit, "commit_url", None),
        "private": private,
        "pushed": timestamp(),
    }


def _upload_error(e: Exception, repo_id: str, run_path: Path) -> str:
    from huggingface_hub import get_token

    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    token = get_token()
    if token:
        reason = reason.replace(token, "***")  # never echo a token, even one a server error repeats
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403) or "token" in reason.lower() or type(e).__name__ == "LocalTokenNotFoundError":
        hint = "Check that HF_TOKEN (or `hf auth login`) holds a token with write access to that namespace."
    elif status == 404 or "RepositoryNotFound" in type(e).__name__:
        hint = "Check the repository id and that you may create repositories in that namespace."
    elif status is None:
        hint = "Check the network connection to the Hub (and that HF_HUB_OFFLINE is not set)."
    else:
        hint = "The Hub refused the upload; the reason above says why."
    return (
        f"Uploading run '{run_path.name}' to {repo_id} failed ({type(e).__name__}: {reason}). The run itself is "
        f"unchanged and still finished. {hint} Then retry with `llmtrain push {run_path} --repo_id {repo_id}`."
    )
