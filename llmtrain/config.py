"""Stage configs: one dataclass per stage, filled from a YAML recipe and then command-line overrides.

`--config recipes/configs/pretrain/gpt-small.yaml --lr 3e-4` reads the YAML first, then lets any
flag override any key. Every key is a dataclass field, so the resolved config is plain data that
goes into the run manifest as is.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llmtrain.errors import LLMTrainError

C = TypeVar("C")


def default_runs_dir() -> str:
    return os.environ.get("LLMTRAIN_RUNS_DIR", "runs")


@dataclass
class RunConfig:
    """Fields every stage shares: where the run lives and how it starts."""

    runs_dir: str = field(
        default_factory=default_runs_dir,
        metadata={"help": "Registry folder (or set LLMTRAIN_RUNS_DIR)."},
    )
    run_name: str | None = field(default=None, metadata={"help": "Run name; a readable unique one if unset."})
    resume: bool = field(default=False, metadata={"help": "Continue the latest unfinished run of this stage."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished run of the same name."})
    seed: int = 1337
    tracker: str | None = field(
        default=None,
        metadata={"help": "Experiment tracker: tensorboard, wandb, comet_ml, mlflow or trackio."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Token-shard and tokenizer cache (default: $LLMTRAIN_CACHE or ~/.cache/llmtrain)."},
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the finished run to the Hugging Face Hub (needs hub_repo_id)."}
    )
    hub_repo_id: str | None = field(default=None, metadata={"help": "Hub repository to upload to: user/name."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})


@dataclass
class PretrainConfig(RunConfig):
    """Pretraining a causal LM on a text corpus (nanoGPT-style loop on Accelerate)."""

    # data
    data: str = field(
        default="default",
        metadata={"help": "'default' (embedded corpus), a .txt/.jsonl/.json/.parquet file, a folder, or a Hub id."},
    )
    text_field: str = "text"
    dataset_config: str | None = field(default=None, metadata={"help": "Hub data set configuration name."})
    dataset_split: str = "train"
    streaming: bool | None = field(
        default=None, metadata={"help": "Stream a Hub data set (default: yes for Hub ids, no for files)."}
    )
    max_documents: int | None = field(default=None, metadata={"help": "Read at most this many documents."})
    dedup: bool = field(default=True, metadata={"help": "Drop exact duplicate documents."})
    val_fraction: float = field(default=0.02, metadata={"help": "Share of documents held out for validation."})
    num_proc: int | None = field(default=None, metadata={"help": "Tokenizing processes (default: CPU count)."})
    # tokenizer
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder, run or Hub id; default: the model's, or train one on the data."},
    )
    vocab_size: int = field(default=512, metadata={"help": "Vocabulary of a tokenizer trained here."})
    tokenizer_train_chars: int = field(
        default=1_000_000_000, metadata={"help": "Train the tokenizer on at most this many characters."}
    )
    # model
    preset: str = field(
        default="gpt-micro",
        metadata={"help": "Model preset (fresh weights), or a run / local checkpoint / Hub id to continue."},
    )
    seq_len: int = 128
    compile: bool = field(default=False, metadata={"help": "torch.compile the model."})
    attn_implementation: str = field(
        default="auto", metadata={"help": "auto (SDPA where the architecture has it, else eager), sdpa, eager, ..."}
    )
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on a capable GPU), no, bf16, fp16."})
    # optimisation
    batch_size: int = field(default=16, metadata={"help": "Sequences per process per micro-step."})
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = field(default="cosine", metadata={"help": "cosine, wsd (warmup-stable-decay) or constant."})
    warmup_steps: int = 100
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: share of steps spent decaying."})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # when to stop (the first one reached)
    max_steps: int = 1200
    max_tokens: int | None = field(default=None, metadata={"help": "Stop after this many training tokens."})
    max_time_s: float | None = field(default=None, metadata={"help": "Stop after this many seconds."})
    # evaluation, samples, checkpoints
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    sample_every: int = 0
    num_samples: int = 3
    sample_tokens: int = 48
    save_every: int = 500
    keep_checkpoints: int = 2


@dataclass
class FinetuneConfig(RunConfig):
    """Fields every stage that starts from a trained model shares: data, LoRA, optimisation, schedule."""

    init: str = field(
        default="latest",
        metadata={"help": "Model to start from: 'latest' run of the stage before, a run, a checkpoint or a Hub id."},
    )
    data: str = field(
        default="default",
        metadata={"help": "'default' (embedded task), a .jsonl/.json/.parquet file, a folder, or a Hub id."},
    )
    eval_data: str | None = field(
        default="default",
        metadata={"help": "Held-out rows: 'default' (the task's, or a split of --data), a file, or a Hub id."},
    )
    dataset_config: str | None = None
    dataset_split: str = "train"
    eval_split: str = field(default="test", metadata={"help": "Hub split for evaluation when there is one."})
    max_rows: int | None = field(default=None, metadata={"help": "Read at most this many training rows."})
    val_fraction: float = field(default=0.05, metadata={"help": "Held out from --data when it has no eval split."})
    max_length: int = field(default=128, metadata={"help": "Longer examples are truncated, or dropped."})
    num_proc: int | None = field(
        default=None,
        metadata={"help": "Tokenizing processes (default: one per 2,000 rows, at most the CPU count)."},
    )
    # model
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma-separated or all-linear."})
    merge_lora: bool = field(default=True, metadata={"help": "Save the merged model (false: the adapter)."})
    compile: bool = False
    mixed_precision: str = "auto"
    attn_implementation: str = field(
        default="auto", metadata={"help": "auto (SDPA where the architecture has it, else eager), sdpa, eager, ..."}
    )
    chat_template: str = field(
        default="auto",
        metadata={"help": "auto (the model's own, else llmtrain's), llmtrain (the project's), or a .jinja file."},
    )
    # optimisation
    batch_size: int = field(default=32, metadata={"help": "Examples (or pairs) per process per micro-step."})
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    epochs: float = field(default=2.0, metadata={"help": "Passes over the training rows (max_steps wins)."})
    max_steps: int | None = None
    max_time_s: float | None = None
    eval_every: int = 100
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2


@dataclass
class PolicyConfig(FinetuneConfig):
    """Stages that tune a causal LM (SFT, DPO, PPO) and measure it by its greedy answers to held-out prompts."""

    task: str = field(
        default="auto",
        metadata={"help": "Answer checker for task_accuracy: auto (the default task), none, or module:function."},
    )
    task_eval_rows: int = field(default=400, metadata={"help": "Held-out prompts answered for task_accuracy."})
    max_new_tokens: int = 24
    num_samples: int = 3


@dataclass
class SftConfig(PolicyConfig):
    """Supervised fine-tuning on prompt/response or chat data, loss on assistant tokens only."""

    packing: bool = field(default=False, metadata={"help": "Pack examples into rows without cross-talk."})
    epochs: float = field(default=8.0, metadata={"help": "Passes over the training rows (max_steps wins)."})


@dataclass
class RewardConfig(FinetuneConfig):
    """A reward model (one score per sequence) trained on preference pairs with the Bradley-Terry loss."""

    margin: float = field(default=0.0, metadata={"help": "Bradley-Terry margin: -log sigmoid(r_w - r_l - margin)."})
    # Measured on the default task: lr 3e-4 ranked more held-out pairs right than 1e-3 or 3e-3 at every step,
    # and accuracy still rose between 4 and 8 epochs.
    lr: float = 3e-4
    epochs: float = 8.0


@dataclass
class DpoConfig(PolicyConfig):
    """Direct preference optimisation of a causal LM against a frozen reference (its SFT parent)."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the implicit KL to the reference."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo, or conservative (cDPO)."})
    label_smoothing: float = field(
        default=0.1, metadata={"help": "conservative: the assumed share of pairs whose labels are flipped."}
    )
    nll_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of a per-token negative log-likelihood term on the chosen answers (RPO); without it "
            "DPO lowers the chosen answers' likelihood too and a small model's answers degrade."
        },
    )
    precompute_ref: bool = field(
        default=False,
        metadata={"help": "Score every pair with the reference once, before training; no reference in memory."},
    )
    judge: str = field(
        default="latest",
        metadata={"help": "Reward model for the win rate against the parent: latest, a run, a folder, or none."},
    )
    lr: float = 1e-4
    warmup_steps: int = 10
    epochs: float = 1.0


