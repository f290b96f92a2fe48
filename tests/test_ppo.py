import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, TAUGHT_SUMS, env_for, logged, manifest, tiny_ppo_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmtrain.data.prompts import load_prompts
from llmtrain.errors import LLMTrainError
from llmtrain.rewards import load_reward
from llmtrain.rollout import Rollout
from llmtrain.stages import ppo

ANSWER_REWARD = "llmtrain.data.default_task:answer_reward"


def plain_checkpoint(run_dir, dest):
    """A copy of a run's Hugging Face files without the manifest: any local checkpoint, not a registry run."""
    dest.mkdir()
    for f in run_dir.iterdir():
        if f.is_file() and f.name != "llmtrain.json":
            shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture(scope="module")
def toy_run(sft_run):
    cfg = tiny_ppo_config(sft_run.parent, max_steps=20, sample_every=10, num_mini_batches=2, run_name="ppo-toy")
    return ppo.run(cfg)


def test_ppo_raises_the_mean_reward_within_a_few_dozen_steps_while_the_kl_stays_bounded(toy_run):
    rows = logged(toy_run)
    rewards = [rows[s]["reward_mean"] for s in range(1, 21)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3  # toy reward: about -1.2 at the start
    kl = [rows[s]["kl"] for s in range(1, 21)]
    assert kl[0] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    assert max(kl) < 15.0  # nats per response: the penalty holds the policy near its parent
    for key in ("reward_std", "entropy", "clip_frac", "approx_kl", "value_loss", "explained_variance"):
        assert all(key in rows[s] for s in range(1, 21)), key
    assert rows[20]["response_length"] < rows[1]["response_length"]
    assert rows[20]["explained_variance"] > rows[1]["explained_variance"]  # the critic learns


def test_a_ppo_run_is_registered_with_its_parent_samples_plot_and_a_loadable_policy(toy_run):
    m = manifest(toy_run)
    assert m["stage"] == "ppo" and m["status"] == "finished"
    assert m["parent"] == "sft-tiny" and m["parents"] == ["sft-tiny"]  # a reward function is no run
    assert m["model"]["critic"] == "policy" and m["model"]["reward"]["kind"] == "function"
    metrics = m["metrics"]
    assert {"val_reward", "parent_val_reward", "task_accuracy", "parent_task_accuracy"} <= set(metrics)
    assert metrics["steps"] == 20 and metrics["reward_shift"] < 0  # centred on the parent's answers
    samples = [json.loads(line) for line in (toy_run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 10, 20] and {"prompt", "response", "reward"} <= set(samples[0])
    assert (toy_run / "curves.png").stat().st_size > 1000 and not (toy_run / "checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(toy_run)
    assert model.config.use_cache and model.generation_config.pad_token_id is not None


def test_a_reward_model_run_is_read_at_the_answers_end_of_turn_token_and_becomes_a_parent(sft_run, reward_run):
    cfg = tiny_ppo_config(sft_run.parent, reward_fn=None, reward_model="rm-tiny", run_name="ppo-rm")
    m = manifest(ppo.run(cfg))
    assert m["parents"] == ["sft-tiny", "rm-tiny"] and m["model"]["critic"] == "reward"
    assert m["model"]["reward"] == {"kind": "model", "spec": "rm-tiny", "tokens": True}
    # The toy reward optimized, and the reward model as a second one that only scores the validation answers.
    checked = manifest(ppo.run(tiny_ppo_config(sft_run.parent, val_reward_model="rm-tiny", run_name="ppo-checked")))
    assert "val_reward_model" in checked["parent_models"]
    metrics = checked["metrics"]
    assert {"val_check_reward", "parent_val_check_reward", "test_check_reward"} <= set(metrics)

    # The score PPO reads at the end-of-turn token of [left-padded prompt | right-padded response] rows equals
    # the score `llmtrain score` and the judge give the same conversation, rendered alone without any padding.
    from llmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(sft_run))
    reward = load_reward(cfg, tokenizer)
    prompts = [
        [{"role": "user", "content": "What is 12 + 30?"}],
        [{"role": "user", "content": "Now, what is 45 - 17?"}],
    ]
    answers = ["12 + 30 = 42", "28"]
    rollout = make_rollout(tokenizer, prompts, answers)
    assert rollout.attention_mask[0, 0] == 0 and rollout.mask[1, -1] == 0  # padding on both sides
    from_tokens = reward.score(rollout, micro=2)
    from_text = reward.score_texts(prompts, answers)
    assert from_tokens.tolist() == pytest.approx(from_text, abs=1e-4)
    assert from_tokens[0] != from_tokens[1]


def make_rollout(tokenizer, prompts: list[list[dict]], answers: list[str]) -> Rollout:
    """A rollout of given answers, laid out as the stage lays out sampled ones."""
    from llmtrain.data.template import chat_format

    pad, end = tokenizer.pad_token_id, chat_format(tokenizer).end_of_turn_id
    queries = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"] for p in prompts
    ]
    responses = [tokenizer(a, add_special_tokens=False)["input_ids"] + [end] for a in answers]
    width, longest = max(map(len, queries)), max(map(len, responses))
    query = torch.tensor([[pad] * (width - len(q)) + q for q in queries])
    response = torch.tensor([r + [pad] * (longest - len(r)) for r in responses])
    attention = torch.cat([query != pad, response != pad], dim=1).long()
    return Rollout(
        input_ids=torch.cat([query, response], dim=1),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        responses=response,
        mask=(response != pad).float(),
        ended=torch.ones(len(answers), dtype=torch.bool),
        prompt_len=width,
        conversations=prompts,
        texts=answers,
    )


def test_any_checkpoint_folders_work_for_policy_and_reward_and_lora_shares_the_reference(sft_run, reward_run, tmp_path):
    policy = plain_checkpoint(sft_run, tmp_path / "policy")
    scorer = plain_checkpoint(reward_run, tmp_path / "scorer")
    prompts = tmp_path / "prompts.parquet"
    import datasets

    datasets.Dataset.from_list([{"prompt": f"What is {a} + 12?"} for a in range(20, 60)]).to_parquet(str(prompts))
    cfg = tiny_ppo_config(
        sft_run.parent,
        init=str(policy),
        reward_fn=None,
        reward_model=str(scorer),
        data=str(prompts),
        lora=True,
        lora_r=4,
        run_name="ppo-folders",
    )
    out = ppo.run(cfg)
    m = manifest(out)
    assert m["parent"] == str(policy.resolve()) and m["parents"] == [str(policy.resolve()), str(scorer.resolve())]
    assert m["model"]["source"] == "local" and m["model"]["reference"] == "adapter-disabled base"
    # Of 40 rows, 2 held out for validation (val_fraction) and 2 for the test (test_fraction).
    assert m["data"]["prompts"] == 36 and m["config"]["data"] == str(prompts)
    assert m["data"]["test"] == f"2 rows of {prompts} (--test_fraction 0.05)" and "test_reward" in m["metrics"]
    assert logged(out)[1]["kl"] == pytest.approx(0.0, abs=1e-4)  # adapter off = the untouched base
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))  # merged on save


