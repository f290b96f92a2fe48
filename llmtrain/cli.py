"""`llmtrain <command>`: run a stage; list, sample from, chat with, evaluate or push runs; train a tokenizer;
prepare a pretraining corpus before a launch."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmtrain.errors import LLMTrainError, RunInterrupted

STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")


def run_stage(stage: str, argv: list[str]) -> int:
    """Parse a stage's config from `argv`, run it, and turn user errors into a message and an exit code."""
    _stop_cleanly_on_signals()
    try:
        from llmtrain.config import STAGE_CONFIGS, parse_config

        cfg = parse_config(STAGE_CONFIGS[stage], argv)
        from llmtrain.hub import check_push_config

        check_push_config(cfg)  # a push that cannot happen is refused before training, not after
        module = __import__(f"llmtrain.stages.{stage}", fromlist=["run"])
        run_path = module.run(cfg)
    except LLMTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:
        return _stopped_outside_the_steps(e)
    # Under `accelerate launch` every process runs the stage; only global rank 0 uploads.
    if cfg.push_to_hub and int(os.environ.get("RANK", "0")) == 0:
        return _push(run_path, cfg.hub_repo_id, cfg.hub_private)
    return 0


def _push(run_path: Path, repo_id: str, private: bool, license: str | None = None, dry_run: bool = False) -> int:
    """Stage and upload a finished run (or only stage it), printing the listing and where it went."""
    from llmtrain.hub import DEFAULT_LICENSE, push_run

    try:
        result = push_run(run_path, repo_id, private, license or DEFAULT_LICENSE, dry_run=dry_run)
    except LLMTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dry_run:
        print(f"Dry run: this folder is what `llmtrain push` would upload to {repo_id}: {result['staged']}")
        print(result["listing"])
    else:
        print(f"Uploaded {run_path.name} to {result['url']} (commit {result['commit']}):")
        print(result["listing"])
    return 0


def run_pipeline(argv: list[str]) -> int:
    """`llmtrain pipeline` / recipes/pipeline.py: the stages in order, one table at the end."""
    from llmtrain import pipeline

    _stop_cleanly_on_signals()
    try:
        return pipeline.main(argv)
    except LLMTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:
        return _stopped_outside_the_steps(e)


def _stop_cleanly_on_signals() -> None:
    """SIGTERM outside the training steps (which checkpoint on it) stops like Ctrl-C: a message, no traceback; and
    under `accelerate launch` a signal that ends the launcher reaches this process too."""
    import signal

    from llmtrain.runtime import stop_with_the_launcher

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signum)

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals keep their default
        pass
    stop_with_the_launcher()


def _stopped_outside_the_steps(e: KeyboardInterrupt) -> int:
    import signal

    signum = e.args[0] if e.args else signal.SIGINT
    print(
        f"Stopped by {signal.Signals(signum).name} outside the training steps; no trained step was lost. A run that "
        "had started resumes from its last checkpoint with the same command plus --run_name NAME.",
        file=sys.stderr,
    )
    return 128 + signum


def run_prepare(argv: list[str]) -> int:
    """`llmtrain prepare`: tokenize a pretraining corpus into the cached shards that `pretrain` with the same options
    reads, once, before a launch, in parallel over this machine's cores (--num_proc). Takes pretrain's options."""
    import time

    from llmtrain.config import PretrainConfig, parse_config
    from llmtrain.data.corpus import prepare_pretrain_data
    from llmtrain.registry import resolve_model
    from llmtrain.runtime import cache_dir

    try:
        cfg = parse_config(PretrainConfig, argv)
        start = time.perf_counter()
        data = prepare_pretrain_data(cfg, resolve_model(cfg.preset, cfg.runs_dir), cache_dir(cfg.cache_dir))
    except LLMTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = f"prepared in {time.perf_counter() - start:.1f} s" if data.prepared_now else "already prepared"
    print(f"Token shards of {cfg.data} ({done}): {data.shards.path}")
    print(f"  {data.shards.stats.describe()}; tokenizer of {len(data.tokenizer)} tokens")
    print("  A pretrain launch with the same data and tokenizer options reads them without tokenizing again.")
    return 0


