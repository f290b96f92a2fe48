"""What every stage sets up the same way: the Accelerator, experiment trackers, the cache folder, batches on the
device."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import MIXED_PRECISIONS
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
        if requested not in MIXED_PRECISIONS:
            raise LLMTrainError(f"--mixed_precision {requested}: choose one of {', '.join(MIXED_PRECISIONS)}.")
        return requested
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not forced_cpu and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def cpu_threads(requested: int | None, env: Mapping[str, str], cores: int, local_processes: int) -> int:
    """Threads per process on a CPU: `requested` (--threads) if set, else $OMP_NUM_THREADS if the user set it,
    else this machine's `cores` shared among its `local_processes`.

    `accelerate launch` (and torchrun) set OMP_NUM_THREADS=1 in every process they start unless told otherwise,
    which leaves cores idle (a third of the speed on 2 cores); in a launched process 1 is therefore taken for
    unset and the cores are shared. Any other value there came from the user (or the launcher's own count of
    cores per process) and is kept; --threads 1 forces one thread.
    """
    if requested is not None:
        return requested
    launched = "LOCAL_RANK" in env or "ACCELERATE_DYNAMO_BACKEND" in env  # the latter: set by every accelerate launch
    try:
        omp = int(env.get("OMP_NUM_THREADS", "").split(",")[0])  # "4,2" sets nested levels; the first is ours
    except ValueError:
        omp = 0
    if omp >= 1 and not (launched and omp == 1):
        return omp
    return max(1, cores // max(1, local_processes))


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
    mixed_precision = resolve_mixed_precision(getattr(cfg, "mixed_precision", "auto"))
    _forget_other_precision(mixed_precision)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
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
        from llmtrain.distributed import configure_deepspeed

        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    if accelerator.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cpu_threads(getattr(cfg, "threads", None), os.environ, cores, local_processes))
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def _forget_other_precision(mixed_precision: str) -> None:
    """Accelerate keeps one state per process and refuses an Accelerator of another precision ("restart your
    runtime"), but stages run one after another in one process (the pipeline, a notebook) may each ask for their
    own: the state of an earlier stage's precision is dropped (the process group, kept apart, stays)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", mixed_precision) != mixed_precision and (
        state.get("distributed_type") != DistributedType.DEEPSPEED
    ):
        AcceleratorState._reset_state()


def cache_dir(configured: str | None = None) -> Path:
    """Where token shards and trained tokenizers are cached: the given folder, $LLMTRAIN_CACHE or ~/.cache/llmtrain."""
    path = Path(configured or os.environ.get("LLMTRAIN_CACHE") or Path.home() / ".cache" / "llmtrain")
    path.mkdir(parents=True, exist_ok=True)
    return path


# Variables that `accelerate launch` sets for the processes it starts: ACCELERATE_USE_CPU by its one-process
# launcher, TORCHELASTIC_RUN_ID by torchrun, which its multi-process launcher runs.
LAUNCHER_VARIABLES = ("ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID")


def stop_with_the_launcher(env: Mapping[str, str] = os.environ) -> bool:
    """Under `accelerate launch`, have the kernel send this process SIGTERM when its launcher dies (Linux).

    A scheduler or container runtime that signals only the main process ends the launcher: its one-process form
    forwards nothing and dies at once, leaving training to run on with no checkpoint. With this the stage gets the
    signal too, checkpoints and stops. (torchrun, for several processes, forwards the signal itself and waits 30 s
    before it kills them; this also covers a launcher killed outright.) Returns whether it was set up."""
    import sys

    if not sys.platform.startswith("linux") or not any(name in env for name in LAUNCHER_VARIABLES):
        return False
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # from <linux/prctl.h>
    return ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) == 0


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with that id runs (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def to_device(data: torch.Tensor | dict[str, torch.Tensor], device: torch.device):
    """A tensor, or a batch's tensors, on `device`. To a GPU they go from pinned memory without waiting: a plain
    copy would first wait for every kernel already queued, a stall at each step."""
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    return data.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else data.to(device)