def test_chat_prompts_group_advantages_and_a_value_head(sft_run, tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {a} - 11?"}]}
        for a in range(20, 44)
    ] + [{"messages": [{"role": "user", "content": "What is 50 + 10?"}, {"role": "assistant", "content": "60"}]}] * 8
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    group = ppo.run(
        tiny_ppo_config(
            sft_run.parent, data=str(data), advantage="group", num_generations=4, batch_size=4, run_name="grpo"
        )
    )
    step = logged(group)[1]
    assert "value_loss" not in step and manifest(group)["model"]["critic"] is None
    head = ppo.run(tiny_ppo_config(sft_run.parent, data=str(data), value_model="head", run_name="ppo-head"))
    assert manifest(head)["model"]["critic"] == "head" and "value_loss" in logged(head)[2]


def test_load_prompts_reads_plain_and_chat_rows_up_to_the_last_user_turn(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "What is 1 + 2?", "response": "ignored"},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
        {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]},
        {"instruction": "Add.", "input": "3 + 4"},
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "C"},
                {"from": "gpt", "value": "D"},
            ]
        },
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "P1 "}, {"type": "text", "text": "P2"}]}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(str(path)) == [
        [{"role": "user", "content": "What is 1 + 2?"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        [{"role": "user", "content": "A"}],
        [{"role": "user", "content": "Add.\n\n3 + 4"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "C"}],
        [{"role": "user", "content": "P1 P2"}],
    ]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "hello"}, r"line 2: unrecognised prompt row \(keys: 'text'\)"),
        ({"prompt": "   "}, r"line 2: the prompt is empty"),
        ({"messages": [{"role": "system", "content": "S"}]}, r"line 2: the conversation has no user turn"),
        (
            {"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            "ends with a 'assistant'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio", "path": "q.wav"}]}]},
            r"line 2: message 1 of 'messages' has a part of type 'audio'; only text is trained",
        ),
        ({"conversations": [{"from": "gpt", "value": "Hi."}]}, r"line 2: the conversation has no user turn"),
    ],
)
def test_bad_prompt_rows_are_named_by_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LLMTrainError, match=message):
        load_prompts(str(path))