def _runs_dir(value: str | None) -> str:
    from llmtrain.config import default_runs_dir

    return value or default_runs_dir()


def cmd_runs(args: argparse.Namespace) -> int:
    from llmtrain.registry import format_runs_table, list_runs

    runs = list_runs(_runs_dir(args.runs_dir))
    if not runs:
        print(f"No runs in {_runs_dir(args.runs_dir)} yet. Start one: accelerate launch recipes/pretrain.py")
        return 0
    print(format_runs_table(runs))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from llmtrain.generate import load_for_generation, sample

    model, tokenizer = load_for_generation(
        args.run, _runs_dir(args.runs_dir), trust_remote_code=args.trust_remote_code, command="generate"
    )
    prompts = [args.prompt] * args.num_samples
    outputs = sample(
        model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, greedy=args.greedy
    )
    for out in outputs:
        print(args.prompt + out)
        if args.num_samples > 1:
            print("---")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from llmtrain.evaluate import evaluate_run
    from llmtrain.registry import LM_STAGES, resolve_latest

    runs_dir = _runs_dir(args.runs_dir)
    spec = resolve_latest(args.run, runs_dir, LM_STAGES, "eval")
    metrics = evaluate_run(
        spec,
        runs_dir,
        args.data,
        args.task,
        args.max_rows,
        max_new_tokens=args.max_new_tokens,
        trust_remote_code=args.trust_remote_code,
    )
    run = args.run if spec == args.run else Path(spec).name
    print(json.dumps({"run": run, "data": args.data, **metrics}, indent=2))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from llmtrain.generate import chat_replies, load_for_generation

    model, tokenizer = load_for_generation(
        args.run, _runs_dir(args.runs_dir), trust_remote_code=args.trust_remote_code, command="chat"
    )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"Chatting with {args.run}. An empty line or Ctrl-D ends the chat.", flush=True)
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        sampling = {"greedy": True} if args.temperature == 0 else {"temperature": args.temperature}
        reply = chat_replies(model, tokenizer, [messages], args.max_new_tokens, **sampling)[0]
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from llmtrain.models import load_reward_model, score_conversations
    from llmtrain.registry import resolve_latest, resolve_model
    from llmtrain.tokenizer import load_tokenizer

    runs_dir = _runs_dir(args.runs_dir)
    source = resolve_model(resolve_latest(args.run, runs_dir, ("reward",), "score"), runs_dir)
    if source.kind == "preset":
        raise LLMTrainError(f"'{args.run}' is a preset with untrained weights; give a reward model run.")
    tokenizer = load_tokenizer(source.path, trust_remote_code=args.trust_remote_code)
    model = load_reward_model(source.path, tokenizer, args.run, trust_remote_code=args.trust_remote_code).eval()
    messages = [{"role": "user", "content": args.prompt}, {"role": "assistant", "content": args.response}]
    print(f"{score_conversations(model, tokenizer, [messages])[0]:.4f}")
    return 0


def cmd_show_data(args: argparse.Namespace) -> int:
    from llmtrain.data.show import show_data
    from llmtrain.registry import resolve_model
    from llmtrain.tokenizer import load_tokenizer

    source = resolve_model(args.model, _runs_dir(args.runs_dir))
    tokenizer = load_tokenizer(source.path or args.model, args.chat_template)
    show_data(tokenizer, args.data, args.kind, args.rows, args.max_rows, args.max_length)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from llmtrain.hub import find_run

    run_path = find_run(args.run, _runs_dir(args.runs_dir))
    return _push(run_path, args.repo_id, args.private, args.license, args.dry_run)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from llmtrain.data.corpus import documents_for_tokenizer, load_documents, resolve_corpus
    from llmtrain.runtime import cache_dir
    from llmtrain.tokenizer import save_tokenizer, train_tokenizer

    cache = cache_dir()
    docs = load_documents(resolve_corpus(args.data, cache), text_field=args.text_field)
    tokenizer = train_tokenizer(documents_for_tokenizer(docs), args.vocab_size, args.model_max_length)
    save_tokenizer(tokenizer, args.out)
    print(f"Trained a {len(tokenizer)}-token byte-level BPE on {args.data}; saved to {Path(args.out).resolve()}")
    return 0


