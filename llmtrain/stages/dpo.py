"""DPO: tune a causal LM on preference pairs against a frozen reference, its SFT parent.

Read top to bottom: accelerator and run folder, the policy (and LoRA), the pairs, the reference
(a frozen copy, the adapter-disabled base with --lora, or log-probs computed once with
--precompute_ref), the parent's scores, the loop, the end (held-out preference metrics, task
accuracy, win rate against the parent judged by a reward model, save, register).

The loop is the project's own rather than TRL's DPOTrainer so that DPO shares the run folder,
resume, signal and multi-process rules of every other stage; the loss is `losses.dpo_loss`.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch

from llmtrain.config import DpoConfig, config_to_dict
from llmtrain.data.preferences import collate_pairs, load_preference_pairs, sequence_logprobs, tokenize_pairs
from llmtrain.data.schedule import batch_indices
from llmtrain.data.splits import train_and_eval_rows
from llmtrain.distributed import full_state_dict, micro_step, prepare_frozen, process_share
from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.evaluate import distributed_replies, resolve_checker, win_rate
from llmtrain.flops import parameter_count
from llmtrain.lora import add_lora
from llmtrain.losses import DPO_LOSS_TYPES, dpo_loss
from llmtrain.optim import SCHEDULES, build_optimizer, lr_at
from llmtrain.registry import load_causal_lm, parent_manifest, resolve_init, resolve_judge
from llmtrain.run_dir import Run
from llmtrain.runtime import (
    end_run,
    install_signal_handlers,
    make_accelerator,
    print_main,
    progress_bar,
    restore_signal_handlers,
)
from llmtrain.stages.sft import save_policy
from llmtrain.tokenizer import load_tokenizer

PLOT_CURVES = {
    "DPO loss": ["train_loss", "val_loss"],
    "implicit rewards": ["chosen_reward", "rejected_reward", "margin"],
    "preference accuracy": ["accuracy", "val_accuracy"],
    "task accuracy": ["task_accuracy"],
}


def run(cfg: DpoConfig) -> Path:
    """Tune per `cfg`; returns the finished run directory."""
    _check_config(cfg)
    accelerator = make_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    init = resolve_init(cfg.init, cfg.runs_dir, "sft")
    run = Run.open(cfg, "dpo", parent_manifest(init).get("preset") or Path(init.spec).name, accelerator)
    judge = resolve_judge(cfg.judge, cfg.runs_dir)

    # ---- the policy (and LoRA)
    tokenizer = load_tokenizer(init.path, cfg.chat_template)
    model = load_causal_lm(init, cfg.runs_dir, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    if cfg.lora:
        model = add_lora(model, cfg, "CAUSAL_LM", accelerator)

    # ---- the pairs
    train_pairs, eval_pairs = train_and_eval_rows(cfg, load_preference_pairs, "prefs_train.jsonl", "prefs_val.jsonl")
    prep = dict(num_proc=cfg.num_proc, cache_dir=cfg.cache_dir)
    with accelerator.main_process_first():  # the main process tokenizes and caches; the others then load the cache
        train, stats = tokenize_pairs(tokenizer, train_pairs, cfg.max_length, cfg.data, **prep)
        held_out, _ = tokenize_pairs(tokenizer, eval_pairs, cfg.max_length, f"{cfg.eval_data} (held out)", **prep)
    if not train:
        raise LLMTrainError(f"No preference pair of {cfg.data} fits in max_length={cfg.max_length}; raise it.")
    global_batch = cfg.batch_size * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / (global_batch * cfg.grad_accum)))
    eval_prompts = [p.prompt for p in eval_pairs if len(p.prompt) == 1][: cfg.task_eval_rows]
    checker = resolve_checker(cfg.task, [p[0]["content"] for p in eval_prompts])

    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    if cfg.compile:
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    step, train_time, parent = 0, 0.0, {}
    if run.resume_from is not None:
        state = run.load_checkpoint(accelerator)
        step, train_time, parent = state["step"], state["train_time_s"], state["parent"]
        run.truncate_metrics(step)
        print_main(accelerator, f"Resuming {run.name} from step {step}.")

    # ---- the reference. Before the first step the policy IS the reference, so scores computed then need
    # no second model; a frozen copy is loaded only when the loop needs one (or to re-score on resume).
    ref_model = None
    if not cfg.lora and (not cfg.precompute_ref or step > 0):
        ref_model = prepare_frozen(
            load_causal_lm(init, cfg.runs_dir, attn_implementation=cfg.attn_implementation), accelerator
        )

    def reference(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            if cfg.lora:
                with raw_model.disable_adapter():
                    return _logprobs(raw_model, batch)
            return _logprobs(ref_model if ref_model is not None else raw_model, batch)

    pad_id = tokenizer.pad_token_id
    t_ref = time.perf_counter()
    eval_ref = score_pairs(reference, held_out, pad_id, cfg.batch_size, accelerator)
    train_ref = score_pairs(reference, train, pad_id, cfg.batch_size, accelerator) if cfg.precompute_ref else None
    reference_pass_s = time.perf_counter() - t_ref
    if cfg.precompute_ref and ref_model is not None:
        ref_model = None  # only needed to re-score after a resume

    if step == 0:  # the parent's answers: its task accuracy, and the replies the win rate compares against
        parent = _answers(raw_model, tokenizer, eval_prompts, checker, cfg, accelerator)
    run.start(
        config_to_dict(cfg),
        parent=init.run_name or init.path,
        preset=parent_manifest(init).get("preset"),
        model={
            "source": init.kind,
            "spec": init.spec,
            "lora": cfg.lora,
            "trainable_parameters": parameter_count(model, trainable_only=True),
            "reference": "adapter-disabled base" if cfg.lora else "precomputed" if cfg.precompute_ref else "copy",
            "judge": judge.spec if judge else None,
        },
        data={"train": cfg.data, "eval": cfg.eval_data, **vars(stats), "eval_pairs": len(held_out)},
        reference_pass_s=round(reference_pass_s, 2),
        parent_metrics={k: v for k, v in parent.items() if k != "replies"},
        world_size=world,
    )
    if cfg.tracker:
        accelerator.init_trackers(run.name, config=config_to_dict(cfg))
    print_main(
        accelerator,
        f"run {run.name}: DPO ({cfg.loss_type}, beta {cfg.beta}) of {init.spec} on {len(train):,} pairs "
        f"({stats.truncated} truncated, {stats.dropped} dropped), {total_steps} steps"
        + (f"; parent task_accuracy {parent['task_accuracy']:.4f}" if "task_accuracy" in parent else ""),
    )

    # ---- the loop
    stop_signal = install_signal_handlers()
    progress = progress_bar(accelerator, total_steps, step, "dpo")
    model.train()
    train_loss, stop = float("nan"), "max_steps"
    window = {"steps": 0, "time": 0.0}
    try:
        while step < total_steps:
            if cfg.max_time_s and train_time >= cfg.max_time_s:
                stop = "max_time_s"
                break
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = torch.zeros(6, device=device)  # loss, chosen reward, rejected reward, correct, nll, pairs
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(train), global_batch, cfg.seed, step * cfg.grad_accum + micro)[rank::world]
                batch = {k: v.to(device) for k, v in collate_pairs([train[i] for i in idx], pad_id).items()}
                ref = train_ref[idx].to(device).T.flatten() if train_ref is not None else reference(batch)
                with micro_step(accelerator, model, last=micro == cfg.grad_accum - 1):
                    policy, n_tokens = _logprobs(model, batch, with_counts=True)
                    out, nll = _loss(policy, ref, n_tokens, cfg)
                    accelerator.backward((out.loss + cfg.nll_weight * nll) / cfg.grad_accum)
                n = float(len(idx))
                sums += torch.stack(
                    [
                        out.loss.detach() * n,
                        out.chosen_rewards.sum(),
                        out.rejected_rewards.sum(),
                        (out.chosen_rewards > out.rejected_rewards).sum().float(),
                        nll.detach() * n,
                        torch.tensor(n, device=device),
                    ]
                )
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            flags = torch.cat([sums, torch.tensor([float(stop_signal[0])], device=device)])
            flags = accelerator.reduce(flags, reduction="sum") if world > 1 else flags
            loss_sum, chosen, rejected, correct, nll_sum, pairs, signalled = flags.tolist()
            train_loss = loss_sum / pairs
            if not math.isfinite(train_loss):
                raise LLMTrainError(
                    f"The DPO loss became {train_loss} at step {step} (lr {lr:.3g}); the run stopped. "
                    f"The last good checkpoint is kept in {run.path}. Lower --lr (or raise --nll_weight)."
                )
            dt = time.perf_counter() - t0
            train_time += dt
            window = {"steps": window["steps"] + 1, "time": window["time"] + dt}
            progress.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                metrics = {
                    "train_loss": train_loss,
                    "chosen_reward": chosen / pairs,
                    "rejected_reward": rejected / pairs,
                    "margin": (chosen - rejected) / pairs,
                    "accuracy": correct / pairs,
                    "nll": nll_sum / pairs,
                    "lr": lr,
                    "ms_per_step": 1000 * window["time"] / window["steps"],
                }
                window = {"steps": 0, "time": 0.0}
                run.log_metrics(step, metrics, accelerator)
                progress.set_postfix(loss=f"{train_loss:.3f}", margin=f"{metrics['margin']:.2f}", refresh=False)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run.log_metrics(step, _preference_metrics(raw_model, held_out, eval_ref, cfg, pad_id, accelerator))
            state = {"train_time_s": train_time, "parent": parent}
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

    # ---- the end: held-out preference metrics, task accuracy, win rate, save, register
    # Evaluation runs on the unwrapped model: each rank scores its own share, with no DDP hooks in between.
    final = _preference_metrics(raw_model, held_out, eval_ref, cfg, pad_id, accelerator)
    answers = _answers(raw_model, tokenizer, eval_prompts, checker, cfg, accelerator, show=True)
    final |= {k: v for k, v in answers.items() if k != "replies"}
    if judge is not None and eval_prompts:
        final["win_rate"] = win_rate(judge, eval_prompts, answers["replies"], parent["replies"], accelerator)
    run.log_metrics(step, final, accelerator)
    accelerator.wait_for_everyone()
    save_policy(raw_model, full_state_dict(accelerator, model), tokenizer, run, cfg, accelerator)
    metrics = {**final, "train_loss": train_loss, "steps": step, "train_time_s": round(train_time, 2)}
    metrics |= {"stop_reason": stop} | {f"parent_{k}": v for k, v in parent.items() if k != "replies"}
    run.update(status="finished", metrics=metrics)
    run.plot(PLOT_CURVES)
    run.remove_checkpoints()
    end_run(accelerator)
    summary = [f"held-out preference accuracy {final['val_accuracy']:.3f}"]
    if "task_accuracy" in final:
        summary.append(f"task_accuracy {parent['task_accuracy']:.4f} -> {final['task_accuracy']:.4f}")
    if "win_rate" in final:
        summary.append(f"win rate vs parent {final['win_rate']:.3f}")
    print_main(
        accelerator, f"\nFinished {run.name}: {', '.join(summary)}; {train_time:.1f} s training. Saved to {run.path}"
    )
    return run.path


# ---------------------------------------------------------------- helpers


def _check_config(cfg: DpoConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise LLMTrainError(f"Unknown schedule '{cfg.schedule}'. Choose one of: {', '.join(SCHEDULES)}.")
    if cfg.loss_type not in DPO_LOSS_TYPES:
        raise LLMTrainError(f"--loss_type {cfg.loss_type}: choose one of {', '.join(DPO_LOSS_TYPES)}.")
    if cfg.beta <= 0:
        raise LLMTrainError(f"--beta must be positive, got {cfg.beta}.")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise LLMTrainError(f"--label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}.")
    for name in ("batch_size", "grad_accum", "max_length"):
        if getattr(cfg, name) < 1:
            raise LLMTrainError(f"{name} must be at least 1, got {getattr(cfg, name)}.")


def _logprobs(model, batch: dict, with_counts: bool = False):
    """Summed answer log-probs of each row of a [2B, L] pair batch (chosen rows first), and answer lengths."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = sequence_logprobs(logits, labels)
    return (logps, (labels[:, 1:] != -100).sum(-1)) if with_counts else logps


