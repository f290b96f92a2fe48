"""One run directory per stage run: naming, the finished/resume/overwrite rules, manifest, metrics and plot.

Layout of a run (a Hugging Face checkpoint plus bookkeeping):
    config.json, model.safetensors, tokenizer files   the model, loadable with from_pretrained
    llmtrain.json                                     manifest: stage, parent, config, data, metrics
    metrics.jsonl                                     one line per logged step
    curves.png                                        train/val curves
    checkpoints/step-0000500/                         resumable training state (removed when finished)

Beside it, while a process trains in it, `.NAME.lock` (pid, host, start time): a second start on NAME is refused.
With --overwrite of an existing run, the new run trains in `.overwrite/NAME` and takes NAME's place only once it has
finished, so a failure or an interruption before that leaves the old run as it was.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain import __version__
from llmtrain.config import NOT_COMPARED_ON_RESUME, check_run_name, config_to_dict
from llmtrain.errors import LLMTrainError
from llmtrain.registry import (
    hub_revision,
    latest_run,
    model_fingerprint,
    new_run_name,
    read_manifest,
    timestamp,
    write_manifest,
)
from llmtrain.runtime import process_alive

BEST = "best"  # the checkpoint of the best evaluation, under checkpoints/
CHECKPOINTS = "checkpoints"
FILES = "files"  # in a checkpoint's trainer_state.json: each file of the checkpoint and its size
METRICS = "metrics.jsonl"
PLOT = "curves.png"
TEST_ITEMS = "test_items.jsonl"  # each test item's score for the result and the parent, for paired comparisons
BAD_ROWS = "bad_rows.jsonl"  # the data rows a run skipped (max_bad_rows): where each one is and why
OVERWRITE = ".overwrite"  # beside the runs: where a run that replaces another trains until it has finished
REPLACED = ".replaced"  # where the run it replaces waits during the swap, to be deleted right after


@dataclass
class Run:
    """An open run directory; only the main process writes to it."""

    path: Path
    stage: str
    is_main: bool
    resume_from: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    engine: str = "NO"  # how the processes share the work: MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED ZeRO-3...
    replaces: Path | None = None  # with --overwrite: the run folder this run takes the place of when it finishes
    lock: RunLock | None = None  # held by the main process from the opening to the end of the run
    saved_step: int | None = None  # the step of the newest checkpoint this process saved or resumed from
    parents: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> spec, path, fingerprint
    bad_rows: list[dict[str, str]] = field(default_factory=list)  # data rows skipped under max_bad_rows
    # On the main process of a resumed run: each option whose value differs from the checkpoint's, applied from
    # the resumed step ({step, option, old, new}; see `resume_changes`).
    resumed_changes: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config, saved with each checkpoint

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, config: Any, stage: str, label: str, accelerator) -> Run:
        """Pick the run folder and decide: fresh start, resume from its last checkpoint, or refuse. The main process
        locks the run; the folder itself is made only when the run starts (`start`)."""
        from accelerate.utils import broadcast_object_list

        runs_dir = Path(config.runs_dir)
        decision: list[Any] = [None, None, None]  # [folder to write, checkpoint to resume from, run it replaces]
        error: list[Any] = [None]
        lock, changes = None, []
        if accelerator.is_main_process:
            try:
                decided = _decide(config, stage, label, runs_dir, accelerator.num_processes)
                decision = [str(p) if p else None for p in (decided.path, decided.resume_from, decided.replaces)]
                lock, changes = decided.lock, decided.changes
            except LLMTrainError as e:
                error = [str(e)]
        if accelerator.num_processes > 1:
            broadcast_object_list(error)
            broadcast_object_list(decision)
        if error[0]:
            raise LLMTrainError(error[0])
        path, resume_from, replaces = (Path(p) if p else None for p in decision)
        run = cls(path, stage, accelerator.is_main_process, resume_from, replaces=replaces, lock=lock)
        run.resumed_changes = changes  # only the main process writes them to the manifest
        run.engine = accelerator.distributed_type.value
        if accelerator.state.deepspeed_plugin is not None:
            run.engine += f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
        accelerator.wait_for_everyone()
        return run

    def close(self) -> None:
        """The end of a finished run: a replacement takes the place of the run it replaces, the lock is released."""
        if self.replaces is not None:
            if self.is_main:
                _swap(self.path, self.replaces)
            self.path, self.replaces = self.replaces, None
        self.release()

    def release(self) -> None:
        """Release the run's lock (a failed or interrupted run too): another process may then start in it."""
        if self.lock is not None:
            self.lock.release()

    def pin_parent(self, role: str, spec: str, path: str | None) -> None:
        """Record a model this run starts from or is judged by (its resolved path and content hash). A resumed run
        must find the same one: a spec such as `latest` that now names another run, or a parent whose files changed
        on disk since the run started, is an error that says what changed."""
        pinned = {"spec": spec, "path": path, "fingerprint": model_fingerprint(path) if path else None}
        snapshot = hub_revision(path)
        if snapshot:
            pinned["revision"] = snapshot[1]
        before = _read_if_any(self.path).get("parent_models", {}).get(role) if self.resume_from is not None else None
        if before and before["path"] != path and before.get("revision") and snapshot:
            raise LLMTrainError(
                f"Run '{self.name}' started from {role} {before['spec']} at Hub revision {before['revision'][:12]}, "
                f"but '{spec}' is now revision {snapshot[1][:12]} (the Hub model has changed since). A resumed "
                f"run keeps the models it started with: pass --{role} {before['path']} (that revision, still in the "
                "Hugging Face cache) to resume it, or start a new run."
            )
        if before and before["path"] != path:
            raise LLMTrainError(
                f"Run '{self.name}' started from {role} {before['path']} (given as '{before['spec']}'), but "
                f"'{spec}' now names {path}. A resumed run keeps the models it started with: pass "
                f"--{role} {before['path']} to resume it, or start a new run."
            )
        if before and before["fingerprint"] != pinned["fingerprint"]:
            raise LLMTrainError(
                f"The {role} of run '{self.name}', {path}, changed on disk since the run started (its weights, "
                f"config or tokenizer files differ from when it was recorded). Resuming would continue against "
                f"another model: restore that model, or start a new run."
            )
        self.parents[role] = pinned

    # ------------------------------------------------------------ manifest

    def start(self, config: dict[str, Any], **fields: Any) -> None:
        """Make the run folder (only now, so a stage that fails on its input leaves none) and write the manifest
        of a run that has started (status 'running')."""
        if self.is_main and self.resume_from is None:
            if self.replaces is not None:
                shutil.rmtree(self.path, ignore_errors=True)  # an earlier replacement that failed before a checkpoint
            else:
                (self.path / METRICS).unlink(missing_ok=True)  # a fresh start in an unfinished folder: no stale curve
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.bad_rows:
                self.write_rows(BAD_ROWS, self.bad_rows)
        previous = _read_if_any(self.path)
        self.config = config
        self.manifest = {
            "name": self.name,
            "stage": self.stage,
            "status": "running",
            "created": previous.get("created", timestamp()),
            "updated": timestamp(),
            **fields,
            "engine": self.engine,
            "parent_models": self.parents,
            "bad_rows": len(self.bad_rows),
            "config": config,
            "resumed_at_steps": previous.get("resumed_at_steps", []),
            "resumed_changes": [],
            "versions": library_versions(),
            "git_commit": _git_commit(),
            "metrics": previous.get("metrics", {}),
        }
        if self.resume_from is not None:
            step = checkpoint_step(self.resume_from)
            self.manifest["resumed_at_steps"].append(step)
            # Changes recorded at or after this checkpoint's step belonged to steps that are now trained again.
            earlier = [c for c in previous.get("resumed_changes", []) if c["step"] < step]
            self.manifest["resumed_changes"] = earlier + self.resumed_changes
        self._write()

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        """A JSON-lines file of the run (main process)."""
        if self.is_main:
            (self.path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))

    def update(self, status: str | None = None, **fields: Any) -> None:
        if status:
            self.manifest["status"] = status
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(self.manifest.get(key), dict):
                self.manifest[key].update(value)
            else:
                self.manifest[key] = value
        self.manifest["updated"] = timestamp()
        self._write()

    def _write(self) -> None:
        if self.is_main:
            write_manifest(self.path, self.manifest)

    # ------------------------------------------------------------ metrics

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, forget logged steps past the checkpoint so the curve continues without repeats."""
        path = self.path / METRICS
        if not self.is_main or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
        path.write_text("".join(line + "\n" for line in kept))

    def log_metrics(self, step: int, metrics: dict[str, float], accelerator=None) -> None:
        if self.is_main:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if accelerator is not None and accelerator.trackers:
            accelerator.log(metrics, step=step)

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def plot(self, curves: dict[str, list[str]], histograms: dict[str, dict[str, list[float]]] | None = None):
        """Plot metrics.jsonl: one panel per entry of `curves` (title -> metric keys, x = step), then one
        panel per entry of `histograms` (title -> {label: values}), e.g. reward scores of chosen vs rejected."""
        if not self.is_main:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        histograms = histograms or {}
        panels = len(curves) + len(histograms)
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
        for ax, (title, groups) in zip(axes[0][len(curves) :], histograms.items()):
            for label, values in groups.items():
                ax.hist(values, bins=30, alpha=0.55, label=label)
            ax.set_title(title)
            ax.legend()
        for ax, (title, keys) in zip(axes[0], curves.items()):
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o" if len(points) < 30 else None, ms=3, label=key)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        fig.suptitle(self.name)
        fig.tight_layout()
        out = self.path / PLOT
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self, accelerator, step: int, state: dict[str, Any], keep: int, name: str | None = None
    ) -> Path:
        """Save the full training state atomically: into a temporary folder, then renamed into place. `name`: a
        checkpoint outside the rotation that resume never picks (the best evaluation's, for --keep_best)."""
        root = self.path / CHECKPOINTS
        final = root / (name or f"step-{step:07d}")
        tmp = root / f".tmp-{final.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        # Under FSDP and DeepSpeed every process writes its own shard: rename only once all are written.
        accelerator.wait_for_everyone()
        if self.is_main:
            # Every file with its size, so that a resume can tell a damaged checkpoint (a file deleted or cut short
            # after the save) and fall back to the one before it.
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            # What the checkpoint was trained with, which a resume compares its options with (`resume_changes`).
            trained_with = {"config": self.config, "world_size": self.manifest.get("world_size")}
            trainer_state = {"step": step, **state, **trained_with, FILES: files}
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, default=str))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 and name is None else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        if name is None:
            self.saved_step = step
        return final

    def load_best(self, accelerator) -> None:
        """Put the weights of the best evaluation (saved by `save_checkpoint(..., name=BEST)`) back in the model."""
        accelerator.load_state(str(self.path / CHECKPOINTS / BEST))

    def checkpoint_after_step(
        self, accelerator, step: int, total_steps: int, state: dict[str, Any], cfg: Any, signum: int
    ) -> None:
        """After a step: on a signal, save and raise RunInterrupted; else save every `cfg.save_every` steps."""
        from llmtrain.errors import RunInterrupted

        if signum:
            self.save_checkpoint(accelerator, step, state, cfg.keep_checkpoints)
            self.update(status="interrupted")
            raise RunInterrupted(self.name, str(self.path), step, signum)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            self.save_checkpoint(accelerator, step, state, cfg.keep_checkpoints)

    def load_checkpoint(self, accelerator) -> dict[str, Any]:
        """Restore model, optimizer and RNG state from `resume_from`; return its trainer state."""
        assert self.resume_from is not None
        accelerator.load_state(str(self.resume_from))
        state = json.loads((self.resume_from / "trainer_state.json").read_text())
        for key in (FILES, "config", "world_size"):
            state.pop(key, None)
        self.saved_step = state["step"]
        return state

    def remove_checkpoints(self) -> None:
        if self.is_main:
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint folder (`step-0000500`) was saved after."""
    return int(ckpt.name.split("-")[-1])


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest intact checkpoint (temporary folders of an interrupted save are ignored). A damaged one, with a
    file missing or of another size than it was saved with, is skipped with a notice saying why."""
    for ckpt in sorted((run_path / CHECKPOINTS).glob("step-*"), reverse=True):
        damage = _damage(ckpt)
        if damage is None:
            return ckpt
        print(f"Skipping checkpoint {ckpt.name} of run '{run_path.name}': {damage}. Trying the one before.", flush=True)
    return None


