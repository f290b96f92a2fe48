"""Shared fixtures: an isolated cache and registry, a small corpus, and one finished tiny run."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach the Hub: fail fast on Hub ids instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import REPO, reward_config, tiny_config, tiny_sft_config  # noqa: E402

# Two threads, or as many as OMP_NUM_THREADS asks for: the suite must hold at any thread count (the arithmetic, and
# so every trained value, changes with it).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine were 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Token shards and tokenizers go to a per-session folder, never to ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["LLMTRAIN_CACHE"] = str(cache)
    os.environ.pop("LLMTRAIN_RUNS_DIR", None)
    return cache


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 600 documents of the embedded corpus: enough to learn something in seconds."""
    docs = (REPO / "data" / "corpus.txt").read_text().split("\n\n")[:600]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, small_corpus) -> Path:
    """One finished gpt-nano pretraining run, shared by the tests that only read it."""
    from llmtrain.stages import pretrain

    runs = tmp_path_factory.mktemp("runs")
    return pretrain.run(tiny_config(runs, small_corpus, run_name="tiny", max_steps=60, seq_len=64))


@pytest.fixture(scope="session")
def sft_run(finished_run) -> Path:
    """One finished SFT run of `tiny`, shared by the SFT and reward tests."""
    from llmtrain.stages import sft

    return sft.run(tiny_sft_config(finished_run.parent, run_name="sft-tiny"))


@pytest.fixture(scope="session")
def taught_run(finished_run, tmp_path_factory) -> Path:
    """`tiny` tuned on the eight taught sums until it answers them all (150 steps, four seeds: 0 before, 1.0 after),
    evaluated on them: a model with a task accuracy to lose."""
    from helpers import write_taught_sums

    from llmtrain.stages import sft

    data = write_taught_sums(tmp_path_factory.mktemp("taught") / "sums.jsonl", "sft")
    taught = dict(data=str(data), eval_data=str(data), batch_size=8, max_steps=150, lr=1e-2)
    return sft.run(tiny_sft_config(finished_run.parent, run_name="taught", **taught))


@pytest.fixture(scope="session")
def reward_run(sft_run) -> Path:
    """One finished reward model on `sft-tiny`, shared by the reward, DPO and PPO tests."""
    from llmtrain.stages import reward

    return reward.run(reward_config(sft_run.parent, run_name="rm-tiny"))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of real Hugging Face families with their published tokenizers and chat templates."""
    from families import build_all  # tests/ is on sys.path under pytest's rootdir conftest

    return build_all(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def held_out(tmp_path_factory) -> Path:
    """The first rows of each default held-out file, so that a run's evaluation takes little time."""
    from helpers import HELD_OUT, REPO

    folder = tmp_path_factory.mktemp("held-out")
    for name in ("sft_val", "prefs_val", "prompts_val"):
        rows = (REPO / "data" / f"{name}.jsonl").read_text().splitlines()[:HELD_OUT]
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return folder
