"""The stages in order on one registry: tokenizer -> pretrain -> sft -> reward -> dpo -> ppo, with one table.

A pipeline recipe is a YAML file with one section per stage (`tokenizer:`, `pretrain:`, `sft:`,
`reward:`, `dpo:`, `ppo:`), each holding that stage's config keys (`config: FILE` in a section reads a
stage recipe first; the section's other keys override it). Runs are named `<name>-<stage>` and
each stage starts from the runs before it (SFT from the pretrain run; the reward model, DPO and PPO
from the SFT run; DPO judged by the reward model, PPO rewarded by it). A stage whose run is finished is
skipped unless it, or a stage it depends on, is run again (`--redo`), so an interrupted pipeline
continues where it stopped.

`--seeds 0,1,2` runs the whole pipeline once per seed, every stage at that seed (runs `<name>-s<seed>-<stage>`, one
shared tokenizer), and ends with a second table: each stage's test headline as mean ± std over the seeds and its gains
as paired differences with bootstrap intervals (`llmtrain.seeds`), also written to `<runs_dir>/<name>-seeds.json` and
`.md`. `--control` adds the same-seed control: SFT continued from the SFT run for one more epoch (`<name>-control`,
or `<name>-s<seed>-control`), the base DPO's and PPO's gains are measured against besides their SFT parent.

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
from llmtrain.seeds import CONTROL, write_seeds_report

# Each trained stage, the stages whose runs it reads, and the config keys that name those runs.
INPUTS: dict[str, dict[str, str]] = {
    "pretrain": {},
    "sft": {"init": "pretrain"},
    "reward": {"init": "sft"},
    "dpo": {"init": "sft", "judge": "reward"},
    "ppo": {"init": "sft", "reward_model": "reward"},
}
STAGES = ("tokenizer", *INPUTS)
# The control: the SFT run trained one more epoch, at the same seed ("same time, more SFT"), the base a preference-
# tuning gain is measured against besides its SFT parent. It never uploads: it is a yardstick, not a result.
CONTROL_KEYS: dict[str, Any] = {"epochs": 1, "push_to_hub": False}


@dataclass
class StageResult:
    stage: str
    run: str
    headline: str
    seconds: float
    skipped: bool


def run_pipeline(
    runs_dir: str,
    name: str,
    recipe: dict[str, Any],
    redo: set[str],
    seeds: list[int] | None = None,
    control: bool = False,
) -> list[StageResult]:
    """Run (or skip) each stage in order and return one row per stage; with `seeds`, the whole pipeline once per
    seed (runs `<name>-s<seed>-<stage>`, one shared tokenizer), and with `control` the more-SFT control too."""
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
    stages = stage_inputs(model, control)
    # Every config is read before anything runs, so a typo in the last section fails in the first second.
    plans = [plan_stages(runs_dir, name, recipe, model, stages, seed) for seed in (seeds or [None])]
    _check_pushes(plans, seeds)
    results: list[StageResult] = []
    if not model:
        redo = _tokenizer_stage([configs["pretrain"] for configs in plans], runs_dir, name, recipe, redo, results)
    for configs in plans:
        results += _run_stages(configs, stages, redo)
    return results


def stage_inputs(model: str | None, control: bool) -> dict[str, dict[str, str]]:
    """The stages a pipeline trains, in order, each with the config keys that name the runs it reads: no pretraining
    when it starts from a `model`, and the control (more SFT from the SFT run) right after SFT when asked."""
    stages: dict[str, dict[str, str]] = {}
    for stage, inputs in INPUTS.items():
        if not (model and stage == "pretrain"):
            stages[stage] = inputs
        if stage == "sft" and control:
            stages[CONTROL] = {"init": "sft"}
    return stages


def plan_stages(
    runs_dir: str,
    name: str,
    recipe: dict[str, Any],
    model: str | None,
    stages: dict[str, dict[str, str]],
    seed: int | None,
) -> dict[str, Any]:
    """Every stage's config for one pass of the pipeline (one seed's pass with `seed`: its runs are named
    `<name>-s<seed>-<stage>` and every stage's seed is that seed). The control reads the sft section."""
    prefix = name if seed is None else f"{name}-s{seed}"

    def run_of(source: str) -> str:
        return model if source == "pretrain" and model else f"{prefix}-{source}"

    configs = {}
    for stage, inputs in stages.items():
        kind = stage_kind(stage)
        values = {
            **_section(recipe, kind),
            **{key: run_of(source) for key, source in inputs.items()},
            **({"seed": seed} if seed is not None else {}),
            **(CONTROL_KEYS if stage == CONTROL else {}),
            "runs_dir": runs_dir,
            "run_name": f"{prefix}-{stage}",
        }
        where = f"the pipeline's {kind} section" + (" (read for the control run)" if stage == CONTROL else "")
        configs[stage] = config_from_dict(STAGE_CONFIGS[kind], values, where)
    return configs


