"""A user's own model: tiny models of nine real families go through every stage with their templates as shipped.

Each family runs SFT, a reward model, DPO and PPO a few steps on the embedded task, then `eval`,
`generate` and `push --dry_run`; every result reloads with transformers and stops at the end of its
turn. The variants (packed or padded SFT, full or LoRA, PPO on a reward model or a function) are
spread over the families, so each variant runs on several architectures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES
from helpers import logged
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

from llmtrain.cli import main
from llmtrain.config import DpoConfig, PpoConfig, RewardConfig, SftConfig
from llmtrain.data.corpus import REPO_DATA_DIR
from llmtrain.data.template import chat_format
from llmtrain.registry import read_manifest
from llmtrain.stages import dpo, ppo, reward, sft
from llmtrain.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread

STEPS = dict(batch_size=4, max_steps=2, max_length=96, eval_every=0, log_every=1, save_every=0, warmup_steps=0)
POLICY = dict(task_eval_rows=4, max_new_tokens=4, num_samples=0)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, str]:
    """A few rows of each of the embedded task's files, so that every stage runs in about a second."""
    out = tmp_path_factory.mktemp("task")
    sizes = {"sft_train": 24, "sft_val": 8, "prefs_train": 24, "prefs_val": 8, "prompts_train": 8, "prompts_val": 4}
    for name, rows in sizes.items():
        lines = (REPO_DATA_DIR / f"{name}.jsonl").read_text().splitlines()[:rows]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return {name: str(out / f"{name}.jsonl") for name in sizes}


def data(files: dict[str, str], kind: str) -> dict[str, str]:
    return {"data": files[f"{kind}_train"], "eval_data": files[f"{kind}_val"]}


