"""The spine every stage shares: model presets, resolving a model spec, and the run registry.

A model spec is one of: a preset name (fresh weights), a run name in the registry or a run folder,
a local Hugging Face checkpoint, or a Hub model id. A run is a folder under the registry that is a
Hugging Face checkpoint plus `llmtrain.json`, the manifest that records its lineage and metrics.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from llmtrain.errors import LLMTrainError

MANIFEST = "llmtrain.json"

# name -> (family, hidden, layers, heads, kv_heads, ffn); ffn is SwiGLU width (Llama) or the MLP width (GPT-2).
# Parameter counts below are with tied embeddings; the embedding adds vocab x hidden.
_SHAPES: dict[str, tuple[str, int, int, int, int, int]] = {
    "gpt-nano": ("llama", 48, 3, 4, 4, 128),  # ~0.1M with a 512-token vocabulary: unit tests
    "gpt-micro": ("llama", 96, 4, 4, 4, 256),  # ~0.5M: the embedded default on a CPU
    "gpt-mini": ("llama", 256, 6, 8, 8, 688),  # ~5M: a larger CPU run
    "gpt-small": ("llama", 768, 12, 12, 12, 2048),  # ~124M with a 50k vocabulary: GPT-2-small shape
    "gpt-medium": ("llama", 1024, 24, 16, 16, 2816),  # ~360M with a 50k vocabulary
    "gpt2-small": ("gpt2", 768, 12, 12, 12, 3072),  # ~124M, the original GPT-2 architecture
}
PRESETS = tuple(_SHAPES)


def preset_config(name: str, vocab_size: int, max_seq_len: int, special_ids: dict[str, int]) -> PretrainedConfig:
    """A native `transformers` config for preset `name` (fresh weights, SDPA attention, no dropout)."""
    if name not in _SHAPES:
        raise LLMTrainError(f"Unknown preset '{name}'. Valid presets: {', '.join(PRESETS)}.")
    family, hidden, layers, heads, kv_heads, ffn = _SHAPES[name]
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_seq_len,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=ffn,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **special_ids,
        )
    else:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_seq_len,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attention_dropout=0.0,
            **special_ids,
        )
    config._attn_implementation = "sdpa"
    return config


@dataclass
class ModelSource:
    """Where a model spec points: kind is 'preset', 'run', 'local' or 'hub'; path is what from_pretrained takes."""

    kind: str
    spec: str
    path: str | None = None

    @property
    def run_name(self) -> str | None:
        return Path(self.path).name if self.kind == "run" and self.path else None

    @property
    def label(self) -> str | None:
        """How a manifest names it as a parent: a run's name, a Hub id, a checkpoint folder's path."""
        return self.run_name or (self.spec if self.kind == "hub" else self.path)


def resolve_model(spec: str, runs_dir: str | Path) -> ModelSource:
    """Decide what a model spec names, in order: preset, registry run, local folder, Hub id."""
    if spec in _SHAPES:
        return ModelSource("preset", spec)
    run = Path(runs_dir) / spec
    for candidate in (run, Path(spec)):
        if (candidate / MANIFEST).is_file() and (candidate / "config.json").is_file():
            return ModelSource("run", spec, str(candidate.resolve()))
    local = Path(spec)
    if local.exists():
        if (local / "config.json").is_file():
            path = str(local.resolve())
            snapshot = hub_revision(path)  # one revision of a Hub model, as its cache holds it
            return ModelSource("hub", snapshot[0], path) if snapshot else ModelSource("local", spec, path)
        raise LLMTrainError(
            f"'{spec}' is a local path but not a Hugging Face checkpoint (no config.json in it). "
            f"Give a preset ({', '.join(PRESETS)}), a run in {runs_dir}, or a checkpoint folder."
        )
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.startswith(("gpt-", "gpt2-")):
        return ModelSource("hub", spec, spec)
    raise LLMTrainError(
        f"Could not resolve model '{spec}': it is not a preset ({', '.join(PRESETS)}), not a run in "
        f"{runs_dir} (see `llmtrain runs`), not a local checkpoint and not a Hub id."
    )


def resolve_init(spec: str, runs_dir: str | Path, parent_stage: str) -> ModelSource:
    """A fine-tuning stage's --init: 'latest' (the newest finished `parent_stage` run) or any trained model."""
    if spec == "latest":
        latest = latest_run(runs_dir, parent_stage)
        if latest is None:
            raise LLMTrainError(
                f"--init latest: there is no finished {parent_stage} run in {runs_dir} to start from. Make one with "
                f"`accelerate launch recipes/{parent_stage}.py` (or run the stages in order with "
                f"`python recipes/pipeline.py`), or give --init a run, a checkpoint folder or a Hub id."
            )
        return resolve_model(latest["_dir"], runs_dir)
    source = resolve_model(spec, runs_dir)
    if source.kind == "preset":
        raise LLMTrainError(f"--init {spec} is a preset with random weights; start from a trained model.")
    return hub_snapshot(source, runs_dir, "--init")


