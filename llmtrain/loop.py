"""The loop spine every stage shares: the bookkeeping around a training step, so a stage shows only its own.

A stage reads like this (the step in the middle is the stage's, everything else is here):

    accelerator, init, run = open_run(cfg, "sft", parent_stage="pretrain")    # the model to start from, the run
    model, optimizer, raw_model = prepare(accelerator, cfg, model)
    loop = Loop.begin(cfg, accelerator, run, model, optimizer, total_steps)   # resumes if the run has a checkpoint
    loop.start(summary, model={...}, data={...})                              # manifest, trackers, one summary line
    with loop.training():                                  # signals, progress bar; a crash marks the run failed
        for lr in loop.steps():                            # stops at max_steps or max_time_s; sets the lr
            ... batch, forward, loss, backward ...
            loop.optimizer_step()                          # clip, step, zero (NaN/inf gradients are counted)
            totals = loop.reduce(sums, tokens)             # added up on the device; None but on sync steps
            if totals is not None:                         # ONE collective and host read: sums, signal, NaN
                loop.log({"train_loss": ...})              # NaN stop, timing fields, metrics.jsonl
            if loop.due(cfg.eval_every): loop.evaluated(evaluate(val), evaluate(train_sample))  # best, early stop
            loop.checkpoint()                              # every save_every steps, and on a signal
        loop.evaluated(final := evaluate(val), ...)        # the last step is checkpointed: a signal here resumes
        if loop.restore_best(): final = evaluate(val)      # --keep_best: the best evaluation's weights
        ... save, then the test set, once, for the result and the parent ...
        loop.finish(final, PLOT_CURVES, "message", test=..., parent_test=...)  # manifest, fit, plot, checkpoints

No step waits for the device but a sync step: every `log_every` steps, each checkpoint step, the last step, and
with a time budget the steps where it might run out. There the stage's sums, its tokens, the signal flag and the
count of non-finite gradients are summed over all processes and read; so a NaN stops the run, and a SIGTERM saves a
checkpoint, at the next sync step (at most `log_every` steps later), always before anything is saved. Each logged
line holds the averages of the stage's sums over the steps since the line before (a value passed to `log` as it
is, like the gradient norm, is the step's own); `log_every` 1 syncs and logs every step, and so does PPO, whose
rollouts are read on the host anyway. `skip_nonfinite_steps` reads the gradient norm at every step.

Batches stay a pure function of (seed, step), so resume, accumulation and extra processes give the same curve.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import config_to_dict
from llmtrain.distributed import full_state_dict
from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.fit import diagnose, improved, metric_on_test, trainset_name
from llmtrain.flops import parameter_count, peak_flops
from llmtrain.models import use_gradient_checkpointing
from llmtrain.optim import build_optimizer, lr_at
from llmtrain.registry import ModelSource, parent_manifest, resolve_init
from llmtrain.run_dir import BEST, TEST_ITEMS, Run, describe_changes
from llmtrain.runtime import make_accelerator

# Logged values that stop the run when they are not finite, and what to try then, per stage. Each option named
# applies from the step a run resumes at (see run_dir.resume_changes), so the advice holds for a resume too.
WATCHED = ("train_loss", "policy_loss", "value_loss", "reward_mean")
NAN_ADVICE = {
    "pretrain": "Lower --lr, raise --warmup_steps or set --grad_clip.",
    "dpo": "Lower --lr (or raise --nll_weight).",
    "ppo": "Lower --lr and --value_lr, or check the reward for NaN or huge values.",
}


def open_run(cfg: Any, stage: str, parent_stage: str) -> tuple[Any, ModelSource, Run]:
    """A fine-tuning stage's accelerator, the model it starts from (`cfg.init`: 'latest' is the newest finished
    `parent_stage` run) and its run folder."""
    accelerator = make_accelerator(cfg)
    init = resolve_init(cfg.init, cfg.runs_dir, parent_stage)
    run = Run.open(cfg, stage, parent_manifest(init).get("preset") or Path(init.spec).name, accelerator)
    run.pin_parent("init", cfg.init, init.path)
    return accelerator, init, run


def prepare(accelerator, cfg: Any, model, groups: list[dict] | None = None):
    """AdamW over the model (or the param groups given), gradient checkpointing and compile if asked, and
    Accelerate's wrapping. Returns (model, optimizer, raw_model): raw_model is the bare model, for config, sampling
    and saving."""
    optimizer = build_optimizer(groups or model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), accelerator.device)
    if cfg.gradient_checkpointing:
        use_gradient_checkpointing(model, accelerator)
    if cfg.compile:
        model.compile()  # in place: state_dict keys stay those of the HF model, so checkpoints load anywhere
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, accelerator.unwrap_model(model)


@dataclass
class Loop:
    """One stage's training loop: step count, time, the stage's own resumable state, and the run it writes."""

    cfg: Any
    accelerator: Any
    run: Run
    model: Any
    optimizer: Any
    total_steps: int
    step: int = 0
    train_time: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)  # saved with each checkpoint, restored on resume
    stop_reason: str = "max_steps"
    last: dict[str, float] = field(default_factory=dict)  # the last sync step's metrics
    flops_per_token: float = 0.0  # set by a stage that knows its model's FLOPs: the log then has MFU
    peak_flops: float | None = None  # of this device, when known
    sync_every_step: bool = False  # set by a stage that reads its results on the host every step anyway (PPO)
    # The validation metric a stage is judged by (its fit, and early stopping when --keep_best names none), and
    # what the fit diagnosis also reads: a measure the stage does not optimize, and the KL bound (PPO).
    metric: str = "val_loss"
    # --keep_best as it applies ("auto", a stage's default, is resolved by the stage: None until it does).
    keep_best: str | None = None
    reward: str | None = None  # the optimized reward as validation measures it, when it is not `metric` (DPO)
    guards: tuple[str, ...] = ()
    guard_rows: int = 0
    kl_bound: float | None = None
    _t0: float = 0.0
    _signal: list[int] = field(default_factory=lambda: [0])
    _signalled: bool = False
    _stopped: bool = False
    _steps_saved: bool = False  # the steps are over and checkpointed: a signal then stops the run at once
    _progress: Any = None
    # Added up on the device between sync steps: the stage's sums and tokens since the last logged line, and the
    # optimizer steps with non-finite gradients since the last sync.
    _sums: torch.Tensor | None = None
    _tokens: float | torch.Tensor = 0.0
    _nonfinite: float | torch.Tensor = 0.0
    _synced: tuple[int, float] = (0, 0.0)  # the last sync step, and the main process's training time then
    _time_check_at: int = 0  # with a time budget: the next step that syncs to see whether it is spent
    _checked: str = ""  # the steps a sync step checked, for messages: "at step 5" or "in steps 3-4"
    _window: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("steps", "time", "tokens", "data"), 0.0))

    @classmethod
    def begin(cls, cfg: Any, accelerator, run: Run, model, optimizer, total_steps: int) -> Loop:
        """A loop at step 0, or at the run's last checkpoint (model, optimizer, RNG and the stage's state)."""
        loop = cls(cfg, accelerator, run, model, optimizer, total_steps, peak_flops=peak_flops(accelerator.device))
        loop.keep_best = None if cfg.keep_best in ("auto", "none") else cfg.keep_best
        if run.resume_from is not None:
            # The optimizer's state comes back with its param groups, peak learning rates included; the peaks are
            # this run's (--lr, PPO's --value_lr), which a resume may change, so they are put back after loading.
            peaks = [group["base_lr"] for group in optimizer.param_groups]
            state = run.load_checkpoint(accelerator)
            for group, peak in zip(optimizer.param_groups, peaks):
                group["base_lr"] = peak
            loop.step, loop.train_time = state.pop("step"), state.pop("train_time_s")
            loop.state = state
            run.truncate_metrics(loop.step)
            loop._synced = (loop.step, loop.train_time)
            changed = describe_changes(run.resumed_changes)
            loop._print(
                f"Resuming {run.name} from step {loop.step} ({run.resume_from.name})."
                + (f" Changed since that checkpoint, from this step on: {changed}." if changed else "")
            )
        return loop

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def start(self, summary: str, init: ModelSource | None = None, **manifest: Any) -> None:
        """Write the manifest (status 'running', the mixed precision the run computes in), start the trackers, print
        the run's summary line. A stage that starts from a trained model (`init`) records it as the parent, with the
        parameters it trains."""
        if init is not None:
            model = {"source": init.kind, "spec": init.spec, "lora": self.cfg.lora}
            model["trainable_parameters"] = parameter_count(self.model, trainable_only=True)
            manifest = {
                "parent": init.label,
                "preset": parent_manifest(init).get("preset"),
                **manifest,
                "model": model | manifest.get("model", {}),
            }
        # The config keeps what was asked ('auto'); the manifest, what it resolved to (DeepSpeed's own, under it).
        precision = self.accelerator.mixed_precision
        self.run.start(config_to_dict(self.cfg), **manifest, world_size=self.world, mixed_precision=precision)
        if self.cfg.tracker:
            # A tracker that writes files (TensorBoard) writes into <logging dir>/<run name>: the run's own folder,
            # which for a replacement is .overwrite/NAME, never the run it replaces.
            self.accelerator.project_configuration.logging_dir = str(self.run.path.parent)
            self.accelerator.init_trackers(self.run.name, config=config_to_dict(self.cfg))
        self._print(f"run {self.run.name}: {summary}")
        if self.step == 0 and self.state.get("parent_metrics"):  # the parent's evaluation is the curve's first point
            self.evaluated(self.state["parent_metrics"], self.state.get("parent_trainset"))

    # ------------------------------------------------------------ the loop

    @contextmanager
    def training(self):
        """Around the steps and the end of the run (final evaluation, save, `finish`). During the steps SIGTERM and
        SIGINT only set a flag, which the next sync step's reduction shares, so that every process checkpoints after
        the same step. Once the steps are over and saved (`steps` checkpoints the last one), a signal stops the run
        at once: the final evaluation and save are redone on resume. A crash marks the run failed; an interruption
        leaves it resumable; either way the run's lock is released. Also a progress bar."""
        from tqdm.auto import tqdm

        received = self._signal = [0]

        def on_signal(signum, frame):
            received[0] = signum
            if self._steps_saved:
                raise RunInterrupted(self.run.name, str(self.run.path), self.step, signum)

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, on_signal)
            except ValueError:  # not the main thread (e.g. a notebook worker): signals keep their default
                pass
        main = self.accelerator.is_main_process
        self._progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.run.stage,
            unit="step",
            dynamic_ncols=True,
            disable=not main,
        )
        try:
            yield
        except RunInterrupted:
            if self.run.manifest.get("status") == "running":  # stopped after the steps: the last one is saved
                self.run.update(status="interrupted")
            self.run.release()
            raise  # a checkpoint was saved: the run stays resumable
        except Exception:  # a user error or a crash: the run is marked failed, not left "running"
            if self.run.manifest.get("status") != "finished":  # a finished run cut short in its swap stays so
                self.run.update(status="failed")
            self.run.release()
            raise
        finally:
            self._steps_saved = False
            self._progress.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def steps(self) -> Iterator[float]:
        """Each step's learning rate, set on every param group (scaled from its `base_lr`), until the step
        budget or the time budget (`max_time_s`, by the main process's clock at sync steps) is spent."""
        cfg = self.cfg
        while self.step < self.total_steps and not self._stopped:
            if self._time_spent():
                self.stop_reason = "max_time_s"
                break
            self._t0 = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(
                    self.step,
                    self.total_steps,
                    group["base_lr"],
                    cfg.warmup_steps,
                    cfg.schedule,
                    cfg.min_lr_ratio,
                    cfg.decay_fraction,
                )
            yield self.optimizer.param_groups[0]["lr"]
        self._save_last_step()

    def stop(self, reason: str) -> None:
        """End the steps before the step budget (a stage's own limit, e.g. max_tokens); `steps` then ends as usual."""
        self.stop_reason, self._stopped = reason, True

    def _save_last_step(self) -> None:
        """The steps are over: checkpoint the last one (unless this run resumed from it), so that a signal during the
        final evaluation or save leaves a run that resumes straight to them. From here a signal stops at once."""
        if self.run.saved_step != self.step:
            self._check_finite_weights()
            self.run.save_checkpoint(self.accelerator, self.step, self._trainer_state(), self.cfg.keep_checkpoints)
        self._steps_saved = True
        self._progress.close()
        if self._signal[0]:  # arrived after the last step's reduction
            raise RunInterrupted(self.run.name, str(self.run.path), self.step, self._signal[0])

    def optimizer_step(self, *parameter_sets) -> torch.Tensor | None:
        """Clip the gradient norm (of each set given, else of the whole model; `grad_clip` 0 only measures it),
        step and zero the gradients; returns the (first set's) norm before clipping. Gradients that are not finite
        stop the run at the next sync step, before anything is saved; with `skip_nonfinite_steps` N, up to N such
        steps are skipped instead (counted; it reads the norm on the host at every step)."""
        sets = parameter_sets or (self.model.parameters(),)
        clip = self.cfg.grad_clip or math.inf
        norms = [_plain(self.accelerator.clip_grad_norm_(params, clip), self.accelerator.device) for params in sets]
        norms = [n for n in norms if n is not None]
        # Under fp16 the loss scaler owns overflows: it skips a step whose gradients are not finite and lowers its
        # scale, which happens in the first steps of most fp16 runs; a run that really diverges shows in its loss.
        if norms and getattr(self.accelerator, "scaler", None) is None:
            bad = sum((~torch.isfinite(n)).float() for n in norms)
            if self.cfg.skip_nonfinite_steps and bad.item():
                skipped = self.state["skipped_steps"] = self.state.get("skipped_steps", 0) + 1
                if skipped > self.cfg.skip_nonfinite_steps:
                    raise LLMTrainError(
                        self._nonfinite_message(
                            f"at step {self.step + 1} ({skipped} such steps, more than --skip_nonfinite_steps allows)"
                        )
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self.write(f"step {self.step + 1}: gradients not finite, step skipped ({skipped} so far)")
                return norms[0]
            self._nonfinite = self._nonfinite + bad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms[0] if norms else None

    def _nonfinite_message(self, when: str) -> str:
        return (
            f"The gradients were not finite (NaN or inf) {when}; the run stopped and nothing of those steps was "
            f"saved. {self._what_next()} To skip a few such steps instead, add --skip_nonfinite_steps N to it."
        )

    def _what_next(self) -> str:
        """After a NaN/inf stop: what is kept, the stage's advice, and the command that acts on it as written."""
        advice = NAN_ADVICE.get(self.run.stage, "Lower --lr.")
        lower = f"--lr {self.cfg.lr / 3:.2g}"  # a third of this run's peak: an example of a lower one
        if self.run.saved_step is None:
            return (
                "No checkpoint had been saved yet, so nothing of this run can be resumed. "
                f"{advice} Then start again: the same command with a lower --lr, e.g. {lower}."
            )
        return (
            f"The last good checkpoint, of step {self.run.saved_step}, is kept in {self.run.path / 'checkpoints'}. "
            f"{advice} Then resume from it: the same command plus --run_name {self.run.name} and the changed "
            f"options, e.g. {lower} (a changed learning rate applies from the resumed step)."
        )

    def reduce(self, sums: torch.Tensor | None = None, tokens: float | torch.Tensor = 0.0) -> list[float] | None:
        """End of a step: add the stage's summed statistics and the tokens it trained on to those since the last
        logged line, on the device. On a sync step (`_sync_due`) sum them over all processes in one collective, with
        the signal flag, the count of non-finite gradients and the main process's clock, read them, and return the
        stage's sums averaged over the steps since the last logged line; on other steps return None."""
        self.step += 1
        self._window["steps"] += 1
        self._progress.update(1)
        if sums is not None:
            self._sums = sums.clone() if self._sums is None else self._sums + sums
        self._tokens = self._tokens + tokens
        if not self._sync_due():
            self._add_step_time()
            return None
        device = self.accelerator.device
        totals = torch.zeros(0, device=device) if self._sums is None else self._sums
        clock = self.train_time + time.perf_counter() - self._t0 if self.accelerator.is_main_process else 0.0
        extra = (self._tokens, self._nonfinite, float(self._signal[0]), clock)
        flags = torch.cat([totals, torch.stack([torch.as_tensor(v, dtype=totals.dtype, device=device) for v in extra])])
        flags = self.accelerator.reduce(flags, reduction="sum") if self.world > 1 else flags
        *totals, tokens_total, nonfinite, signalled, clock = flags.tolist()  # the host waits for the device here
        self._add_step_time()
        first = self._synced[0] + 1
        self._checked = f"at step {self.step}" if first == self.step else f"in steps {first}-{self.step}"
        if nonfinite:
            raise LLMTrainError(
                self._nonfinite_message(f"{self._checked} (lr {self.optimizer.param_groups[0]['lr']:.3g})")
            )
        self._nonfinite = 0.0
        self._signalled = signalled > 0
        self._window["tokens"] = tokens_total
        self._plan_time_check(clock)
        return [t / self._window["steps"] for t in totals]

    def _add_step_time(self) -> None:
        # On a sync step this includes the wait for the device, so each window's time is the device's too.
        dt = time.perf_counter() - self._t0
        self.train_time += dt
        self._window["time"] += dt

    def _sync_due(self) -> bool:
        """Whether this step syncs: every step for a stage that asks, each step that logs a line, and with a time
        budget the steps planned by `_plan_time_check`."""
        if self.sync_every_step or self._line_due():
            return True
        return bool(self.cfg.max_time_s) and self.step >= self._time_check_at

    def _line_due(self) -> bool:
        """Whether this step writes a metrics line: every `log_every` steps, before each checkpoint (periodic or a
        signal's) and at the last step (of the step or the time budget)."""
        step, cfg = self.step, self.cfg
        last = step == self.total_steps or self._signalled or self._time_spent()
        return last or step % cfg.log_every == 0 or self.due(cfg.save_every)

    def _plan_time_check(self, clock: float) -> None:
        """Keep the main process's clock, which every process now has. With a time budget, the next sync comes
        after half the steps the rest of the budget lasts at the pace since the last one, so the run stops
        after the step that spends it, as if it synced every step (unless steps suddenly get twice as slow)."""
        last_step, last_clock = self._synced
        self._synced = (self.step, clock)
        if self.cfg.max_time_s and not self._time_spent():
            pace = (clock - last_clock) / (self.step - last_step)
            left = (self.cfg.max_time_s - clock) / pace if pace > 0 else 0
            self._time_check_at = self.step + max(1, int(left / 2))

    def _time_spent(self) -> bool:
        return bool(self.cfg.max_time_s) and self._synced[1] >= self.cfg.max_time_s

    @contextmanager
    def waiting_for_data(self):
        """Time spent fetching batches: logged as the share of step time (`data_wait_frac`)."""
        t = time.perf_counter()
        yield
        self._window["data"] += time.perf_counter() - t

    def log(self, metrics: dict[str, float]) -> dict[str, float]:
        """On a sync step, with the metrics made from what `reduce` returned: stop on a non-finite loss; on a line
        step (see `_line_due`) add the learning rate and the timing fields (ms per step, tokens per second since
        the last line) and write the line. Tensors given (a gradient norm) are read here: the step's own value."""
        lr = self.optimizer.param_groups[0]["lr"]
        for key in WATCHED:
            if key in metrics and not math.isfinite(metrics[key]):
                what = "training loss" if key == "train_loss" else key
                raise LLMTrainError(
                    f"The {what} became {metrics[key]} {self._checked} (lr {lr:.3g}); the run stopped. "
                    + self._what_next()
                )
        self.last = metrics = {**metrics, "lr": lr}
        if not self._line_due():
            return metrics
        metrics = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        window = self._window
        metrics["ms_per_step"] = 1000 * window["time"] / window["steps"]
        if window["tokens"]:
            metrics["tokens_per_s"] = window["tokens"] / window["time"]
            if self.flops_per_token and self.peak_flops:
                metrics["mfu"] = self.flops_per_token * metrics["tokens_per_s"] / (self.peak_flops * self.world)
        if window["data"]:
            metrics["data_wait_frac"] = window["data"] / window["time"]
        self._window, self._sums, self._tokens = dict.fromkeys(window, 0.0), None, 0.0
        self.run.log_metrics(self.step, metrics, self.accelerator)
        shown = {k: f"{v:,}" if isinstance(v, int) else f"{v:.3f}" for k, v in list(metrics.items())[:2]}
        if "tokens_per_s" in metrics:
            shown["tok_s"] = f"{metrics['tokens_per_s']:,.0f}"
        self._progress.set_postfix(shown, refresh=False)
        return metrics

    def due(self, every: int) -> bool:
        """Whether a periodic task (evaluation, samples) runs after this step; the final one is the finish's."""
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def log_eval(self, metrics: dict[str, float]) -> None:
        self.run.log_metrics(self.step, metrics, self.accelerator)

    # ------------------------------------------------------------ evaluations: fit, best step, early stopping

    @property
    def watched(self) -> str:
        """The metric that picks the best evaluation and stops early: --keep_best, else the stage's own."""
        return self.keep_best or self.metric

    def evaluated(self, metrics: dict[str, float], trainset: dict[str, float] | None = None) -> None:
        """An evaluation on validation (at step 0: the parent's) and, when given, the same measured on a fixed
        sample of training rows (logged as `trainset_*`): logged, kept for the fit diagnosis, and compared with the
        best so far on the watched metric. With --keep_best an improvement saves the weights (the last step's are
        in memory anyway); with --early_stopping_patience N the steps stop after N evaluations without one."""
        row = {**metrics, **{trainset_name(k): v for k, v in (trainset or {}).items()}}
        self.log_eval(row)
        self.state.setdefault("evals", []).append({"step": self.step, **row})
        name = self.watched
        if name not in metrics:
            if self.step > 0 and self.keep_best:
                raise LLMTrainError(
                    f"--keep_best {name}: this {self.run.stage} run's evaluations measure "
                    f"{', '.join(sorted(metrics))}, not {name}. Name one of those (or leave --keep_best unset)."
                )
            return
        value, best = metrics[name], self.state.get("best")
        better = best is None or improved(value, best["value"], name)
        self.state["since_best"] = 0 if better else self.state.get("since_best", 0) + 1
        if better or not improved(best["value"], value, name):  # a tie goes to the later evaluation
            self.state["best"] = {"step": self.step, "metric": name, "value": value}
            if self.keep_best and not self._steps_saved:  # after the steps, the weights are the ones in memory
                self.run.save_checkpoint(self.accelerator, self.step, self._trainer_state(), 0, name=BEST)
        patience = self.cfg.early_stopping_patience
        if patience and self.state["since_best"] >= patience and not self._steps_saved:
            best = self.state["best"]
            self.write(
                f"step {self.step}: {name} {value:.4g}, no better than {best['value']:.4g} (step {best['step']}) for "
                f"{patience} evaluations: stopping early"
            )
            self.stop("early_stopping")

    def restore_best(self) -> bool:
        """With --keep_best, after the final evaluation: put back the weights of the best evaluation when it was not
        the last one. Returns whether it did (the stage then evaluates the restored weights again)."""
        best = self.state.get("best")
        if not self.keep_best or best is None or best["step"] == self.step:
            return False
        self.run.load_best(self.accelerator)
        self._print(
            f"--keep_best {best['metric']}: the saved model is step {best['step']}'s ({best['metric']} "
            f"{best['value']:.4g}), not the last step's"
        )
        return True

    def write(self, text: str) -> None:
        """Print a line above the progress bar (main process)."""
        if self.accelerator.is_main_process:
            self._progress.write(text)

    def checkpoint(self) -> None:
        """After a step: on a signal (seen at a sync step), save and raise RunInterrupted; else save every
        `save_every` steps (sync steps too). Weights that are not finite are never saved."""
        signum = (self._signal[0] or signal.SIGTERM) if self._signalled else 0
        if signum or self.due(self.cfg.save_every):
            self._check_finite_weights()
        state = self._trainer_state()
        self.run.checkpoint_after_step(self.accelerator, self.step, self.total_steps, state, self.cfg, signum)

    def _trainer_state(self) -> dict[str, Any]:
        """What a checkpoint holds beside the model, optimizer and RNG: the training time and the stage's state."""
        return {"train_time_s": self.train_time, **self.state}

    # ------------------------------------------------------------ the end

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights for saving, once every process has finished training. They are finite: the
        last step's checkpoint (`steps`), or the checkpoint this run resumed at it from, was checked before saving."""
        self.accelerator.wait_for_everyone()
        return full_state_dict(self.accelerator, self.model)

    def _check_finite_weights(self) -> None:
        """Stop instead of saving weights with a NaN or an inf: a checkpoint must be one to resume from. Each
        process checks its own parameters (its shards under FSDP; ZeRO-3's partitions are not visible here)."""
        bad = torch.zeros((), device=self.accelerator.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local.detach())).any().float()
        if (self.accelerator.reduce(bad, reduction="sum") if self.world > 1 else bad).item():
            raise LLMTrainError(
                f"The weights are not finite (NaN or inf) after step {self.step}, so they were not saved; the run "
                f"stopped. " + self._what_next()
            )

    def finish(
        self,
        final: dict[str, float],
        curves: dict[str, list[str]],
        message: str,
        histograms: dict | None = None,
        test: dict[str, float] | None = None,
        parent_test: dict[str, float] | None = None,
        test_items: list[dict[str, Any]] | None = None,
        kl: float | None = None,
    ) -> None:
        """Mark the run finished with its metrics (the final ones, the last training loss, steps, time, stop
        reason, the parent's prefixed `parent_`, and the test set's `test_*` and `parent_test_*`), its fit verdict
        and best evaluation; write the test items; plot the curves (validation against the training sample), drop
        the checkpoints; then a replacement (--overwrite) takes the place of the run it replaces, and the run's
        lock is released. `kl`: the final KL to the parent, for the fit's bound (PPO)."""
        self._steps_saved = False  # once the run is being marked finished, a signal no longer cuts it short
        metrics = {**final}
        if "train_loss" in self.last:
            metrics["train_loss"] = self.last["train_loss"]
        metrics |= {"steps": self.step, "train_time_s": round(self.train_time, 2), "stop_reason": self.stop_reason}
        metrics |= {f"parent_{k}": v for k, v in self.state.get("parent_metrics", {}).items()}
        metrics |= {metric_on_test(k): v for k, v in (test or {}).items()}
        metrics |= {f"parent_{metric_on_test(k)}": v for k, v in (parent_test or {}).items()}
        if "skipped_steps" in self.state:
            metrics["skipped_steps"] = self.state["skipped_steps"]
        evals = self.state.get("evals", [])
        fit = diagnose(evals, self.metric, self.guards, self.guard_rows, kl, self.kl_bound, self.reward)
        fields: dict[str, Any] = {"fit": fit.as_dict()}
        if self.keep_best and "best" in self.state:
            fields["best"] = self.state["best"]
        self.run.update(status="finished", metrics=metrics, **fields)
        if test_items is not None:
            self.run.write_rows(TEST_ITEMS, test_items)
        self.run.plot({**curves, f"fit: {self.metric}": [self.metric, trainset_name(self.metric)]}, histograms)
        self.run.remove_checkpoints()
        self.run.close()
        # Finish the trackers once all processes are here, and leave the process group up: Accelerate's
        # end_training() destroys it while the stage still holds the DDP-wrapped model, and freeing that model
        # afterwards can hang in the gloo group's destructor (seen in 2-process runs).
        self.accelerator.wait_for_everyone()
        for tracker in self.accelerator.trackers:
            tracker.finish()
        tested = ""
        if test:
            shown = {k: v for k, v in test.items() if k == self.metric or k in final and k != "val_loss"} or test
            tested = "; test " + ", ".join(
                f"{metric_on_test(k)} {parent_test[k]:.4f} -> {v:.4f}"
                if parent_test and k in parent_test
                else f"{metric_on_test(k)} {v:.4f}"
                for k, v in shown.items()
            )
        self._print(
            f"\nFinished {self.run.name}: {message}{tested}; {self.train_time:.1f} s training. Saved to "
            f"{self.run.path}\n{fit.line()}"
        )

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)


def _plain(norm, device) -> torch.Tensor | None:
    """A gradient norm as a plain tensor: FSDP2 returns a (replicated) DTensor; DeepSpeed, which clips inside its
    engine, a float or None."""
    if norm is None or isinstance(norm, torch.Tensor) and not hasattr(norm, "full_tensor"):
        return norm
    return norm.full_tensor() if hasattr(norm, "full_tensor") else torch.tensor(float(norm), device=device)