# Between them these three run every variant below; the other six families run in the slow tier.
QUICK_FAMILIES = ("qwen3", "gemma3", "gpt2")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in QUICK_FAMILIES else [pytest.mark.slow]) for n in FAMILIES]
)
def test_a_real_family_goes_through_every_stage_with_its_template_as_shipped(
    name, family_models, task_files, tmp_path, capsys
):
    i, model_dir, runs = FAMILIES.index(name), str(family_models[name]), str(tmp_path)
    tokenizer = load_tokenizer(model_dir)
    end_of_turn = chat_format(tokenizer).end_of_turn_id
    own_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    own_eos = own_eos if isinstance(own_eos, list) else [own_eos]

    packing, lora = i % 2 == 0, i % 3 == 1
    sft_dir = sft.run(
        SftConfig(
            **_common(runs, model_dir, "sft"),
            **POLICY,
            packing=packing,
            lora=lora,
            gradient_checkpointing=True,  # every architecture, packed or padded, full or LoRA
            **data(task_files, "sft"),
        )
    )
    m = read_manifest(sft_dir)
    assert m["status"] == "finished" and m["data"]["unverified"] == 0 and m["data"]["trained_tokens"] > 0
    assert m["metrics"]["val_loss"] < m["metrics"]["parent_val_loss"]
    tuned = AutoModelForCausalLM.from_pretrained(sft_dir)
    stops = tuned.generation_config.eos_token_id
    # The model's own end-of-sequence ids are kept, in order, and the template's end of turn stops generation.
    assert stops[: len(own_eos)] == own_eos and end_of_turn in stops
    assert load_tokenizer(sft_dir).chat_template == tokenizer.chat_template

    rm_dir = reward.run(
        RewardConfig(**_common(runs, "sft", "rm"), gradient_checkpointing=i % 2 == 0, **data(task_files, "prefs"))
    )
    assert read_manifest(rm_dir)["status"] == "finished"
    scorer = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    # Scores are read at the last token that is not padding: an answer's end of turn, never the padding.
    assert scorer.config.num_labels == 1 and scorer.config.pad_token_id != end_of_turn

    adapter = i % 3 == 0  # LoRA, saved as an adapter rather than merged
    dpo_dir = dpo.run(
        DpoConfig(
            **_common(runs, "sft", "dpo"),
            **POLICY,
            judge="rm",
            lora=adapter,
            merge_lora=not adapter,
            **data(task_files, "prefs"),
        )
    )
    # Dropout off in the policy (GPT-2's is 0.1): before the first step it scores exactly as its reference does.
    assert logged(dpo_dir)[1]["margin"] == pytest.approx(0.0, abs=1e-6)
    if adapter:
        from peft import AutoPeftModelForCausalLM

        assert (dpo_dir / "adapter_config.json").is_file()
        assert end_of_turn in AutoPeftModelForCausalLM.from_pretrained(dpo_dir).generation_config.eos_token_id
    else:
        assert end_of_turn in AutoModelForCausalLM.from_pretrained(dpo_dir).generation_config.eos_token_id

    prompts = data(task_files, "prompts")
    ppo_steps = {**_common(runs, "sft", "ppo"), **POLICY, "num_mini_batches": 1, "ppo_epochs": 1}
    ppo_dir = ppo.run(PpoConfig(**ppo_steps, reward_model="rm", lora=i % 2 == 1, **prompts))
    assert read_manifest(ppo_dir)["model"]["reward"]["tokens"] is True
    assert end_of_turn in AutoModelForCausalLM.from_pretrained(ppo_dir).generation_config.eos_token_id
    if i % 3 == 2:
        fn = "llmtrain.data.default_task:answer_reward"
        ppo.run(PpoConfig(**{**ppo_steps, "run_name": "ppo-fn"}, reward_fn=fn, **prompts))

    capsys.readouterr()
    assert main(["eval", "sft", "--data", task_files["sft_val"], "--max_new_tokens", "4", "--runs_dir", runs]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0
    generate = ["generate", "sft", "--prompt", "2 + 2 =", "--max_new_tokens", "4", "--greedy"]
    assert main([*generate, "--runs_dir", runs]) == 0
    assert main(["score", "rm", "--prompt", "What is 2 + 2?", "--response", "4", "--runs_dir", runs]) == 0
    assert main(["push", "sft", "--repo_id", "user/tiny", "--dry_run", "--runs_dir", runs]) == 0
    staged = Path(capsys.readouterr().out.split("upload to user/tiny: ")[1].splitlines()[0])
    assert AutoModelForCausalLM.from_pretrained(staged).config.architectures == tuned.config.architectures


def _common(runs: str, init: str, run_name: str) -> dict:
    return dict(runs_dir=runs, init=init, run_name=run_name, lr=1e-3, **STEPS)


@pytest.mark.parametrize("name", ["smollm2", "llama3.2"])
def test_every_reader_scores_an_answer_at_its_end_of_turn_where_pad_is_eos(name, family_models):
    """Reward training, `llmtrain score` (and so DPO's judge and PPO's val_reward) and PPO's rollout scores
    all read the score at the answer's end-of-turn token, not at the token before it."""
    from llmtrain.data.preferences import PreferencePair, collate_pairs, tokenize_pairs
    from llmtrain.models import load_reward_model, score_conversations
    from llmtrain.rewards import RewardSource
    from llmtrain.rollout import Rollout

    path = str(family_models[name])
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == chat_format(tokenizer).end_of_turn_id
    torch.manual_seed(0)
    model = load_reward_model(path, tokenizer, name).eval()
    prompts = [[{"role": "user", "content": "What is 12 + 30?"}], [{"role": "user", "content": "And 45 - 17?"}]]
    answers = ["12 + 30 = 42", "28"]
    answer_turns = [[{"role": "assistant", "content": a}] for a in answers]

    # By hand: the score head at the end-of-turn token of each conversation rendered alone.
    fmt = chat_format(tokenizer)
    by_hand = []
    for prompt, answer in zip(prompts, answer_turns):
        ids = fmt.encode(prompt + answer, train_from=1).input_ids
        end = max(i for i, t in enumerate(ids) if t == fmt.end_of_turn_id)
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
        by_hand.append(model.score(hidden[0, end]).item())
        before = model.score(hidden[0, end - 1]).item()
        assert abs(before - by_hand[-1]) > 1e-4  # reading one token early would give another score

    with torch.no_grad():
        # `llmtrain score`, DPO's judge and PPO's val_reward.
        scored = score_conversations(model, tokenizer, [p + a for p, a in zip(prompts, answer_turns)])
        # Reward training and its held-out accuracy: the chosen side of a pair, padded as in a batch.
        wrong = [{"role": "assistant", "content": "0"}]
        pairs, _ = tokenize_pairs(tokenizer, [PreferencePair(p, a, wrong) for p, a in zip(prompts, answer_turns)], 128)
        batch = collate_pairs(pairs, model.config.pad_token_id)
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:2, 0]
        # PPO: [left-padded prompt | response ending at the end-of-turn token, right-padded] rows.
        rows = [
            (fmt.prompt_ids(p), tokenizer(a, add_special_tokens=False)["input_ids"] + [fmt.end_of_turn_id])
            for p, a in zip(prompts, answers)
        ]
        width, longest = max(len(q) for q, _ in rows), max(len(r) for _, r in rows)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(q)) + q + r + [pad] * (longest - len(r)) for q, r in rows])
        attention = torch.tensor(
            [[0] * (width - len(q)) + [1] * (len(q) + len(r)) + [0] * (longest - len(r)) for q, r in rows]
        )
        mask = attention[:, width:].float()
        rollout = Rollout(
            ids,
            attention,
            (attention.cumsum(-1) - 1).clamp(min=0),
            ids[:, width:],
            mask,
            torch.ones(2, dtype=torch.bool),
            width,
            prompts,
            answers,
        )
        from_rollout = RewardSource(name, model=model, tokenizer=tokenizer, same_tokens=True).score(rollout, 2)
    for scores in (scored, trained.tolist(), from_rollout.tolist()):
        assert scores == pytest.approx(by_hand, abs=1e-4)


