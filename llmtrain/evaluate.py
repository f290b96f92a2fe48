"""Evaluation: held-out loss and bits per byte, task accuracy, a reward model's pairwise accuracy, and the win rate
of one policy over another."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmtrain.data.windows import TokenWindows
from llmtrain.distributed import prepare_frozen, process_share


@torch.no_grad()
def evaluate_lm(
    model, windows: TokenWindows, token_bytes: torch.Tensor, batch_size: int, max_batches: int, accelerator
) -> dict[str, float]:
    """Mean next-token loss and bits per byte over fixed held-out windows, reduced across processes.

    Bits per byte sums the loss (in nats) over targets that stand for text and divides by the
    UTF-8 bytes of those targets, so it compares models with different tokenizers.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, tokens, text loss, bytes
    # The same windows whatever the number of processes: eval_batches global batches.
    n = min(windows.n_windows, batch_size * max_batches * accelerator.num_processes)
    mine, own = process_share(n, accelerator)
    for i in range(0, len(mine), batch_size):
        x, y = windows.windows_at(mine[i : i + batch_size], accelerator.device)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        loss = loss[: max(0, own - i)].flatten()  # the padding windows of a short share count for nothing
        nbytes = token_bytes[y[: max(0, own - i)].flatten()]
        sums += torch.stack(
            [loss.sum(), torch.tensor(loss.numel(), device=loss.device), (loss * (nbytes > 0)).sum(), nbytes.sum()]
        ).double()
    sums = accelerator.reduce(sums, reduction="sum")
    if was_training:
        model.train()
    loss_sum, n_tokens, text_loss, n_bytes = sums.tolist()
    return {
        "val_loss": loss_sum / max(n_tokens, 1),
        "val_bpb": text_loss / (math.log(2) * n_bytes) if n_bytes else float("nan"),
    }


Checker = Callable[[str, str], bool]


def resolve_checker(task: str, prompts: list[str]) -> Checker | None:
    """The answer checker for task_accuracy: 'auto' uses the default task's when every prompt is one of its
    questions, 'none' disables it, 'module:function' imports a function (prompt, response) -> bool."""
    from llmtrain.data import default_task
    from llmtrain.errors import LLMTrainError

    if task == "none" or not prompts:
        return None
    if task == "auto":
        try:
            for prompt in prompts:
                default_task.parse_prompt(prompt)
        except ValueError:
            return None
        return default_task.check_answer
    module_name, _, func_name = task.partition(":")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise LLMTrainError(
            f"--task {task}: could not import the checker ({e}). Give 'auto', 'none' or 'module:function' "
            f"naming a function (prompt: str, response: str) -> bool."
        ) from None


@torch.no_grad()
def chat_eval_loss(model, examples, pad_id: int, batch_size: int, accelerator) -> float:
    """Mean loss over the trained (assistant) tokens of held-out chat examples, across processes."""
    from llmtrain.data.chat import collate_padded, masked_lm_loss

    was_training = model.training
    model.eval()
    world = accelerator.num_processes
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine, own = process_share(len(examples), accelerator)
    for i in range(0, len(mine), batch_size):
        chunk = [examples[j] for j in mine[i : i + batch_size]]
        batch = {k: v.to(accelerator.device) for k, v in collate_padded(chunk, pad_id).items()}
        labels = batch.pop("labels")
        labels[max(0, own - i) :] = -100  # the padding examples of a short share count for nothing
        summed, count = masked_lm_loss(model(**batch, use_cache=False).logits, labels)
        sums += torch.stack([summed.double(), count.double()])
    sums = accelerator.reduce(sums, reduction="sum") if world > 1 else sums
    if was_training:
        model.train()
    return (sums[0] / sums[1].clamp(min=1)).item()


def evaluate_answers(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int,
    accelerator,
    checker: Checker | None = None,
    reward=None,
    show: int = 0,
) -> tuple[dict[str, float], list[str]]:
    """Greedy answers to held-out prompts, split across processes and gathered in order: their task accuracy
    when a checker applies, their mean score when a reward source is given (`val_reward`), and the replies.
    Prints the first `show` of them."""
    from accelerate.utils import gather_object

    from llmtrain.data.prompts import question_of
    from llmtrain.generate import chat_replies

    if not prompts:
        return {}, []
    mine, own = process_share(len(prompts), accelerator)
    replies = chat_replies(model, tokenizer, [prompts[i] for i in mine], max_new_tokens, greedy=True)
    scores = [0.0] * len(replies)
    if reward is not None:
        with accelerator.autocast():
            scores = reward.score_texts([prompts[i] for i in mine], replies)
    rows = list(zip(mine, replies, scores))[:own]
    rows = sorted(gather_object(rows) if accelerator.num_processes > 1 else rows)
    metrics, notes = {}, [""] * len(rows)
    if reward is not None:
        metrics["val_reward"] = sum(s for *_, s in rows) / len(rows)
        notes = [f" (reward {s:.3f})" for *_, s in rows]
    if checker is not None:
        ok = [bool(checker(question_of(prompts[i]), reply)) for i, reply, _ in rows]
        metrics["task_accuracy"] = sum(ok) / len(ok)
        notes = [(" correct" if good else " wrong") + note for good, note in zip(ok, notes)]
    if show and accelerator.is_main_process:
        print("samples (held-out prompts, greedy):")
        for (i, reply, _), note in list(zip(rows, notes))[:show]:
            print(f"  {question_of(prompts[i])!r} -> {reply!r}{note}")
    return metrics, [reply for _, reply, _ in rows]


