"""What every stage sets up the same way: the Accelerator, experiment trackers, the cache folder."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from llmtrain.errors import LLMTrainError

# Tracker name -> the pip package that provides it.
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "mlflow": "mlflow",
    "trackio": "trackio",
}


def resolve_mixed_precision(requested: str) -> str:
    """'auto' means bf16 on a GPU that supports it and full fp32 otherwise (bf16 is slower on CPUs)."""
    if requested != "auto":
        if requested not in ("no", "bf16", "fp16"):
            raise LLMTrainError(f"mixed_precision must be auto, no, bf16 or fp16, not '{requested}'.")
        return requested
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not forced_cpu and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def check_tracker(name: str | None) -> None:
    """Fail early, naming the package to install, when the chosen tracker is not available."""
    if name is None:
        return
    from accelerate.tracking import get_available_trackers

    if name not in TRACKERS:
        raise LLMTrainError(f"Unknown tracker '{name}'. Choose one of: {', '.join(TRACKERS)}.")
    if name not in [str(t) for t in get_available_trackers()]:
        raise LLMTrainError(
            f"--tracker {name} needs the '{TRACKERS[name]}' package, which is not installed: "
            f"pip install {TRACKERS[name]}"
        )


def make_accelerator(cfg: Any):
    """An Accelerator for this stage: mixed precision resolved, trackers checked, run folder as project dir."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    check_tracker(cfg.tracker)
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_group = launched_world > 1 and not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(getattr(cfg, "mixed_precision", "auto")),
        log_with=cfg.tracker,
        project_dir=cfg.runs_dir,
        # Without a GPU, Accelerate only forms a (gloo) process group when told to use the CPU; otherwise
        # every launched process would train alone and write the same run folder. `cpu=True` would also drop
        # a DeepSpeed launch to plain DDP, so DeepSpeed on CPUs gets its gloo group named instead.
        cpu=cpu_group and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu_group and deepspeed else None,
    )
    if accelerator.num_processes != launched_world:
        raise LLMTrainError(
            f"The launcher started {launched_world} processes but Accelerate formed a group of "
            f"{accelerator.num_processes}; check the launch configuration (see `accelerate env`)."
        )
    if accelerator.state.deepspeed_plugin is not None:
        _configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1 for CPU processes, which leaves cores idle (a third of
        # the speed on 2 cores); share this machine's cores among its processes instead.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // local_processes))
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def _configure_deepspeed(ds_config: dict[str, Any], cfg: Any, world: int) -> None:
    """The stage's config decides batch size, accumulation and clipping; the DeepSpeed engine must agree.
    The stages prepare no DataLoader, so DeepSpeed cannot infer its micro-batch; they accumulate gradients
    themselves, telling the engine at each micro-step whether it is the last (see `micro_step`), so the
    engine takes one micro-batch per backward and scales nothing; it clips, so it clips by `grad_clip`."""
    batch = getattr(cfg, "batch_size", 1)
    ds_config["train_micro_batch_size_per_gpu"] = batch
    ds_config["gradient_accumulation_steps"] = 1
    ds_config["train_batch_size"] = batch * world
    ds_config["gradient_clipping"] = float(getattr(cfg, "grad_clip", 0.0) or 0.0)


@contextmanager
def micro_step(accelerator, model, last: bool):
    """One micro-step of gradient accumulation: gradients stay on this process until the last micro-step of
    the optimizer step, which all-reduces them. Under DeepSpeed the engine steps the optimizer inside
    `backward` at an accumulation boundary, so each micro-step tells it whether it is the last."""
    accelerator.gradient_state._set_sync_gradients(last)
    with nullcontext() if last else accelerator.no_sync(model):
        yield


def prepare_frozen(model, accelerator):
    """A model that is only evaluated (a reference, a reward model), placed for this run. Under DeepSpeed
    ZeRO-3 it was loaded partitioned and can only run inside an engine of its own (sharded like the policy);
    other engines keep a whole copy on each process."""
    model.requires_grad_(False)
    if accelerator.state.deepspeed_plugin is not None:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    return model.to(accelerator.device).eval()


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor] | None:
    """The whole model's weights for saving (gathered from FSDP / ZeRO-3 shards; None off the main process
    where the engine gathers to it alone), without the second name of a tied weight: DeepSpeed returns
    copies, and a copied tied weight would be saved twice."""
    state_dict = accelerator.get_state_dict(model)
    if not state_dict:
        return state_dict
    seen, duplicates = set(), set()
    for name, param in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.add(name)
        seen.add(id(param))
    return {k: v for k, v in state_dict.items() if k not in duplicates}


@contextmanager
def root_gathered(model):
    """For calling a submodule of an FSDP2-sharded model directly (PPO generates with the policy inside its
    actor-critic): the decoder layers are units that gather their own parameters, but the root unit's
    (embeddings, final norm, heads) are gathered only by the root's forward, so gather them around the call."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def shards_parameters(accelerator) -> bool:
    """Whether this run splits the model's parameters across processes (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)


def process_share(n: int, accelerator) -> tuple[list[int], int]:
    """This process's share of n items for evaluation, (indices, own): items rank, rank + world, ..., padded
    with repeats so that every process gets the same number. With sharded parameters (FSDP, ZeRO-3) each
    forward pass is collective, and a process with one batch fewer would leave the others waiting forever.
    Only the first `own` indices are this process's; results for the rest are to be dropped."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, n, world))
    per_process = -(-n // world)
    return mine + [mine[0] if mine else 0] * (per_process - len(mine)), len(mine)


def cache_dir(configured: str | None = None) -> Path:
    """Where token shards and trained tokenizers are cached: the given folder, $LLMTRAIN_CACHE or ~/.cache/llmtrain."""
    path = Path(configured or os.environ.get("LLMTRAIN_CACHE") or Path.home() / ".cache" / "llmtrain")
    path.mkdir(parents=True, exist_ok=True)
    return path


def print_main(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, flush=True)


_previous_handlers: dict[int, Any] = {}


def install_signal_handlers() -> list[int]:
    """SIGTERM/SIGINT set a flag (the returned one-item list) that a loop checks after each step,
    to checkpoint and exit cleanly instead of dying mid-step."""
    received = [0]

    def handler(signum, frame):
        received[0] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            _previous_handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a notebook worker): signals keep their default
            pass
    return received


def restore_signal_handlers() -> None:
    for sig, old in _previous_handlers.items():
        signal.signal(sig, old)
    _previous_handlers.clear()


def progress_bar(accelerator, total: int, initial: int, desc: str):
    """A step progress bar on the main process only."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    )


def end_run(accelerator) -> None:
    """The end of a stage on every process: finish the trackers once all processes are here, and leave the
    process group up. Accelerate's end_training() destroys it while the stage still holds the DDP-wrapped
    model; freeing that model afterwards can hang in the gloo group's destructor (seen in 2-process runs)."""
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