def _add_trust_remote_code(parser: argparse.ArgumentParser) -> None:
    """The stages' --trust_remote_code for a command that loads a model: bare, or followed by true/false as the
    stages take it (the error that asks for it says `--trust_remote_code true`)."""
    from transformers.hf_argparser import string_to_bool

    from llmtrain.config import TRUST_REMOTE_CODE_HELP

    parser.add_argument(
        "--trust_remote_code", nargs="?", const=True, default=False, type=string_to_bool, help=TRUST_REMOTE_CODE_HELP
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sub.add_parser(stage, help=f"run the {stage} stage (same flags as recipes/{stage}.py)", add_help=False)

    sub.add_parser(
        "pipeline",
        help="tokenizer -> pretrain -> sft -> reward -> dpo -> ppo in order (see recipes/pipeline.py)",
        add_help=False,
    )
    sub.add_parser(
        "prepare",
        help="tokenize a pretraining corpus into cached shards before a launch (same flags as pretrain)",
        add_help=False,
    )

    p = sub.add_parser("runs", help="list the runs in the registry")
    p.add_argument("--runs_dir", default=None)
    p.set_defaults(func=cmd_runs)

    lm_run = "run name, run folder or HF checkpoint; latest: the newest finished pretrain, sft, dpo or ppo run"
    p = sub.add_parser("generate", help="sample text from a run")
    p.add_argument("run", help=lm_run)
    p.add_argument("--prompt", default="")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--runs_dir", default=None)
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval",
        help="evaluate a run: a language model on held-out chat data (loss and task accuracy), a reward model on "
        "held-out preference pairs (pairwise accuracy)",
    )
    p.add_argument("run", help=lm_run + " (a reward model is named)")
    p.add_argument(
        "--data",
        default="default",
        help="held-out rows (default: the task's sft_val.jsonl, or prefs_val.jsonl for a reward model)",
    )
    p.add_argument("--task", default="auto", help="answer checker: auto, none or module:function")
    p.add_argument("--max_rows", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--runs_dir", default=None)
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="chat with a run in the terminal, using its chat template")
    p.add_argument("run", help=lm_run)
    p.add_argument("--system", default=None, help="a system message to start the chat with")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--runs_dir", default=None)
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("score", help="the reward a reward-model run gives one answer")
    p.add_argument(
        "run",
        help="reward model run name, run folder or HF sequence-classification checkpoint; latest: the newest "
        "finished reward run",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", required=True)
    p.add_argument("--runs_dir", default=None)
    _add_trust_remote_code(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("show-data", help="show rows as a model sees them, trained tokens marked, and drop counts")
    p.add_argument("model", help="run name, run folder, HF checkpoint or Hub id (its tokenizer and chat template)")
    p.add_argument("--data", required=True, help="chat, preference or prompt rows: a file, a folder or a Hub id")
    p.add_argument("--kind", default="auto", choices=("auto", "sft", "pairs", "prompts"))
    p.add_argument("--chat_template", default="auto", help="auto (the model's own), llmtrain, or a .jinja file")
    p.add_argument("--rows", type=int, default=3, help="rows to print")
    p.add_argument("--max_rows", type=int, default=1000, help="rows to count")
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--runs_dir", default=None)
    p.set_defaults(func=cmd_show_data)

    p = sub.add_parser("push", help="upload a run to the Hugging Face Hub with a generated model card")
    p.add_argument("run", help="finished run name or run folder")
    p.add_argument("--repo_id", required=True, help="Hub repository: user/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--license", default="apache-2.0", help="license field of the model card")
    p.add_argument("--dry_run", action="store_true", help="only write RUN/hub_upload, the folder that would go")
    p.add_argument("--runs_dir", default=None)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    p.add_argument("--data", default="default")
    p.add_argument("--text_field", default="text")
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--model_max_length", type=int, default=2048)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        return run_stage(argv[0], argv[1:])
    if argv and argv[0] == "pipeline":
        return run_pipeline(argv[1:])
    if argv and argv[0] == "prepare":
        return run_prepare(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LLMTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