@dataclass
class PpoConfig(PolicyConfig):
    """PPO of a causal LM against a reward model or a reward function (or GRPO-style group advantages)."""

    reward_model: str = field(
        default="latest",
        metadata={"help": "Reward model: 'latest' reward run, a run, or a sequence-classification folder or Hub id."},
    )
    reward_fn: str | None = field(
        default=None,
        metadata={"help": "module:function taking (prompts, responses) and returning floats; replaces the model."},
    )
    value_model: str = field(
        default="auto",
        metadata={
            "help": "Critic: reward (initialised from the reward model), policy (the policy's weights with a new "
            "score head), head (a value head on the policy itself), or auto (reward if there is one, else policy)."
        },
    )
    advantage: str = field(
        default="gae",
        metadata={"help": "gae (PPO with a critic) or group (GRPO-style, relative to the prompt's other samples)."},
    )
    num_generations: int = field(default=1, metadata={"help": "Responses per prompt (at least 2 for group)."})
    # rollouts
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature, also applied to log-probs."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k likeliest tokens only (0: all)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0: off)."})
    missing_eos_penalty: float = field(
        default=1.0, metadata={"help": "Subtracted from the score of a response that never ends."}
    )
    center_rewards: bool = field(
        default=True, metadata={"help": "Shift scores so their mean on the starting policy's answers is zero."}
    )
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})
    # PPO
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch of rollouts."})
    num_mini_batches: int = field(default=4, metadata={"help": "Optimizer steps per pass over the rollouts."})
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    value_lr: float = field(default=3e-4, metadata={"help": "Learning rate of the critic."})
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty against the reference."})
    target_kl: float | None = field(
        default=None, metadata={"help": "Adapt kl_coef toward this KL per response (adaptive KL controller)."}
    )
    kl_horizon: int = 10_000
    sample_every: int = field(default=10, metadata={"help": "Print (and save) a few rollouts every N steps."})
    # the fields every stage has, with PPO's defaults: batch_size counts prompts per process per PPO step
    batch_size: int = field(default=64, metadata={"help": "Prompts per process per PPO step."})
    lr: float = 3e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    epochs: float = field(default=1.0, metadata={"help": "Passes over the prompts (max_steps wins)."})
    eval_every: int = 0
    log_every: int = 1
    save_every: int = 50