def _loss(policy: torch.Tensor, ref: torch.Tensor, n_tokens: torch.Tensor, cfg: DpoConfig):
    """The DPO loss of a [2B] batch (chosen first) and the per-token NLL of the chosen answers (RPO's term)."""
    b = policy.shape[0] // 2
    out = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], cfg.beta, cfg.loss_type, cfg.label_smoothing)
    nll = -(policy[:b] / n_tokens[:b].clamp(min=1)).mean()
    return out, nll


@torch.no_grad()
def score_pairs(logprobs_of, pairs, pad_id: int, batch_size: int, accelerator) -> torch.Tensor:
    """[N, 2] summed answer log-probs (chosen, rejected) of every pair, split across processes and gathered."""
    from accelerate.utils import gather_object

    mine, own = process_share(len(pairs), accelerator)
    rows: list[tuple[int, float, float]] = []
    for i in range(0, len(mine), batch_size):
        idx = mine[i : i + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate_pairs([pairs[j] for j in idx], pad_id).items()}
        chosen, rejected = logprobs_of(batch).float().cpu().chunk(2)
        rows += list(zip(idx, chosen.tolist(), rejected.tolist()))
    rows = rows[:own]
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    table = torch.zeros(len(pairs), 2)
    for j, c, r in rows:
        table[j] = torch.tensor([c, r])
    return table