# The stages whose runs are language models: what `llmtrain generate latest`, `chat latest` and `eval latest` read.
LM_STAGES = ("pretrain", "sft", "dpo", "ppo")


def resolve_latest(spec: str, runs_dir: str | Path, stages: tuple[str, ...], command: str) -> str:
    """A command's model spec with 'latest' (as every stage's --init takes it) made the newest finished run of
    `stages`, which is named on stderr (the command's own output stays clean); any other spec as it is."""
    import sys

    if spec != "latest":
        return spec
    latest = latest_run(runs_dir, stages)
    if latest is None:
        kinds = ", ".join(stages[:-1]) + f" or {stages[-1]}" if len(stages) > 1 else stages[0]
        raise LLMTrainError(
            f"`llmtrain {command} latest`: there is no finished {kinds} run in {runs_dir} (see `llmtrain runs`). "
            "Train one first, or name a run, a checkpoint folder or a Hub id."
        )
    print(f"latest: run {Path(latest['_dir']).name} ({latest.get('stage')}, {latest.get('created')})", file=sys.stderr)
    return latest["_dir"]


def is_reward_model(source: ModelSource) -> bool:
    """Whether a model is a sequence classifier that scores answers (a reward run, or a checkpoint whose config or
    LoRA adapter is one), not a language model."""
    if parent_manifest(source).get("stage") == "reward":
        return True
    folder = Path(source.path or "")
    architectures = _json_file(folder / "config.json").get("architectures") or []
    adapter_task = _json_file(folder / "adapter_config.json").get("task_type")
    return any(str(a).endswith("ForSequenceClassification") for a in architectures) or adapter_task == "SEQ_CLS"


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_judge(spec: str, runs_dir: str | Path) -> ModelSource | None:
    """The reward model that judges a tuned policy: 'latest' (the newest finished reward run, if there is one),
    'none', or any run, folder or Hub id of a sequence classifier."""
    if spec == "none":
        return None
    if spec == "latest":
        latest = latest_run(runs_dir, "reward")
        return resolve_model(latest["_dir"], runs_dir) if latest else None
    source = resolve_model(spec, runs_dir)
    if source.kind == "preset":
        raise LLMTrainError(f"--judge {spec} is a preset with random weights; give a reward model run.")
    return hub_snapshot(source, runs_dir, "--judge")


def hub_snapshot(source: ModelSource, runs_dir: str | Path, flag: str) -> ModelSource:
    """A Hub model as the local folder of one revision, with the files loading needs (the config, weights,
    tokenizer and chat template, fetched now if the cache lacks them). A run then loads, fingerprints and pins that
    folder as it would a local checkpoint: every process loads the same revision, and a resumed run whose Hub model
    has moved on is told so instead of continuing against new weights. Online, this is the Hub's newest revision
    (what `from_pretrained` would load); offline, or when the Hub cannot be reached, the one the cache holds. A Hub
    id neither cached nor on the Hub is an error at once, naming the runs there are (it is often a mistyped run
    name), instead of the minute of retries a download spends offline. Other sources are returned as they are."""
    if source.kind != "hub" or hub_revision(source.path):
        return source  # not a Hub model, or already one revision's folder
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set and the local Hugging Face cache does not hold it"
    else:
        from huggingface_hub import HfApi

        try:
            info = HfApi().model_info(source.spec, timeout=10)
            return ModelSource("hub", source.spec, _download_snapshot(source.spec, info))
        except GatedRepoError:
            raise LLMTrainError(
                f"{flag} {source.spec}: the model is gated on the Hub. Accept its terms on its Hub page, then log in "
                "with `hf auth login` (or set HF_TOKEN) on this machine, and start again."
            ) from None
        except RepositoryNotFoundError:
            why = "the Hub has no public model of that id (a private or gated one needs `hf auth login` or HF_TOKEN)"
        except Exception as e:  # noqa: BLE001 - any network failure: use the cache, as from_pretrained would
            why = f"the Hub could not be reached ({e.__class__.__name__}: {e}) and the local cache does not hold it"
    cached = try_to_load_from_cache(source.spec, "config.json")
    if isinstance(cached, str):
        return ModelSource("hub", source.spec, str(Path(cached).parent.resolve()))
    runs = [Path(m["_dir"]).name for m in list_runs(runs_dir)]
    close = difflib.get_close_matches(source.spec, runs, n=3, cutoff=0.5)
    raise LLMTrainError(
        f"{flag} {source.spec}: there is no run of that name in {runs_dir}"
        + (f" (did you mean {' or '.join(close)}?)" if close else f" ({len(runs)} runs there; see `llmtrain runs`)")
        + f", no checkpoint folder of that name, and no model to load from the Hub: {why}. Give a run name, a "
        "checkpoint folder or a Hub id such as Qwen/Qwen2.5-0.5B-Instruct."
    )


def hub_revision(path: str | Path | None) -> tuple[str, str] | None:
    """(Hub id, commit) of a Hub model's snapshot folder in the Hugging Face cache
    (models--org--name/snapshots/<commit>), or None for any other folder."""
    if not path:
        return None
    folder = Path(path)
    repo = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo.removeprefix("models--").replace("--", "/"), folder.name  # Hub names never hold "--"


