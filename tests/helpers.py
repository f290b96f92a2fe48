"""Plain helpers shared by the tests: tiny stage configs, a subprocess environment, readers of a run's files and
toy reward functions. Fixtures live in conftest.py; tests import from here, never from each other."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The seed of every tiny stage config below (the configs' own default unless set). Tests assert what training
# does, not where one seed lands: `LLMTRAIN_TEST_SEED=0 python -m pytest ...` reruns them at another seed.
TEST_SEED = {"seed": int(os.environ["LLMTRAIN_TEST_SEED"])} if os.environ.get("LLMTRAIN_TEST_SEED") else {}

# Recipe flags that make a pretraining run on the command line take a few seconds.
TINY_FLAGS = [
    "--preset",
    "gpt-nano",
    "--vocab_size",
    "320",
    "--seq_len",
    "32",
    "--batch_size",
    "8",
    "--eval_every",
    "10",
    "--eval_batches",
    "2",
    "--num_samples",
    "1",
    "--sample_tokens",
    "4",
]


def env_for(tmp_path: Path) -> dict[str, str]:
    """The environment of a recipe started in a subprocess: one thread, unbuffered, runs under tmp_path/runs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LLMTRAIN_RUNS_DIR=str(tmp_path / "runs"))
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def logged(run_dir: Path) -> dict[int, dict]:
    """A run's metrics.jsonl as one merged row per step."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def train_losses(run_dir: Path) -> dict[int, float]:
    """The training loss logged at each step."""
    return {step: row["train_loss"] for step, row in logged(run_dir).items() if "train_loss" in row}


def manifest(run_dir: Path) -> dict:
    """A run's llmtrain.json."""
    return json.loads((run_dir / "llmtrain.json").read_text())


def short_answer_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A toy reward the tiny SFT model can learn in a few dozen steps: the shorter the answer, the better."""
    return [-len(r) / 10 for r in responses]


def wrong_answer_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that pays for something other than a right answer: 1 for a wrong one (the default task's checker)."""
    from llmtrain.data.default_task import answer_reward

    return [1.0 - right for right in answer_reward(prompts, responses)]


