import json

import pytest
from helpers import tiny_sft_config, train_losses, write_taught_sums
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtrain.config import SftConfig
from llmtrain.errors import LLMTrainError
from llmtrain.stages import sft


def sft_config(runs_dir, **overrides) -> SftConfig:
    return tiny_sft_config(runs_dir, **overrides)


def test_sft_lowers_the_held_out_loss_and_records_parent_and_task_accuracy(sft_run):
    m = json.loads((sft_run / "llmtrain.json").read_text())
    assert m["stage"] == "sft" and m["status"] == "finished" and m["parent"] == "tiny"
    metrics = m["metrics"]
    assert metrics["val_loss"] < metrics["parent_val_loss"] - 0.5
    # 30 steps teach the answer format, not the sums: task accuracy stays 0 (measured), so it is only recorded.
    assert {"task_accuracy", "parent_task_accuracy"} <= set(metrics)
    assert m["data"]["rows"] == 400 and m["data"]["trained_tokens"] > 0
    held_out = m["data"]["held_out"]
    assert held_out["fit"] + held_out["dropped_for_length"] == held_out["rows"] > 0 and held_out["answered"] > 0
    assert (sft_run / "curves.png").is_file()


def test_a_length_limit_that_drops_many_rows_is_reported_with_the_rows_metrics_rest_on(finished_run, tmp_path, capsys):
    long_question = "What is the sum of twelve and thirty, written out in words and then in digits?"
    rows = [{"prompt": f"What is {i} + 1?", "response": f"{i + 1}"} for i in range(7)]
    rows += [{"prompt": long_question, "response": "42"}] * 3
    held_out_file = tmp_path / "held_out.jsonl"
    held_out_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = sft_config(finished_run.parent, eval_data=str(held_out_file), max_length=24, max_steps=2, run_name="short")
    held_out = json.loads((sft.run(cfg) / "llmtrain.json").read_text())["data"]["held_out"]
    assert held_out == {"rows": 10, "fit": 7, "dropped_for_length": 3, "answered": 10}
    out = capsys.readouterr().out
    assert "Warning: 3 of the 10 held-out rows (30%) are longer than max_length=24 tokens and were dropped; " in out
    assert "held-out metrics are computed on the 7 that fit. Raise --max_length to keep them." in out


def test_the_sft_run_loads_with_the_end_of_turn_token_as_a_stop_token(sft_run):
    model = AutoModelForCausalLM.from_pretrained(sft_run)
    tokenizer = AutoTokenizer.from_pretrained(sft_run)
    assert tokenizer.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id


def greedy_reply_ids(run_dir, question: str) -> tuple[list[int], int]:
    """A run's greedy reply to one question with its saved generation config, and its end-of-turn token id."""
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
    return out, tokenizer.convert_tokens_to_ids("<|end|>")


def test_latest_init_without_a_pretrain_run_says_how_to_make_one(tmp_path):
    with pytest.raises(LLMTrainError, match=r"no finished pretrain run.*accelerate launch recipes/pretrain.py"):
        sft.run(sft_config(tmp_path, init="latest"))


def test_an_unresolvable_init_is_reported(tmp_path):
    with pytest.raises(LLMTrainError, match="Could not resolve model 'gpt-nope'"):
        sft.run(sft_config(tmp_path, init="gpt-nope"))


def test_packed_sft_lowers_the_held_out_loss_with_several_examples_per_row(finished_run):
    run_dir = sft.run(sft_config(finished_run.parent, packing=True, run_name="sft-packed", max_steps=15))
    m = json.loads((run_dir / "llmtrain.json").read_text())
    assert m["metrics"]["val_loss"] < m["metrics"]["parent_val_loss"] - 0.5
    assert m["data"]["train_items"] < 400  # several examples share each packed row