def item_scores(
    prompts: list[list[dict]], replies: list[str], parent_replies: list[str], checker: Checker
) -> list[dict[str, float | str]]:
    """Each prompt's correctness for the result and for the parent, keyed by its question: what a paired comparison
    of two runs on the same test set (over questions and seeds) reads."""
    from llmtrain.data.prompts import question_of

    rows = []
    for prompt, ours, theirs in zip(prompts, replies, parent_replies):
        question = question_of(prompt)
        rows.append(
            {
                "item": question,
                "score": float(bool(checker(question, ours))),
                "parent_score": float(bool(checker(question, theirs))),
            }
        )
    return rows


def evaluate_chat_model(
    spec: str,
    runs_dir: str,
    data: str = "default",
    task: str = "auto",
    max_rows: int | None = None,
    max_length: int = 512,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Evaluate any run or checkpoint on held-out chat data: assistant-token loss and task accuracy."""
    from accelerate import Accelerator

    from llmtrain.data.chat import load_chat_rows, tokenize_dataset
    from llmtrain.data.corpus import default_data_dir
    from llmtrain.generate import load_for_generation
    from llmtrain.runtime import cache_dir

    model, tokenizer = load_for_generation(spec, runs_dir, trust_remote_code=trust_remote_code, command="eval")
    if data == "default":
        data = str(default_data_dir(cache_dir()) / "sft_val.jsonl")
    rows = load_chat_rows(data, max_rows=max_rows)
    examples, _ = tokenize_dataset(tokenizer, rows, max_length)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    metrics = {"val_loss": chat_eval_loss(model, examples, tokenizer.pad_token_id, batch_size, accelerator)}
    prompts = [m[:1] for m in rows if len(m) == 2 and m[0]["role"] == "user"]
    checker = resolve_checker(task, [p[0]["content"] for p in prompts])
    if checker is not None:
        metrics |= evaluate_answers(model, tokenizer, prompts, max_new_tokens, accelerator, checker)[0]
    return metrics


def evaluate_run(
    spec: str,
    runs_dir: str,
    data: str = "default",
    task: str = "auto",
    max_rows: int | None = None,
    max_new_tokens: int = 24,
    trust_remote_code: bool = False,
) -> dict[str, float | str]:
    """`llmtrain eval`: a language model on held-out chat data (`evaluate_chat_model`), a reward model on held-out
    preference pairs (`evaluate_reward_model`), each with its own default data."""
    from llmtrain.registry import hub_snapshot, is_reward_model, resolve_model

    source = resolve_model(spec, runs_dir)
    if source.kind != "preset":  # a preset is refused as untrained where the model is loaded
        source = hub_snapshot(source, runs_dir, "model")
        if is_reward_model(source):
            metrics = evaluate_reward_model(source, data, max_rows, trust_remote_code=trust_remote_code)
            return {"evaluated_as": "reward model", **metrics}
        spec = source.path if source.kind == "hub" else spec  # the revision's folder: fetched once
    return evaluate_chat_model(
        spec, runs_dir, data, task, max_rows, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code
    )


def evaluate_reward_model(
    source,
    data: str = "default",
    max_rows: int | None = None,
    max_length: int = 512,
    batch_size: int = 32,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """A reward model on held-out preference pairs (default: the task's prefs_val.jsonl): pairwise accuracy (the
    chosen answer scored above the rejected one) and the Bradley-Terry loss, as the reward stage measures them."""
    from accelerate import Accelerator

    from llmtrain.data.corpus import default_data_dir
    from llmtrain.data.preferences import load_preference_pairs, tokenize_pairs
    from llmtrain.models import load_reward_model
    from llmtrain.runtime import cache_dir
    from llmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source.path, trust_remote_code=trust_remote_code)
    model = load_reward_model(source.path, tokenizer, source.spec, trust_remote_code=trust_remote_code)
    if data == "default":
        data = str(default_data_dir(cache_dir()) / "prefs_val.jsonl")
    pairs, _ = tokenize_pairs(tokenizer, load_preference_pairs(data, max_rows=max_rows), max_length, data)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = model.to(accelerator.device).eval()
    metrics, _ = evaluate_pairs(model, pairs, model.config.pad_token_id, batch_size, accelerator)
    return {**metrics, "pairs": len(pairs)}


@torch.no_grad()
def evaluate_pairs(model, pairs, pad_id: int, batch_size: int, accelerator) -> tuple[dict[str, float], dict]:
    """Held-out Bradley-Terry loss and pairwise accuracy (chosen scored above rejected), plus the scores."""
    from accelerate.utils import gather_object

    from llmtrain.data.preferences import collate_pairs
    from llmtrain.losses import bradley_terry_loss

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


def win_rate(
    judge,
    prompts: list[list[dict]],
    replies: list[str],
    baseline: list[str],
    accelerator,
    trust_remote_code: bool = False,
) -> float:
    """Share of prompts where the judge (a reward model source) scores `replies` above `baseline`; identical
    replies count as a tie (one half). The prompts are split across processes and the verdicts gathered."""
    from accelerate.utils import gather_object

    from llmtrain.models import load_reward_model, score_conversations
    from llmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(judge.path, trust_remote_code=trust_remote_code)
    judge_model = load_reward_model(judge.path, tokenizer, judge.spec, trust_remote_code=trust_remote_code)
    model = prepare_frozen(judge_model, accelerator)
    mine, own = process_share(len(prompts), accelerator)

    def scores(answers: list[str]) -> list[float]:
        conversations = [prompts[i] + [{"role": "assistant", "content": answers[i]}] for i in mine]
        return score_conversations(model, tokenizer, conversations)

    verdicts = [
        0.5 if replies[i] == baseline[i] else float(new > old)
        for i, new, old in zip(mine[:own], scores(replies), scores(baseline))
    ]
    verdicts = gather_object(verdicts) if accelerator.num_processes > 1 else verdicts
    return sum(verdicts) / max(len(verdicts), 1)