def wrong_length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A broken reward function: one score whatever the number of responses."""
    return [0.0]


def tiny_config(runs_dir: Path, data: Path, **overrides):
    """A gpt-nano pretraining config that runs in a few seconds on a CPU."""
    from llmtrain.config import PretrainConfig

    values = dict(
        runs_dir=str(runs_dir),
        data=str(data),
        preset="gpt-nano",
        vocab_size=320,
        seq_len=32,
        batch_size=8,
        max_steps=40,
        warmup_steps=5,
        lr=3e-3,
        eval_every=20,
        eval_batches=4,
        log_every=1,
        save_every=0,
        num_samples=2,
        sample_tokens=8,
        **TEST_SEED,
    )
    values.update(overrides)
    return PretrainConfig(**values)


# What every tiny fine-tuning config shares, and what those of the policy stages add.
TINY_FINETUNE = dict(batch_size=16, lr=3e-3, warmup_steps=3, max_length=64, eval_every=0, log_every=1, save_every=0)
TINY_POLICY = dict(task_eval_rows=24, num_samples=1, max_new_tokens=12)


def tiny_sft_config(runs_dir: Path, **overrides):
    """An SFT config that tunes the `tiny` run in a few seconds."""
    from llmtrain.config import SftConfig

    values = dict(runs_dir=str(runs_dir), init="tiny", max_rows=400, max_steps=30, **TINY_FINETUNE, **TINY_POLICY)
    values |= TEST_SEED
    return SftConfig(**{**values, **overrides})


def reward_config(runs_dir: Path, **overrides):
    """A reward-model config that trains on `sft-tiny` in a few seconds."""
    from llmtrain.config import RewardConfig

    values = dict(runs_dir=str(runs_dir), init="sft-tiny", max_rows=600, max_steps=60, **TINY_FINETUNE, **TEST_SEED)
    return RewardConfig(**{**values, **overrides})


def tiny_dpo_config(runs_dir: Path, **overrides):
    """A plain-DPO config (no NLL term, so margins are DPO's alone) that tunes `sft-tiny` in a few seconds."""
    from llmtrain.config import DpoConfig

    values = {**dict(runs_dir=str(runs_dir), init="sft-tiny", max_rows=400, max_steps=20), **TINY_FINETUNE}
    values |= dict(lr=5e-3, warmup_steps=2, judge="none", nll_weight=0.0, **TINY_POLICY, **TEST_SEED)
    return DpoConfig(**{**values, **overrides})


def tiny_ppo_config(runs_dir: Path, **overrides):
    """A PPO config that tunes `sft-tiny` against the toy reward function for two steps in a few seconds (evaluated
    at the start and the end only)."""
    from llmtrain.config import PpoConfig

    values = dict(runs_dir=str(runs_dir), init="sft-tiny", reward_fn="helpers:short_answer_reward", max_steps=2)
    values |= dict(batch_size=16, lr=3e-4, value_lr=1e-3, max_length=64, max_new_tokens=12, num_mini_batches=1)
    values |= dict(task_eval_rows=16, num_samples=1, sample_every=0, save_every=0, eval_every=0, **TEST_SEED)
    return PpoConfig(**{**values, **overrides})


# Eight sums a tiny model can be taught by heart in a few seconds: a measurable gain where held-out rows show none.
TAUGHT_SUMS = [(12, 30), (23, 45), (31, 27), (40, 16), (52, 13), (61, 24), (70, 18), (14, 33)]


def write_taught_sums(path: Path, kind: str) -> Path:
    """The eight sums as SFT rows (`kind` "sft") or as pairs whose rejected answer is ten too high ("pairs")."""
    rows = []
    for a, b in TAUGHT_SUMS:
        prompt, right, wrong = f"What is {a} + {b}?", f"{a} + {b} = {a + b}", f"{a} + {b} = {a + b + 10}"
        rows.append(
            {"prompt": prompt, "response": right}
            if kind == "sft"
            else {"prompt": prompt, "chosen": right, "rejected": wrong}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit_line(
    runs: Path,
    stop_at: int | None = None,
    lr: float = 0.3,
    nan_grads_at: tuple[int, ...] = (),
    nan_loss_at: int | None = None,
    stop_in_final: bool = False,
    parent: Path | None = None,
    val_losses: dict[int, float] | None = None,
    weights_at: dict[int, float] | None = None,
    **overrides,
):
    """A stage in miniature on the loop spine (open, start, loop, save, finish) fitting y = 3x - 0.5 with one linear
    layer: SIGTERM to itself during step `stop_at` (or during the final save, `stop_in_final`), NaN gradients during
    the steps in `nan_grads_at`, a NaN loss reported at step `nan_loss_at`; `parent`, a model folder it records as
    the one it starts from; `val_losses`, a scripted validation loss evaluated after those steps (and the last),
    the model's weight then recorded in `weights_at`, the restored best reloaded before the save. Returns the run
    and the model."""
    import signal

    import torch

    from llmtrain.config import SftConfig
    from llmtrain.loop import Loop, prepare
    from llmtrain.run_dir import Run
    from llmtrain.runtime import make_accelerator

    x = torch.linspace(-1, 1, 32)[:, None]
    y = 3 * x - 0.5
    values = dict(runs_dir=str(runs), run_name="fit", max_steps=8, lr=lr, warmup_steps=0, log_every=2, save_every=0)
    cfg = SftConfig(**{**values, "schedule": "constant", **overrides})
    accelerator = make_accelerator(cfg)
    run = Run.open(cfg, "sft", "linear", accelerator)
    if parent is not None:
        run.pin_parent("init", parent.name, str(parent))
    torch.manual_seed(0)
    model, optimizer, _ = prepare(accelerator, cfg, torch.nn.Linear(1, 1))
    loop = Loop.begin(cfg, accelerator, run, model, optimizer, cfg.max_steps)
    loop.start("a linear fit")
    with loop.training():
        for _ in loop.steps():
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            if loop.step + 1 in nan_grads_at:  # an overflow in the backward pass
                model.weight.grad[0, 0] = float("nan")
            loop.optimizer_step()
            if loop.step + 1 == stop_at:  # as if a scheduler stopped the job during this step
                os.kill(os.getpid(), signal.SIGTERM)
            poison = float("nan") if loop.step + 1 == nan_loss_at else 1.0
            totals = loop.reduce(loss.detach()[None] * poison, tokens=len(x))
            if totals is not None:
                loop.log({"train_loss": totals[0]})
            if val_losses and loop.step in val_losses and loop.step < loop.total_steps:
                loop.evaluated({"val_loss": val_losses[loop.step]}, {"val_loss": loss.item()})
                if weights_at is not None:
                    weights_at[loop.step] = model.weight.item()
            loop.checkpoint()
        if val_losses:
            loop.evaluated({"val_loss": val_losses[loop.step]}, {"val_loss": loss.item()})
            if weights_at is not None:
                weights_at[loop.step] = model.weight.item()
            loop.restore_best()
        if stop_in_final:  # as if a scheduler stopped the job during the final evaluation or save
            os.kill(os.getpid(), signal.SIGTERM)
        torch.save(model.state_dict(), run.path / "weights.pt")  # as a stage saves its model before the finish
        loop.finish({}, {"loss": ["train_loss"]}, "fitted")
    return run, model


# ---------------------------------------------------------------- every stage, a few steps

# The first steps of each stage (PPO's two cost the others' three) on a few rows, with a checkpoint after the
# next-to-last step that holds the optimizer state. Evaluation is not what is compared: few held-out rows.
STEPS = {"pretrain": 3, "sft": 3, "reward": 3, "dpo": 3, "ppo": 2}
ROWS, HELD_OUT = 64, 32


def few_steps_config(stage: str, request, held_out: Path, **overrides):
    """A few steps of `stage` on the shared tiny runs, saving a checkpoint before the last step; `held_out`, the
    folder of the `held_out` fixture."""
    common = dict(max_steps=STEPS[stage], save_every=STEPS[stage] - 1, **overrides)
    if stage == "pretrain":
        runs = request.getfixturevalue("tmp_path_factory").mktemp("runs")
        corpus = request.getfixturevalue("small_corpus")
        return tiny_config(runs, corpus, eval_every=0, num_samples=1, sample_tokens=4, **common)
    runs = request.getfixturevalue("sft_run").parent
    tuned = dict(task_eval_rows=0, max_rows=ROWS, **common)  # no answers sampled for task accuracy
    if stage == "sft":
        return tiny_sft_config(runs, eval_data=str(held_out / "sft_val.jsonl"), **tuned)
    pairs = dict(eval_data=str(held_out / "prefs_val.jsonl"), max_rows=ROWS, **common)
    if stage == "reward":
        return reward_config(runs, **pairs)
    if stage == "dpo":
        return tiny_dpo_config(runs, **pairs, task_eval_rows=0)
    # The toy reward function and a value head on the policy: the cheapest PPO.
    prompts = dict(eval_data=str(held_out / "prompts_val.jsonl"), batch_size=8, num_mini_batches=2, ppo_epochs=2)
    return tiny_ppo_config(runs, value_model="head", **prompts, **tuned)


def stage_runners() -> dict:
    """Each stage's `run(config)`, by name."""
    from llmtrain.stages import dpo, ppo, pretrain, reward, sft

    return {"pretrain": pretrain.run, "sft": sft.run, "reward": reward.run, "dpo": dpo.run, "ppo": ppo.run}