def test_lora_is_merged_by_default_or_kept_as_an_adapter(finished_run):
    from safetensors.torch import load_file

    merged = sft.run(sft_config(finished_run.parent, lora=True, lora_r=4, run_name="sft-lora", max_steps=10))
    assert not any("lora" in k for k in load_file(merged / "model.safetensors"))
    AutoModelForCausalLM.from_pretrained(merged)
    kept = sft.run(
        sft_config(finished_run.parent, lora=True, lora_r=4, merge_lora=False, max_steps=10, run_name="sft-adapter")
    )
    assert (kept / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(kept)  # transformers loads the base and applies the adapter
    assert json.loads((kept / "llmtrain.json").read_text())["model"]["trainable_parameters"] < 20_000


def test_eval_prints_held_out_metrics_and_chat_answers_a_prompt(sft_run, capsys, monkeypatch):
    import io

    from llmtrain.cli import main

    assert main(["eval", "sft-tiny", "--max_rows", "8", "--runs_dir", str(sft_run.parent)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"val_loss", "task_accuracy"}
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 12 + 30?\n\n"))
    assert main(["chat", "sft-tiny", "--max_new_tokens", "12", "--runs_dir", str(sft_run.parent)]) == 0
    assert "model> " in capsys.readouterr().out


@pytest.mark.slow
def test_sft_resumes_after_a_crash_on_the_same_loss_curve(finished_run, monkeypatch):
    runs = finished_run.parent
    reference = sft.run(sft_config(runs, max_steps=16, task="none", run_name="sft-ref"))
    original = sft.batch_indices

    def crash_at_step_11(n, global_batch, seed, j):
        if j == 11:
            raise RuntimeError("simulated crash")
        return original(n, global_batch, seed, j)

    monkeypatch.setattr(sft, "batch_indices", crash_at_step_11)
    cfg = sft_config(runs, max_steps=16, task="none", save_every=8, run_name="sft-crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft.run(cfg)
    monkeypatch.setattr(sft, "batch_indices", original)
    resumed = sft.run(cfg)
    a, b = train_losses(reference), train_losses(resumed)
    assert sorted(b) == list(range(1, 17))
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)
    manifest = json.loads((resumed / "llmtrain.json").read_text())
    assert manifest["resumed_at_steps"] == [8]
    assert (
        manifest["parent_models"]["init"]["path"] == str(finished_run)
        and manifest["parent_models"]["init"]["fingerprint"]
    )


def test_sft_raises_the_task_accuracy_of_the_sums_it_was_taught(taught_run):
    # Held-out sums do not move in a test's budget (the tiny model learns the answer format, not arithmetic), so
    # the gain is measured on eight sums taught by heart.
    metrics = json.loads((taught_run / "llmtrain.json").read_text())["metrics"]
    assert metrics["task_accuracy"] >= metrics["parent_task_accuracy"] + 0.5
    # A model that learned its answers learned to end them: generation stops at the end-of-turn token.
    out, end = greedy_reply_ids(taught_run, "What is 12 + 30?")
    assert end in out and out.index(end) == len(out) - 1


# ---------------------------------------------------------------- the fit verdict on purpose-built runs


def test_a_learning_rate_near_zero_is_called_underfitting(finished_run, capsys):
    cfg = sft_config(finished_run.parent, run_name="sft-underfit", lr=1e-9, max_steps=6, eval_every=3, task="none")
    fit = json.loads((sft.run(cfg) / "llmtrain.json").read_text())["fit"]
    assert fit["verdict"] == "underfitting" and "(the parent's)" in fit["reason"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("fit: UNDERFITTING")


@pytest.mark.slow
def test_many_steps_on_a_tiny_training_set_is_called_overfitting(finished_run, held_out, tmp_path):
    # Eight sums learned by heart: the loss on them keeps falling while the loss on held-out sums turns up.
    data = write_taught_sums(tmp_path / "sums.jsonl", "sft")
    held = dict(eval_data=str(held_out / "sft_val.jsonl"), task="none", eval_every=20)
    taught = dict(data=str(data), batch_size=8, max_steps=200, lr=1e-2)
    m = json.loads(
        (
            sft.run(sft_config(finished_run.parent, run_name="sft-overfit", **taught, **held)) / "llmtrain.json"
        ).read_text()
    )
    assert m["fit"]["verdict"] == "overfitting", m["fit"]
    assert m["fit"]["best_step"] < 200
