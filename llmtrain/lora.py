"""LoRA adapters through PEFT, configured the same way in every stage."""

from __future__ import annotations

from typing import Any


def add_lora(model, cfg: Any, task_type: str, accelerator):
    """Wrap `model` with LoRA adapters from the stage config's lora_* fields; only the adapters (and, for
    a sequence classifier, the score head) train."""
    from peft import LoraConfig, get_peft_model

    from llmtrain.distributed import shards_parameters
    from llmtrain.errors import LLMTrainError

    if shards_parameters(accelerator):
        raise LLMTrainError(
            "--lora is not supported with FSDP or DeepSpeed ZeRO-3: the adapter-disabled reference and the merge "
            "at the end need the whole weights on each process. LoRA keeps the trained state small, so launch it "
            "with launch/ddp.yaml or launch/deepspeed-zero2.yaml, or train without --lora under sharding."
        )

    targets = cfg.lora_target_modules
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type=task_type,
    )
    return get_peft_model(model, config)


def model_to_save(raw_model, cfg: Any):
    """What goes into the run folder: the merged model by default, or the PEFT model (adapter only)."""
    if not cfg.lora:
        return raw_model
    return raw_model.merge_and_unload() if cfg.merge_lora else raw_model
