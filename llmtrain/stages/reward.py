"""Reward model: a sequence classifier with one score, trained on preference pairs (Bradley-Terry).

Read top to bottom: accelerator and run folder, the model (a causal LM run turned into a native
`AutoModelForSequenceClassification`; the score is read at the last real token), the pairs, the
loop, the end (pairwise accuracy, score distributions, save, register).
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import numpy as np
import torch

from llmtrain.config import RewardConfig, config_to_dict
from llmtrain.data.preferences import answer_example, collate_pairs, load_preference_pairs, tokenize_pairs
from llmtrain.data.schedule import batch_indices
from llmtrain.data.splits import train_and_eval_rows
from llmtrain.data.template import Unverifiable, chat_format
from llmtrain.distributed import full_state_dict, micro_step, process_share
from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.generate import stop_token_ids
from llmtrain.lora import add_lora, model_to_save
from llmtrain.losses import bradley_terry_loss
from llmtrain.optim import SCHEDULES, build_optimizer, lr_at
from llmtrain.registry import load_pretrained, parent_manifest, resolve_init
from llmtrain.run_dir import Run
from llmtrain.runtime import (
    end_run,
    install_signal_handlers,
    make_accelerator,
    print_main,
    progress_bar,
    restore_signal_handlers,
)
from llmtrain.tokenizer import load_tokenizer, save_tokenizer

PLOT_CURVES = {
    "Bradley-Terry loss": ["train_loss", "val_loss"],
    "pairwise accuracy": ["train_accuracy", "reward_accuracy"],
    "learning rate": ["lr"],
}


def run(cfg: RewardConfig) -> Path:
    """Train a reward model per `cfg`; returns the finished run directory."""
    if cfg.schedule not in SCHEDULES:
        raise LLMTrainError(f"Unknown schedule '{cfg.schedule}'. Choose one of: {', '.join(SCHEDULES)}.")
    accelerator = make_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    init = resolve_init(cfg.init, cfg.runs_dir, "sft")
    run = Run.open(cfg, "reward", parent_manifest(init).get("preset") or Path(init.spec).name, accelerator)

    # ---- model: one score per sequence, read at the answer's last token (its end of turn)
    tokenizer = load_tokenizer(init.path, cfg.chat_template)
    model = load_reward_model(init.path, tokenizer, init.spec, cfg.attn_implementation)
    pad_id = model.config.pad_token_id  # padding that no answer ends with (see reward_pad_id)
    # The tokenizer saved with the run pads the same way, so the pair reads scores where they were trained.
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    if cfg.lora:
        model = add_lora(model, cfg, "SEQ_CLS", accelerator)  # SEQ_CLS keeps the new score head trainable

    # ---- data
    train_pairs, eval_pairs = train_and_eval_rows(cfg, load_preference_pairs, "prefs_train.jsonl", "prefs_val.jsonl")
    prep = dict(num_proc=cfg.num_proc, cache_dir=cfg.cache_dir)
    with accelerator.main_process_first():  # the main process tokenizes and caches; the others then load the cache
        train, stats = tokenize_pairs(tokenizer, train_pairs, cfg.max_length, cfg.data, **prep)
        held_out, _ = tokenize_pairs(tokenizer, eval_pairs, cfg.max_length, f"{cfg.eval_data} (held out)", **prep)
    if not train:
        raise LLMTrainError(f"No preference pair of {cfg.data} fits in max_length={cfg.max_length}; raise it.")
    global_batch = cfg.batch_size * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / (global_batch * cfg.grad_accum)))

    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if cfg.compile:
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    step, train_time = 0, 0.0
    if run.resume_from is not None:
        state = run.load_checkpoint(accelerator)
        step, train_time = state["step"], state["train_time_s"]
        run.truncate_metrics(step)
        print_main(accelerator, f"Resuming {run.name} from step {step}.")
    run.start(
        config_to_dict(cfg),
        parent=init.run_name or init.path,
        preset=parent_manifest(init).get("preset"),
        model={"source": init.kind, "spec": init.spec, "lora": cfg.lora, "architecture": type(raw_model).__name__},
        data={"train": cfg.data, "eval": cfg.eval_data, **vars(stats), "eval_pairs": len(held_out)},
        world_size=world,
    )
    if cfg.tracker:
        accelerator.init_trackers(run.name, config=config_to_dict(cfg))
    print_main(
        accelerator,
        f"run {run.name}: reward model from {init.spec} on {len(train):,} pairs "
        f"({stats.truncated} truncated, {stats.dropped} dropped), {total_steps} steps",
    )

    # ---- the loop
    stop_signal = install_signal_handlers()
    progress = progress_bar(accelerator, total_steps, step, "reward")
    model.train()
    train_loss, stop = float("nan"), "max_steps"
    try:
        while step < total_steps:
            if cfg.max_time_s and train_time >= cfg.max_time_s:
                stop = "max_time_s"
                break
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = torch.zeros(3, device=device)  # loss, correct pairs, pairs
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(train), global_batch, cfg.seed, step * cfg.grad_accum + micro)[rank::world]
                batch = {k: v.to(device) for k, v in collate_pairs([train[i] for i in idx], pad_id).items()}
                batch.pop("labels")
                with micro_step(accelerator, model, last=micro == cfg.grad_accum - 1):
                    chosen, rejected = model(**batch).logits.squeeze(-1).float().chunk(2)
                    loss = bradley_terry_loss(chosen, rejected, cfg.margin)
                    accelerator.backward(loss / cfg.grad_accum)
                n = float(chosen.numel())
                sums += torch.stack(
                    [loss.detach() * n, (chosen > rejected).sum().float(), torch.tensor(n, device=device)]
                )
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            flags = torch.cat([sums, torch.tensor([float(stop_signal[0])], device=device)])
            flags = accelerator.reduce(flags, reduction="sum") if world > 1 else flags
            train_loss, train_acc, signalled = (flags[0] / flags[2]).item(), (flags[1] / flags[2]).item(), flags[3] > 0
            if not math.isfinite(train_loss):
                raise LLMTrainError(
                    f"The training loss became {train_loss} at step {step} (lr {lr:.3g}); the run "
                    f"stopped. The last good checkpoint is kept in {run.path}. Lower --lr."
                )
            train_time += time.perf_counter() - t0
            progress.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                run.log_metrics(step, {"train_loss": train_loss, "train_accuracy": train_acc, "lr": lr}, accelerator)
                progress.set_postfix(loss=f"{train_loss:.3f}", acc=f"{train_acc:.2f}", refresh=False)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run.log_metrics(
                    step,
                    evaluate_pairs(model, held_out, pad_id, cfg.batch_size, accelerator)[0],
                    accelerator,
                )
            state = {"train_time_s": train_time}
            run.checkpoint_after_step(
                accelerator, step, total_steps, state, cfg, (stop_signal[0] or signal.SIGTERM) if signalled else 0
            )
    except RunInterrupted:
        raise  # a checkpoint was saved: the run stays resumable
    except Exception:  # a user error or a crash: the run is marked failed, not left "running"
        run.update(status="failed")
        raise
    finally:
        progress.close()
        restore_signal_handlers()

    # ---- the end: pairwise accuracy on held-out pairs, score distributions, save, register
    final, scores = evaluate_pairs(model, held_out, pad_id, cfg.batch_size, accelerator)
    run.log_metrics(step, final, accelerator)
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        to_save = model_to_save(raw_model, cfg)
        to_save.save_pretrained(
            run.path, state_dict=None if to_save is not raw_model else state_dict, safe_serialization=True
        )
        save_tokenizer(tokenizer, run.path)
    metrics = {
        **final,
        "train_loss": train_loss,
        "steps": step,
        "train_time_s": round(train_time, 2),
        "stop_reason": stop,
        "chosen_score_mean": float(np.mean(scores["chosen"])),
        "rejected_score_mean": float(np.mean(scores["rejected"])),
    }
    run.update(status="finished", metrics=metrics)
    run.plot(PLOT_CURVES, {"held-out scores": scores})
    run.remove_checkpoints()
    end_run(accelerator)
    print_main(
        accelerator,
        f"\nFinished {run.name}: reward_accuracy {final['reward_accuracy']:.4f} on "
        f"{len(held_out)} held-out pairs, {train_time:.1f} s training. Saved to {run.path}",
    )
    return run.path


def load_reward_model(path: str, tokenizer, spec: str, attn_implementation: str = "auto"):
    """A native sequence classifier with one output; a causal LM checkpoint gets a fresh score head. Its score is
    read at the last token that is not padding, so padding uses `reward_pad_id` (which no answer ends with)."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = load_pretrained(AutoModelForSequenceClassification, path, attn_implementation, num_labels=1)
    except (OSError, ValueError) as e:
        raise LLMTrainError(f"Could not load '{spec}' as a sequence classifier: {str(e).splitlines()[0]}") from None
    pad = reward_pad_id(tokenizer)
    model.config.pad_token_id = pad
    return model