def test_bad_reward_settings_say_what_to_do(sft_run, reward_run, tmp_path):
    runs = sft_run.parent
    with pytest.raises(LLMTrainError, match=r"no finished reward run.*recipes/reward.py.*--reward_fn"):
        ppo.run(tiny_ppo_config(tmp_path, init=str(sft_run), reward_fn=None, reward_model="latest"))
    with pytest.raises(LLMTrainError, match="--reward_fn no_such_module:f: could not import"):
        ppo.run(tiny_ppo_config(runs, reward_fn="no_such_module:f"))
    with pytest.raises(LLMTrainError, match="is not a sequence classifier"):
        ppo.run(tiny_ppo_config(runs, reward_fn=None, reward_model="sft-tiny"))
    with pytest.raises(LLMTrainError, match=r"returned 1 scores for \d+ responses; it must return one float per"):
        ppo.run(tiny_ppo_config(runs, reward_fn="helpers:wrong_length_reward", run_name="ppo-bad-fn"))
    with pytest.raises(LLMTrainError, match="--num_generations to 2 or more"):
        ppo.run(tiny_ppo_config(runs, advantage="group"))
    with pytest.raises(LLMTrainError, match="--value_model reward initialises the critic from the reward model"):
        ppo.run(tiny_ppo_config(runs, value_model="reward"))


@pytest.mark.slow
def test_ppo_resumes_after_a_crash_on_the_same_curve(sft_run, monkeypatch):
    runs = sft_run.parent
    reference = ppo.run(tiny_ppo_config(runs, max_steps=5, task="none", run_name="ppo-ref"))
    original = ppo.batch_indices

    def crash_at_step_4(n, global_batch, seed, j):
        if j == 4:
            raise RuntimeError("simulated crash")
        return original(n, global_batch, seed, j)

    monkeypatch.setattr(ppo, "batch_indices", crash_at_step_4)
    cfg = tiny_ppo_config(runs, max_steps=5, task="none", save_every=3, run_name="ppo-crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        ppo.run(cfg)
    monkeypatch.setattr(ppo, "batch_indices", original)
    resumed = ppo.run(cfg)
    a, b = logged(reference), logged(resumed)
    assert sorted(b) == sorted(a) == [0, 1, 2, 3, 4, 5] and manifest(resumed)["resumed_at_steps"] == [3]
    for s in range(1, 6):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss"):
            assert a[s][key] == pytest.approx(b[s][key], abs=1e-5), (s, key)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(sft_run, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "ppo.py"),
        *("--init", str(sft_run), "--reward_fn", ANSWER_REWARD, "--max_steps", "100000", "--batch_size", "8"),
        *("--max_length", "64", "--max_new_tokens", "8", "--task_eval_rows", "8", "--run_name", "preempted"),
    ]
    proc = subprocess.Popen(cmd, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "preempted" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Stopped by SIGTERM" in err and "Traceback" not in err
    checkpoints = list((tmp_path / "runs" / "preempted" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    assert json.loads((tmp_path / "runs" / "preempted" / "llmtrain.json").read_text())["status"] == "interrupted"


def test_a_crash_inside_the_loop_marks_the_run_failed_not_running(sft_run, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(ppo, "score_rollout", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        ppo.run(tiny_ppo_config(sft_run.parent, run_name="ppo-bug", max_steps=1, task_eval_rows=2))
    assert manifest(sft_run.parent / "ppo-bug")["status"] == "failed"


@pytest.mark.slow
def test_a_reward_that_pays_for_wrong_answers_is_called_reward_hacking(taught_run, capsys):
    # The taught model answers its eight sums right; a reward paying for wrong answers rises as PPO finds them,
    # while the task accuracy the checker measures on the same prompts, which PPO does not optimize, falls.
    sums = taught_run / "sums.jsonl"
    sums.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?"}) + "\n" for a, b in TAUGHT_SUMS))
    cfg = tiny_ppo_config(
        taught_run.parent,
        init="taught",
        run_name="ppo-hacked",
        reward_fn="helpers:wrong_answer_reward",
        data=str(sums),
        eval_data=str(sums),
        batch_size=8,
        max_steps=20,
        lr=3e-3,
        temperature=1.0,
        kl_coef=0.0,
        hacking_kl=None,
    )
    m = manifest(ppo.run(cfg))
    assert m["fit"]["verdict"] == "reward_hacking", m["fit"]
    assert "task_accuracy, which it does not optimize, fell from 1" in m["fit"]["reason"]
    assert "fit: REWARD_HACKING" in capsys.readouterr().out
    # PPO's default --keep_best auto (task accuracy, with a checker) saved the best evaluation's weights, which
    # answer as well as the parent did, not the last step's.
    assert m["best"]["metric"] == "task_accuracy" and m["best"]["value"] == 1.0 and m["best"]["step"] < 20
    assert m["metrics"]["task_accuracy"] == m["metrics"]["parent_task_accuracy"] == 1.0
