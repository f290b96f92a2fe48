"""What the stages do the same way under every engine Accelerate offers (DDP, FSDP2, DeepSpeed ZeRO-2/3):
accumulate gradients, place frozen models, share evaluation across processes, gather weights to save.

With parameters sharded (FSDP2, ZeRO-3) every forward pass is collective: all processes must run the same
number of them, and a model can only run inside its engine. The helpers here keep that true.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch


def configure_deepspeed(ds_config: dict[str, Any], cfg: Any, world: int) -> None:
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
    """A model that is only evaluated (a reference, a reward model), placed for this run and run in its mixed
    precision (its outputs stay in that precision: callers take log-probs and scores in fp32). Under DeepSpeed
    ZeRO-3 it was loaded partitioned and can only run inside an engine of its own (sharded like the policy);
    other engines keep a whole copy on each process."""
    model.requires_grad_(False)
    if accelerator.state.deepspeed_plugin is not None:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    if accelerator.native_amp:
        from accelerate.utils import get_mixed_precision_context_manager

        # In the run's precision, as Accelerate runs the models it prepares: a reference scored in fp32 against a
        # policy in bf16 would differ from it before the first step (DPO's log-ratio was then not zero).
        model.forward = get_mixed_precision_context_manager(True, accelerator.autocast_handler)(model.forward)
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


def sum_across(accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that sums a tensor over all processes (the identity for one process)."""
    if accelerator.num_processes == 1:
        return lambda t: t
    return lambda t: accelerator.reduce(t.clone(), reduction="sum")


def process_share(n: int, accelerator) -> tuple[list[int], int]:
    """This process's share of n items for evaluation, (indices, own): items rank, rank + world, ..., padded
    with repeats so that every process gets the same number. With sharded parameters (FSDP, ZeRO-3) each
    forward pass is collective, and a process with one batch fewer would leave the others waiting forever.
    Only the first `own` indices are this process's; results for the rest are to be dropped."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, n, world))
    per_process = -(-n // world)
    return mine + [mine[0] if mine else 0] * (per_process - len(mine)), len(mine)


def params_sharded(model) -> bool:
    """True when the model's parameters are split across processes (FSDP, DeepSpeed ZeRO-3): each forward pass
    is then collective, so every process must keep stepping until all have finished (`synced_gpus`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() or any(isinstance(m, FSDPModule) for m in model.modules())