@torch.no_grad()
def _preference_metrics(model, pairs, ref: torch.Tensor, cfg: DpoConfig, pad_id: int, accelerator) -> dict:
    """Held-out DPO loss, implicit-reward accuracy and margin against the reference."""
    was_training = model.training
    model.eval()
    policy = score_pairs(lambda b: _logprobs(model, b), pairs, pad_id, cfg.batch_size, accelerator)
    if was_training:
        model.train()
    out = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], cfg.beta, cfg.loss_type, cfg.label_smoothing)
    return {"val_loss": out.loss.item(), "val_accuracy": out.accuracy.item(), "val_margin": out.margin.item()}


def _answers(model, tokenizer, prompts: list[list[dict]], checker, cfg: DpoConfig, accelerator, show=False) -> dict:
    """Greedy replies to the held-out prompts (split across processes, gathered in order) and their task accuracy."""
    answers: dict = {"replies": distributed_replies(model, tokenizer, prompts, cfg.max_new_tokens, accelerator)}
    if checker is not None and prompts:
        ok = [bool(checker(p[0]["content"], r)) for p, r in zip(prompts, answers["replies"])]
        answers["task_accuracy"] = sum(ok) / len(ok)
        if show and accelerator.is_main_process:
            print("samples (held-out prompts, greedy):")
            for p, r, good in list(zip(prompts, answers["replies"], ok))[: cfg.num_samples]:
                print(f"  {p[0]['content']!r} -> {r!r} {'correct' if good else 'wrong'}")
    return answers