def _damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file it was saved with is there, whole."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "it has no trainer_state.json (its save never finished)"
    except (OSError, ValueError):
        return "its trainer_state.json cannot be read"
    for name, size in state.get(FILES, {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, not the {size:,} it was saved with"
    return None


@dataclass
class _Decision:
    """What `Run.open` decided on the main process."""

    path: Path  # the folder to write
    resume_from: Path | None  # the checkpoint to resume from
    replaces: Path | None  # with --overwrite: the run folder this run takes the place of when it finishes
    lock: RunLock
    changes: list[dict[str, Any]] = field(default_factory=list)  # options changed since that checkpoint


def _decide(config: Any, stage: str, label: str, runs_dir: Path, world: int) -> _Decision:
    """Where the run goes, whether it resumes (with which changed options), and its lock; `world`, the number of
    processes it runs on."""
    check_run_name(config.run_name)  # again here: a config's fields may be set after it was made
    name = config.run_name
    if config.resume and not name:
        run = latest_run(runs_dir, stage, finished=False)
        unfinished = run if run and run.get("status") != "finished" else None
        if unfinished is None:
            raise LLMTrainError(
                f"--resume: there is no unfinished {stage} run in {runs_dir} to resume. "
                f"Name one with --run_name, or start a new run without --resume."
            )
        name = Path(unfinished["_dir"]).name
    if not name:
        # The lock file reserves a new name until the folder is made: two starts in one second get two names.
        for _ in range(100):
            path = runs_dir / new_run_name(stage, label, runs_dir)
            try:
                return _Decision(path, None, None, RunLock.acquire(path))
            except RunLocked:
                continue
        raise LLMTrainError(f"Could not reserve a new run name in {runs_dir}; give one with --run_name.")
    path = runs_dir / name
    lock = RunLock.acquire(path)
    try:
        _complete_cut_swap(path)
        folder, resume_from, replaces = _decide_named(config, stage, path)
        changes = resume_changes(config, resume_from, folder, world) if resume_from else []
        return _Decision(folder, resume_from, replaces, lock, changes)
    except BaseException:
        lock.release()
        raise


def _decide_named(config: Any, stage: str, path: Path) -> tuple[Path, Path | None, Path | None]:
    name, runs_dir = path.name, path.parent
    if config.resume and not path.is_dir():
        raise LLMTrainError(f"--resume: run '{name}' does not exist in {runs_dir}. See `llmtrain runs`.")
    manifest = _read_if_any(path)
    staging = _staging(path)
    replacement = latest_checkpoint(staging) if staging.is_dir() else None
    finished = manifest.get("status") == "finished"
    if finished and not config.overwrite:
        pending = (
            f" A replacement of it was interrupted at {replacement.name} in {staging}: pass --overwrite to resume it."
            if replacement
            else ""
        )
        raise LLMTrainError(
            f"Run '{name}' in {runs_dir} is finished; it will not be overwritten. Pass --overwrite to "
            f"replace it, or choose another --run_name.{pending}"
        )
    if manifest and not finished and manifest.get("stage") not in (None, stage):
        raise LLMTrainError(f"Run '{name}' is a {manifest['stage']} run, not a {stage} run; choose another --run_name.")
    if config.overwrite and path.exists():
        # The existing run stays whole until the new one has finished (Run.close swaps them); until then the new
        # one lives in .overwrite/NAME, which the same command resumes after an interruption.
        if replacement:
            print(
                f"Resuming the replacement of run '{name}' that was interrupted ({staging}); the run it replaces is "
                f"kept until it finishes. To start the replacement from scratch, delete {staging}.",
                flush=True,
            )
        return staging, replacement, path
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is None and config.resume:
        print(
            f"--resume: run '{name}' has no checkpoint to resume from (none was saved before it stopped, or every "
            "one is damaged), so nothing is resumed: it starts again from step 0.",
            flush=True,
        )
    return path, ckpt, None


def resume_changes(config: Any, checkpoint: Path, folder: Path, world: int) -> list[dict[str, Any]]:
    """Each option whose value differs from the one `checkpoint` was trained with, as {step, option, old, new}: it
    applies from the resumed step. A resume that changes an option shaping the data order, the model or the
    objective (`config.SHAPES_TRAINING`) is refused, naming each difference and how to start afresh; --batch_size
    only where the batch of all processes together changes (a run may resume on another number of processes)."""
    state = _trainer_state(checkpoint)
    before = state.get("config") or _read_if_any(folder).get("config", {})  # older checkpoints: the manifest's
    before_world = state.get("world_size") or _read_if_any(folder).get("world_size") or world
    now = config_to_dict(config)
    differ = [k for k, v in now.items() if k in before and k not in NOT_COMPARED_ON_RESUME and before[k] != v]
    shaping = getattr(config, "SHAPES_TRAINING", frozenset())
    same_batch = before.get("batch_size", 0) * before_world == now.get("batch_size", 0) * world
    refused = [k for k in differ if k in shaping and not (k == "batch_size" and same_batch)]
    step = checkpoint_step(checkpoint)
    if refused:
        listed = "; ".join(
            f"--{k} {_shown(k, now[k], world)} (the checkpoint's: {_shown(k, before[k], before_world)})"
            for k in refused
        )
        afresh = (
            f"delete {folder} (the interrupted replacement) and start again"
            if folder.parent.name == OVERWRITE
            else "add --overwrite true (the run is replaced once the new one has finished) or choose a new --run_name"
        )
        raise LLMTrainError(
            f"Run '{folder.name}' cannot resume from its checkpoint at step {step} with other values of options that "
            f"shape its data order, its model or its objective: {listed}. The checkpoint was trained with the old "
            "values, and they cannot change in the middle of a run. To resume it, give the checkpoint's values (or "
            f"leave those options out); to start afresh with the new ones, {afresh}."
        )
    return [{"step": step, "option": k, "old": before[k], "new": now[k]} for k in differ]


def describe_changes(changes: list[dict[str, Any]]) -> str:
    """Options changed on resume as the command line writes them: `--lr 0.1 (was 0.3), --lora true (was false)`."""
    return ", ".join(f"--{c['option']} {_shown('', c['new'], 1)} (was {_shown('', c['old'], 1)})" for c in changes)


def _shown(option: str, value: Any, processes: int) -> str:
    """An option's value as the command line writes it; a batch size with the processes that shared it."""
    shown = json.dumps(value) if value is None or isinstance(value, bool) else str(value)
    return shown + (f" x {processes} process{'es' if processes > 1 else ''}" if option == "batch_size" else "")


def _trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}


def _staging(path: Path) -> Path:
    """Where a run that replaces the run folder `path` trains until it has finished."""
    return path.parent / OVERWRITE / path.name


def _swap(new: Path, old: Path) -> None:
    """Put the finished run `new` in the place of `old`: old -> .replaced/NAME, new -> NAME, delete the old one.
    Each step is one rename; a process killed between them is repaired by the next start (`_complete_cut_swap`)."""
    trash = old.parent / REPLACED / old.name
    shutil.rmtree(trash, ignore_errors=True)
    if old.exists():
        trash.parent.mkdir(parents=True, exist_ok=True)
        old.rename(trash)
    new.rename(old)
    shutil.rmtree(trash, ignore_errors=True)
    for folder in (new.parent, trash.parent):
        try:
            folder.rmdir()  # only when empty: another run may be being replaced there
        except OSError:
            pass


def _complete_cut_swap(path: Path) -> None:
    """Under the run's lock, finish a replacement whose run had finished when its process died before or during
    the swap, and put back a replaced run whose swap was cut short (nothing is lost in either case)."""
    staging, trash = _staging(path), path.parent / REPLACED / path.name
    if _read_if_any(staging).get("status") == "finished":
        shutil.rmtree(staging / CHECKPOINTS, ignore_errors=True)
        _swap(staging, path)
        print(
            f"Completed the replacement of run '{path.name}': it had finished, but its process stopped before "
            f"it took the old run's place.",
            flush=True,
        )
    elif trash.is_dir() and not path.exists():
        trash.rename(path)
    elif trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------- the lock


class RunLocked(LLMTrainError):
    """Another live process holds the run's lock."""


@dataclass
class RunLock:
    """`.NAME.lock` beside the run folder NAME while a process trains in it: created with O_CREAT|O_EXCL by the main
    process, holding its pid, host and start time, and removed at the end of the run (or at the process's exit).
    It sits beside the folder, not in it, so it also covers a run not yet started and the swap of a replacement."""

    path: Path
    token: str
    pid: int

    @classmethod
    def acquire(cls, run_path: Path) -> RunLock:
        """Take the lock of the run folder `run_path`, taking over a stale one; RunLocked if a live process has it."""
        path = run_path.parent / f".{run_path.name}.lock"
        token = uuid.uuid4().hex
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": timestamp()}
        for _ in range(5):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                notice = _stale_notice(holder, path, run_path.name)
                if notice is None:
                    raise RunLocked(_locked_message(holder, path, run_path)) from None
                if notice:
                    print(notice, flush=True)
                path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise LLMTrainError(
                    f"Cannot write the lock file {path} of run '{run_path.name}' ({e.strerror}). Check that the runs "
                    f"folder {run_path.parent} is writable, or give another one with --runs_dir."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({**mine, "token": token}, f)
            lock = cls(path, token, os.getpid())
            # At the process's exit, or when the run is dropped, whatever path the stage left by.
            weakref.finalize(lock, _release, path, token, lock.pid)
            return lock
        raise RunLocked(f"The lock of run '{run_path.name}' ({path}) keeps being taken by other starts; try again.")

    def release(self) -> None:
        """Remove the lock file, if it is still this lock's."""
        _release(self.path, self.token, self.pid)


def _release(path: Path, token: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked child (a data loader worker) never releases its parent's lock
        return
    if _read_lock(path, wait_s=0).get("token") == token:
        path.unlink(missing_ok=True)


def _read_lock(path: Path, wait_s: float = 1.0) -> dict[str, Any]:
    """The holder recorded in a lock file; {} if it is gone, {"unreadable": True} if it stays empty or garbled (a
    holder writes it right after creating it, so an empty file is given `wait_s` to fill)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            holder = json.loads(path.read_text())
            if isinstance(holder, dict):
                return holder
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {"unreadable": True}
        time.sleep(0.05)


def _stale_notice(holder: dict[str, Any], path: Path, name: str) -> str | None:
    """None while the holder may be alive; else the one-line notice of a takeover ('' for none)."""
    if not holder:
        return ""  # released in the meantime
    if holder.get("unreadable") or not isinstance(holder.get("pid"), int):
        return f"Taking over the lock of run '{name}': {path} was unreadable."
    pid, host = holder["pid"], holder.get("host")
    if host != socket.gethostname():
        return None  # a process on another machine cannot be checked from here
    if pid == os.getpid():
        return ""  # an earlier run in this process that stopped before its end (a notebook or a test retrying)
    if process_alive(pid):
        return None
    return (
        f"Taking over the lock of run '{name}': process {pid} on {host}, which took it at {holder.get('started')}, "
        f"is no longer running."
    )


def _locked_message(holder: dict[str, Any], path: Path, run_path: Path) -> str:
    pid, host = holder.get("pid"), holder.get("host")
    who = f"process {pid} on host {host}"
    return (
        f"Run '{run_path.name}' in {run_path.parent} is in use: {who} has held its lock since "
        f"{holder.get('started')}. Two processes training one run folder would overwrite each other's checkpoints "
        f"and metrics. Wait for that run to end (or stop it), or start this one with another --run_name. If that "
        f"process is gone (its machine was restarted, say), delete {path} and start again."
    )


def _read_if_any(path: Path) -> dict[str, Any]:
    try:
        return read_manifest(path)
    except LLMTrainError:
        return {}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "llmtrain": __version__}
    for pkg in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "peft", "trl"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
