"""One run directory per stage run: naming, the finished/resume/overwrite rules, manifest, metrics and plot.

Layout of a run (a Hugging Face checkpoint plus bookkeeping):
    config.json, model.safetensors, tokenizer files   the model, loadable with from_pretrained
    llmtrain.json                                     manifest: stage, parent, config, data, metrics
    metrics.jsonl                                     one line per logged step
    curves.png                                        train/val curves
    checkpoints/step-0000500/                         resumable training state (removed when finished)
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain import __version__
from llmtrain.errors import LLMTrainError
from llmtrain.registry import latest_run, new_run_name, read_manifest, timestamp, write_manifest

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
PLOT = "curves.png"


@dataclass
class Run:
    """An open run directory; only the main process writes to it."""

    path: Path
    stage: str
    is_main: bool
    resume_from: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    engine: str = "NO"  # how the processes share the work: MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED ZeRO-3...

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, config: Any, stage: str, label: str, accelerator) -> Run:
        """Pick the run folder and decide: fresh start, resume from its last checkpoint, or refuse."""
        from accelerate.utils import broadcast_object_list

        runs_dir = Path(config.runs_dir)
        decision: list[Any] = [None, None]  # [run name, checkpoint to resume from]
        error: list[Any] = [None]
        if accelerator.is_main_process:
            try:
                decision = list(_decide(config, stage, label, runs_dir))
            except LLMTrainError as e:
                error = [str(e)]
        if accelerator.num_processes > 1:
            broadcast_object_list(error)
            broadcast_object_list(decision)
        if error[0]:
            raise LLMTrainError(error[0])
        name, resume_from = decision
        run = cls(runs_dir / name, stage, accelerator.is_main_process, Path(resume_from) if resume_from else None)
        run.engine = accelerator.distributed_type.value
        if accelerator.state.deepspeed_plugin is not None:
            run.engine += f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
        if run.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            if run.resume_from is None:
                # A fresh start inside an unfinished folder: drop stale curves so they do not mix.
                (run.path / METRICS).unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        return run

    # ------------------------------------------------------------ manifest

    def start(self, config: dict[str, Any], **fields: Any) -> None:
        """Write the manifest of a run that has started (status 'running')."""
        previous = _read_if_any(self.path)
        self.manifest = {
            "name": self.name,
            "stage": self.stage,
            "status": "running",
            "created": previous.get("created", timestamp()),
            "updated": timestamp(),
            **fields,
            "engine": self.engine,
            "config": config,
            "resumed_at_steps": previous.get("resumed_at_steps", []),
            "versions": library_versions(),
            "git_commit": _git_commit(),
            "metrics": previous.get("metrics", {}),
        }
        if self.resume_from is not None:
            self.manifest["resumed_at_steps"].append(int(self.resume_from.name.split("-")[-1]))
        self._write()

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

    def save_checkpoint(self, accelerator, step: int, state: dict[str, Any], keep: int) -> Path:
        """Save the full training state atomically: into a temporary folder, then renamed into place."""
        root = self.path / CHECKPOINTS
        final = root / f"step-{step:07d}"
        tmp = root / f".tmp-step-{step:07d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        # Under FSDP and DeepSpeed every process writes its own shard: rename only once all are written.
        accelerator.wait_for_everyone()
        if self.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

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
        return json.loads((self.resume_from / "trainer_state.json").read_text())

    def remove_checkpoints(self) -> None:
        if self.is_main:
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of an interrupted save are ignored)."""
    done = sorted(p for p in (run_path / CHECKPOINTS).glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def _decide(config: Any, stage: str, label: str, runs_dir: Path) -> tuple[str, str | None]:
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
        return new_run_name(stage, label, runs_dir), None
    path = runs_dir / name
    if config.resume and not path.is_dir():
        raise LLMTrainError(f"--resume: run '{name}' does not exist in {runs_dir}. See `llmtrain runs`.")
    manifest = _read_if_any(path)
    if manifest.get("status") == "finished":
        if not config.overwrite:
            raise LLMTrainError(
                f"Run '{name}' in {runs_dir} is finished; it will not be overwritten. Pass --overwrite to "
                f"replace it, or choose another --run_name."
            )
        shutil.rmtree(path)
        return name, None
    if manifest and manifest.get("stage") not in (None, stage):
        raise LLMTrainError(f"Run '{name}' is a {manifest['stage']} run, not a {stage} run; choose another --run_name.")
    if config.overwrite and path.exists():
        shutil.rmtree(path)
        return name, None
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    return name, str(ckpt) if ckpt else None


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