def reward_pad_id(tokenizer) -> int:
    """The padding id of reward batches. A sequence classifier reads its score at the last token that is not
    padding, and every answer ends with a stop token, so the padding must never be one: where pad == eos
    (Llama 3, SmolLM2) another special token (or id 0) pads instead."""
    stops = set(stop_token_ids(tokenizer))
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, *tokenizer.all_special_ids]
    return next(c for c in [*candidates, 0, 1, 2] if c is not None and c not in stops)


@torch.no_grad()
def evaluate_pairs(model, pairs, pad_id: int, batch_size: int, accelerator) -> tuple[dict[str, float], dict]:
    """Held-out Bradley-Terry loss and pairwise accuracy (chosen scored above rejected), plus the scores."""
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    chosen_all, rejected_all = [], []
    mine, own = process_share(len(pairs), accelerator)
    for i in range(0, len(mine), batch_size):
        chunk = [pairs[j] for j in mine[i : i + batch_size]]
        batch = {k: v.to(accelerator.device) for k, v in collate_pairs(chunk, pad_id).items()}
        batch.pop("labels")
        chosen, rejected = model(**batch).logits.squeeze(-1).float().chunk(2)
        chosen_all += chosen.tolist()
        rejected_all += rejected.tolist()
    chosen_all, rejected_all = chosen_all[:own], rejected_all[:own]
    if accelerator.num_processes > 1:
        chosen_all, rejected_all = gather_object(chosen_all), gather_object(rejected_all)
    if was_training:
        model.train()
    c, r = torch.tensor(chosen_all), torch.tensor(rejected_all)
    metrics = {"val_loss": bradley_terry_loss(c, r).item(), "reward_accuracy": (c > r).float().mean().item()}
    return metrics, {"chosen": chosen_all, "rejected": rejected_all}


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 64) -> list[float]:
    """The reward model's score of each conversation's final assistant answer, read at the answer's last token
    (its end-of-turn token), the same place reward training and PPO read it."""
    pad = reward_pad_id(tokenizer)
    scores: list[float] = []
    for i in range(0, len(conversations), batch_size):
        rows = [_answer_ids(tokenizer, c) for c in conversations[i : i + batch_size]]
        longest = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=model.device)
        mask = (torch.arange(longest)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).to(model.device)
        scores += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return scores


def _answer_ids(tokenizer, conversation: list[dict]) -> list[int]:
    try:
        return answer_example(tokenizer, conversation[:-1], conversation[-1:]).input_ids
    except Unverifiable:
        # A generated reply the template renders in a way that cannot be located: score it as it was generated,
        # the prompt, the reply's tokens and the end-of-turn token.
        fmt = chat_format(tokenizer)
        reply = tokenizer(conversation[-1]["content"], add_special_tokens=False)["input_ids"]
        return fmt.prompt_ids(conversation[:-1]) + list(reply) + [fmt.end_of_turn_id]