# The files of a Hub model that loading reads: config, generation config, tokenizer and chat template, the
# weights (safetensors when the repository has them, else PyTorch .bin), and the model's own code (.py, run only
# with --trust_remote_code). Subfolders (ONNX, GGUF, original checkpoints) are not fetched.
HUB_MODEL_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken", ".py")


def _download_snapshot(repo_id: str, info) -> str:
    from huggingface_hub import snapshot_download

    files = [s.rfilename for s in info.siblings or [] if "/" not in s.rfilename]
    wanted = [f for f in files if f.endswith(HUB_MODEL_SUFFIXES)]
    if not any(f.endswith(".safetensors") for f in wanted):
        wanted += [f for f in files if f.endswith(".bin")]
    folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=wanted)
    return str(Path(folder).resolve())


def parent_manifest(source: ModelSource) -> dict[str, Any]:
    """The manifest of the run a stage starts from ({} for checkpoints that are not runs)."""
    try:
        return read_manifest(source.path) if source.kind == "run" else {}
    except LLMTrainError:
        return {}


# The files of a checkpoint that decide what it computes, and how `model_fingerprint` samples the large ones.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".jinja", ".txt")
SAMPLE_BLOCK, SAMPLE_BLOCKS = 1 << 16, 16


def model_fingerprint(path: str | Path) -> str | None:
    """A content hash of a local checkpoint folder (None for a Hub id): the name, size and sampled bytes of each of its
    weight, config and tokenizer files. Sampling (the whole of small files, 16 spread 64 KiB blocks of large ones)
    keeps it cheap for a model of many gigabytes; retrained or replaced weights differ in every block."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.suffix not in MODEL_FILE_SUFFIXES or f.name == MANIFEST:
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
                h.update(fh.read())
                continue
            for i in range(SAMPLE_BLOCKS):
                fh.seek(i * (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1))
                h.update(fh.read(SAMPLE_BLOCK))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- runs


def new_run_name(stage: str, label: str, runs_dir: str | Path) -> str:
    """A readable unique name: stage-label-YYYYmmdd-HHMMSS (with a suffix if taken)."""
    base = f"{stage}-{re.sub(r'[^A-Za-z0-9._-]+', '-', label)}-{datetime.now():%Y%m%d-%H%M%S}"
    name, i = base, 1
    # A run's lock file reserves its name before its folder exists (the folder is made when the run starts).
    while (Path(runs_dir) / name).exists() or (Path(runs_dir) / f".{name}.lock").exists():
        i += 1
        name = f"{base}-{i}"
    return name


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LLMTrainError(f"{run_dir} is not a run: it has no {MANIFEST}.") from None
    except json.JSONDecodeError as e:
        raise LLMTrainError(f"{path} is not valid JSON ({e}); the run's manifest is damaged.") from None


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (temp file, then rename), so a crash never leaves half of one."""
    path = Path(run_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every run in the registry with its manifest, oldest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = []
    for manifest_path in root.glob(f"*/{MANIFEST}"):
        if manifest_path.parent.name.startswith("."):  # llmtrain's own bookkeeping, e.g. a run being replaced
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        manifest["_dir"] = str(manifest_path.parent)
        runs.append(manifest)
    return sorted(runs, key=lambda m: m.get("created", ""))


def latest_run(runs_dir: str | Path, stage: str | tuple[str, ...], finished: bool = True) -> dict[str, Any] | None:
    """The newest run of `stage` (or of any of several stages), finished or not, or None."""
    stages = (stage,) if isinstance(stage, str) else stage
    want = "finished" if finished else None
    runs = [m for m in list_runs(runs_dir) if m.get("stage") in stages and (want is None or m.get("status") == want)]
    return runs[-1] if runs else None


# The test set's figure first (evaluated once, chosen by nothing), else validation's.
HEADLINE_METRICS = tuple(
    name
    for metric in ("task_accuracy", "reward_accuracy", "val_reward", "val_bpb", "val_loss")
    for name in ("test_" + metric.removeprefix("val_"), metric)
)


def headline(manifest: dict[str, Any]) -> str:
    """The one metric that best says how good a run is, as 'name=value'."""
    metrics = manifest.get("metrics", {})
    for key in HEADLINE_METRICS:
        if key in metrics:
            return f"{key}={metrics[key]:.4g}"
    return "-"


def format_runs_table(runs: list[dict[str, Any]]) -> str:
    """The `llmtrain runs` table."""
    header = ("name", "stage", "status", "parent", "preset", "headline", "created")
    rows = [header]
    for m in runs:
        created = m.get("created", "")[:16].replace("T", " ")
        rows.append(
            (
                Path(m["_dir"]).name,
                m.get("stage", "?"),
                m.get("status", "?"),
                m.get("parent") or "-",
                m.get("preset") or "-",
                headline(m),
                created,
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
