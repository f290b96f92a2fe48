"""The stages in order on one registry: tokenizer -> pretrain -> sft -> reward -> dpo -> ppo, with one table.

A pipeline recipe is a YAML file with one section per stage (`tokenizer:`, `pretrain:`, `sft:`,
`reward:`, `dpo:`, `ppo:`), each holding that stage's config keys (`config: FILE` in a section reads a
stage recipe first; the section's other keys override it). Runs are named `<name>-<stage>` and
each stage starts from the runs before it (SFT from the pretrain run; the reward model, DPO and PPO
from the SFT run; DPO judged by the reward model, PPO rewarded by it). A stage whose run is finished is
skipped unless it, or a stage it depends on, is run again (`--redo`), so an interrupted pipeline
continues where it stopped.

A recipe with a top-level `model:` (a Hub id, a local checkpoint or a run) starts from that trained
model instead: no tokenizer or pretraining; SFT tunes it with its own tokenizer and chat template.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmtrain.config import (
    RUN_NAME,
    RUN_NAME_RULE,
    STAGE_CONFIGS,
    PretrainConfig,
    config_from_dict,
    default_runs_dir,
    load_yaml,
)
from llmtrain.errors import LLMTrainError
from llmtrain.hub import check_push_config, push_run
from llmtrain.registry import headline, read_manifest

# Each trained stage, the stages whose runs it reads, and the config keys that name those runs.
INPUTS: dict[str, dict[str, str]] = {
    "pretrain": {},
    "sft": {"init": "pretrain"},
    "reward": {"init": "sft"},
    "dpo": {"init": "sft", "judge": "reward"},
    "ppo": {"init": "sft", "reward_model": "reward"},
}
STAGES = ("tokenizer", *INPUTS)


@dataclass
class StageResult:
    stage: str
    run: str
    headline: str
    seconds: float
    skipped: bool


def run_pipeline(runs_dir: str, name: str, recipe: dict[str, Any], redo: set[str]) -> list[StageResult]:
    """Run (or skip) each stage in order and return one row per stage."""
    recipe = dict(recipe)
    model = recipe.pop("model", None)
    unknown = set(recipe) - set(STAGES)
    if unknown:
        raise LLMTrainError(
            f"Unknown pipeline section(s) {sorted(unknown)}; the sections are {', '.join(STAGES)} (and model:)."
        )
    if model and {"tokenizer", "pretrain"} & set(recipe):
        raise LLMTrainError(
            f"The pipeline recipe starts from model: {model}, so it has no tokenizer or pretrain stage; remove the "
            "tokenizer: and pretrain: sections (or remove model: to pretrain a model of your own)."
        )
    stages = {stage: inputs for stage, inputs in INPUTS.items() if not (model and stage == "pretrain")}

    def run_of(source: str) -> str:
        return model if source == "pretrain" and model else f"{name}-{source}"

    # Every config is read before anything runs, so a typo in the last section fails in the first second.
    configs = {
        stage: config_from_dict(
            STAGE_CONFIGS[stage],
            {
                **_section(recipe, stage),
                **{key: run_of(source) for key, source in inputs.items()},
                "runs_dir": runs_dir,
                "run_name": f"{name}-{stage}",
            },
            f"the pipeline's {stage} section",
        )
        for stage, inputs in stages.items()
    }
    for cfg in configs.values():
        check_push_config(cfg)
    results: list[StageResult] = []
    if not model:
        redo = _tokenizer_stage(configs["pretrain"], runs_dir, name, recipe, redo, results)
    for stage, inputs in stages.items():
        if redo & set(inputs.values()):
            redo = redo | {stage}  # a stage built on a run that was just made again is made again too
        results.append(_run_stage(stage, configs[stage], redo))
        if not results[-1].skipped:
            redo = redo | {stage}
    return results


def _tokenizer_stage(
    pretrain_cfg: PretrainConfig, runs_dir: str, name: str, recipe: dict[str, Any], redo: set[str], results: list
) -> set[str]:
    """Train the tokenizer on the pretraining corpus (a folder beside the runs) unless it exists; the stages to
    run again come back (a new tokenizer invalidates the runs built on the old one)."""
    tok_dir = Path(runs_dir) / f"{name}-tokenizer"
    tok_opts = {"vocab_size": pretrain_cfg.vocab_size, **recipe.get("tokenizer", {})}
    if not (tok_dir / "tokenizer.json").is_file() or redo & {"tokenizer", "all"}:
        t0 = time.perf_counter()
        _train_tokenizer(pretrain_cfg, tok_dir, tok_opts)
        results.append(
            StageResult("tokenizer", tok_dir.name, f"vocab={tok_opts['vocab_size']}", time.perf_counter() - t0, False)
        )
        redo = redo | {"pretrain"}
    else:
        results.append(StageResult("tokenizer", tok_dir.name, f"vocab={tok_opts['vocab_size']}", 0.0, True))
    pretrain_cfg.tokenizer = str(tok_dir)
    return redo


def _section(recipe: dict[str, Any], stage: str) -> dict[str, Any]:
    """A stage's keys: those of the stage recipe its `config:` names (if any), then the section's own."""
    section = dict(recipe.get(stage) or {})
    if "config" in section:
        return {**load_yaml(section.pop("config"), STAGE_CONFIGS[stage]), **section}
    return section


def _run_stage(stage: str, cfg: Any, redo: set[str]) -> StageResult:
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    finished = (run_dir / "llmtrain.json").is_file() and read_manifest(run_dir).get("status") == "finished"
    if finished and not redo & {stage, "all"}:
        return StageResult(stage, cfg.run_name, headline(read_manifest(run_dir)), 0.0, True)
    cfg.overwrite = finished
    module = __import__(f"llmtrain.stages.{stage}", fromlist=["run"])
    t0 = time.perf_counter()
    module.run(cfg)
    if cfg.push_to_hub:
        push_run(run_dir, cfg.hub_repo_id, cfg.hub_private)
    return StageResult(stage, cfg.run_name, headline(read_manifest(run_dir)), time.perf_counter() - t0, False)


def _train_tokenizer(cfg: PretrainConfig, out: Path, opts: dict[str, Any]) -> None:
    from llmtrain.data.corpus import documents_for_tokenizer, load_documents, resolve_corpus
    from llmtrain.runtime import cache_dir
    from llmtrain.tokenizer import save_tokenizer, train_tokenizer

    source = resolve_corpus(cfg.data, cache_dir(cfg.cache_dir))
    docs = load_documents(
        source, cfg.text_field, cfg.dataset_config, cfg.dataset_split, cfg.streaming, cfg.max_documents
    )
    chars = opts.get("tokenizer_train_chars", cfg.tokenizer_train_chars)
    tokenizer = train_tokenizer(documents_for_tokenizer(docs, chars), opts["vocab_size"], cfg.seq_len)
    save_tokenizer(tokenizer, out)


def format_table(results: list[StageResult]) -> str:
    rows = [("stage", "run", "headline metric", "time")]
    for r in results:
        rows.append((r.stage, r.run, r.headline, "skipped (exists)" if r.skipped else f"{r.seconds:.0f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    parser.add_argument("--config", help="pipeline recipe (YAML with one section per stage)")
    parser.add_argument("--runs_dir", default=None)
    parser.add_argument("--name", default="pipeline", help="prefix of the run names")
    parser.add_argument("--redo", default="", help="comma-separated stages to run again, or 'all'")
    args = parser.parse_args(argv)
    recipe: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise LLMTrainError(f"Pipeline recipe {path} does not exist.")
        recipe = yaml.safe_load(path.read_text()) or {}
    if not RUN_NAME.fullmatch(f"{args.name}-tokenizer"):  # the longest name the pipeline gives a run
        raise LLMTrainError(
            f"--name {args.name!r}: the pipeline names its runs {args.name}-<stage>, and a run name is one folder "
            f"inside --runs_dir, named with {RUN_NAME_RULE}. Choose a --name of those characters (to keep the runs "
            "in another folder, set --runs_dir)."
        )
    redo = {s.strip() for s in args.redo.split(",") if s.strip()}
    bad = redo - set(STAGES) - {"all"}
    if bad:
        raise LLMTrainError(f"--redo {','.join(sorted(bad))}: not a stage. Stages: {', '.join(STAGES)}, or all.")
    results = run_pipeline(args.runs_dir or default_runs_dir(), args.name, recipe, redo)
    print("\n" + format_table(results))
    return 0