def _check_pushes(plans: list[dict[str, Any]], seeds: list[int] | None) -> None:
    """Before anything runs: each upload a section asks for can happen, and a seeds pipeline asks for none (every
    seed's run would go to one repository)."""
    for configs in plans:
        for stage, cfg in configs.items():
            if seeds and cfg.push_to_hub:
                raise LLMTrainError(
                    f"push_to_hub: true in the pipeline's {stage} section with --seeds {','.join(map(str, seeds))} "
                    f"would upload every seed's {stage} run to the same repository ({cfg.hub_repo_id}). Remove it, "
                    "and upload the run you choose afterwards with `llmtrain push RUN --repo_id user/name`."
                )
            check_push_config(cfg)


def stage_kind(stage: str) -> str:
    """The stage module that trains a pipeline stage: the control is an SFT run."""
    return "sft" if stage == CONTROL else stage


def _run_stages(configs: dict[str, Any], stages: dict[str, dict[str, str]], redo: set[str]) -> list[StageResult]:
    """One pass of the trained stages in order; a stage built on a run that was just made again is made again too."""
    results: list[StageResult] = []
    for stage, inputs in stages.items():
        if redo & set(inputs.values()):
            redo = redo | {stage}
        results.append(_run_stage(stage, configs[stage], redo))
        if not results[-1].skipped:
            redo = redo | {stage}
    return results


def _tokenizer_stage(
    pretrain_cfgs: list[PretrainConfig],
    runs_dir: str,
    name: str,
    recipe: dict[str, Any],
    redo: set[str],
    results: list,
) -> set[str]:
    """Train the tokenizer on the pretraining corpus (a folder beside the runs) unless it exists, once for every
    seed's pretraining; the stages to run again come back (a new tokenizer invalidates the runs built on the old)."""
    tok_dir = Path(runs_dir) / f"{name}-tokenizer"
    pretrain_cfg = pretrain_cfgs[0]
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
    for cfg in pretrain_cfgs:
        cfg.tokenizer = str(tok_dir)
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
    module = __import__(f"llmtrain.stages.{stage_kind(stage)}", fromlist=["run"])
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


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` as a list of distinct seeds."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or not all(0 <= s < 2**32 for s in seeds):
        raise LLMTrainError(
            f"--seeds {text}: give distinct whole numbers from 0 to 2**32 - 1, separated by commas, e.g. --seeds 0,1,2."
        )
    return seeds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    parser.add_argument("--config", help="pipeline recipe (YAML with one section per stage)")
    parser.add_argument("--runs_dir", default=None)
    parser.add_argument("--name", default="pipeline", help="prefix of the run names")
    parser.add_argument("--redo", default="", help="comma-separated stages to run again, or 'all'")
    parser.add_argument("--seeds", default=None, help="run the whole pipeline once per seed, e.g. 0,1,2")
    parser.add_argument("--control", action="store_true", help="add the control: one more epoch of SFT on the SFT run")
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
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    redo = {s.strip() for s in args.redo.split(",") if s.strip()}
    names = (*STAGES, CONTROL) if args.control else STAGES
    bad = redo - set(names) - {"all"}
    if bad:
        raise LLMTrainError(f"--redo {','.join(sorted(bad))}: not a stage. Stages: {', '.join(names)}, or all.")
    runs_dir = args.runs_dir or default_runs_dir()
    results = run_pipeline(runs_dir, args.name, recipe, redo, seeds, args.control)
    print("\n" + format_table(results))
    if seeds:
        parents = {
            stage: inputs.get("init") for stage, inputs in stage_inputs(recipe.get("model"), args.control).items()
        }
        print("\n" + write_seeds_report(runs_dir, args.name, seeds, parents))
    return 0