def test_continued_pretraining_keeps_the_models_own_end_of_sequence_ids(family_models, small_corpus, tmp_path):
    from helpers import tiny_config

    from llmtrain.stages import pretrain

    model_dir = str(family_models["llama3.2"])
    own = GenerationConfig.from_pretrained(model_dir).eos_token_id
    assert len(own) == 3
    cfg = tiny_config(tmp_path, small_corpus, preset=model_dir, run_name="more", max_steps=2, eval_every=0)
    assert GenerationConfig.from_pretrained(pretrain.run(cfg)).eos_token_id == own


def test_a_hub_id_trains_from_one_pinned_revision_and_the_card_names_the_hub_model(
    family_models, task_files, tmp_path, monkeypatch, capsys
):
    """`--init Qwen/...` loads the revision the cache holds (the Hub's newest when online) from its snapshot folder;
    the run names the Hub id as its parent, pins the revision, and its model card carries no local path."""
    import shutil

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--Qwen--Qwen3-tiny"
    shutil.copytree(family_models["qwen3"], repo / "snapshots" / ("e" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("e" * 40)
    runs = str(tmp_path / "runs")

    sft_dir = sft.run(SftConfig(**_common(runs, "Qwen/Qwen3-tiny", "sft"), **POLICY, **data(task_files, "sft")))
    m = read_manifest(sft_dir)
    assert m["status"] == "finished" and m["parent"] == "Qwen/Qwen3-tiny"
    assert m["model"]["source"] == "hub" and m["model"]["spec"] == "Qwen/Qwen3-tiny"
    pinned = m["parent_models"]["init"]
    assert pinned["revision"] == "e" * 40 and pinned["path"] == str((repo / "snapshots" / ("e" * 40)).resolve())
    capsys.readouterr()
    assert main(["push", "sft", "--repo_id", "user/tiny", "--dry_run", "--runs_dir", runs]) == 0
    staged = Path(capsys.readouterr().out.split("upload to user/tiny: ")[1].splitlines()[0])
    card = (staged / "README.md").read_text()
    assert "base_model: Qwen/Qwen3-tiny" in card and str(tmp_path) not in card