STAGE_CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "sft": SftConfig,
    "reward": RewardConfig,
    "dpo": DpoConfig,
    "ppo": PpoConfig,
}


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, path = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise LLMTrainError("--config needs a path to a YAML recipe, e.g. --config recipes/configs/x.yaml")
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return path, rest


def _unknown_key_error(key: str, cls: type, where: str) -> LLMTrainError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return LLMTrainError(f"Unknown config key '{key}' in {where}.{hint} Valid keys: {', '.join(valid)}.")


def load_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML recipe and check every key is a field of `cls`."""
    path = Path(path)
    if not path.is_file():
        raise LLMTrainError(f"Config file {path} does not exist. Recipes live under recipes/configs/.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LLMTrainError(f"Config file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise LLMTrainError(f"Config file {path} must hold a mapping of key: value, not {type(values).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown_key_error(key, cls, str(path))
    return values


def config_from_dict(cls: type[C], values: dict[str, Any], where: str) -> C:
    """Build a `cls` from a mapping (e.g. one section of a pipeline recipe), rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown_key_error(key, cls, where)
    return cls(**values)


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """Build a `cls` from `--config FILE` (optional) and `--key value` overrides."""
    from transformers import HfArgumentParser  # deferred: keeps `llmtrain runs` fast

    config_path, argv = _split_config_flag(list(argv or []))
    parser = HfArgumentParser(cls)
    if config_path:
        parser.set_defaults(**load_yaml(config_path, cls))
    for arg in argv:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            if key not in {f.name for f in dataclasses.fields(cls)}:
                raise _unknown_key_error(key, cls, "the command line")
    config, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise LLMTrainError(f"Could not read these command-line arguments: {' '.join(remaining)}. Use --key value.")
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for the manifest and the trackers)."""
    return dataclasses.asdict(config)
