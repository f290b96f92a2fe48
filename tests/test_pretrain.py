import json
import os
import signal

import pytest
import torch
from helpers import tiny_config, train_losses
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtrain.errors import LLMTrainError, RunInterrupted
from llmtrain.stages import pretrain


def test_loss_falls_and_the_run_is_a_loadable_hf_checkpoint(finished_run):
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 1.0, f"validation loss did not fall enough: {val}"

    model = AutoModelForCausalLM.from_pretrained(finished_run)  # no trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(finished_run)
    ids = tokenizer("What is 12 + 30?", return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_manifest_records_lineage_config_data_and_metrics(finished_run):
    m = json.loads((finished_run / "llmtrain.json").read_text())
    assert m["stage"] == "pretrain" and m["status"] == "finished" and m["preset"] == "gpt-nano"
    assert m["parent"] is None and m["config"]["max_steps"] == 60 and m["config"]["seq_len"] == 64
    for key in ("val_loss", "val_bpb", "tokens_seen", "tokens_per_s", "train_time_s"):
        assert key in m["metrics"], key
    assert m["metrics"]["tokens_seen"] == 60 * 8 * 64
    assert 0 < m["metrics"]["val_bpb"] < 8
    assert m["data"]["fingerprint"] and m["data"]["documents_read"] == 600 and m["data"]["val_tokens"] > 0
    assert {"torch", "transformers", "accelerate"} <= set(m["versions"])
    assert (finished_run / "curves.png").stat().st_size > 1000
    assert not (finished_run / "checkpoints").exists()


@pytest.mark.slow
def test_resume_after_sigterm_continues_the_same_loss_curve(tmp_path, small_corpus, monkeypatch):
    reference = pretrain.run(tiny_config(tmp_path / "a", small_corpus, max_steps=30, eval_every=0))

    original = pretrain.TokenWindows.random_batch

    def kill_at_step_12(self, seed, step, *args, **kwargs):
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the loop saves after this step and stops
        return original(self, seed, step, *args, **kwargs)

    monkeypatch.setattr(pretrain.TokenWindows, "random_batch", kill_at_step_12)
    cfg = tiny_config(tmp_path / "b", small_corpus, max_steps=30, eval_every=0, run_name="r")
    with pytest.raises(RunInterrupted) as stopped:
        pretrain.run(cfg)
    assert stopped.value.step == 13 and stopped.value.signum == signal.SIGTERM
    run_dir = tmp_path / "b" / "r"
    assert json.loads((run_dir / "llmtrain.json").read_text())["status"] == "interrupted"
    assert (run_dir / "checkpoints" / "step-0000013" / "trainer_state.json").is_file()

    monkeypatch.setattr(pretrain.TokenWindows, "random_batch", original)
    resumed = pretrain.run(cfg)  # same run name: picks up the checkpoint
    a, b = train_losses(reference), train_losses(resumed)
    assert sorted(b) == list(range(1, 31))
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), [(s, a[s], b[s]) for s in a if abs(a[s] - b[s]) >= 1e-5]
    assert json.loads((resumed / "llmtrain.json").read_text())["resumed_at_steps"] == [13]


def test_sigterm_during_the_final_evaluation_resumes_straight_to_it_with_the_same_model(
    tmp_path, small_corpus, monkeypatch
):
    reference = pretrain.run(tiny_config(tmp_path / "a", small_corpus, max_steps=12, eval_every=0))
    original = pretrain.evaluate_lm

    def stopped_while_evaluating(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, once the steps are over
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrain, "evaluate_lm", stopped_while_evaluating)
    cfg = tiny_config(tmp_path / "b", small_corpus, max_steps=12, eval_every=0, run_name="r")
    with pytest.raises(RunInterrupted, match="SIGTERM at step 12"):
        pretrain.run(cfg)
    run_dir = tmp_path / "b" / "r"
    assert json.loads((run_dir / "llmtrain.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "model.safetensors").exists()

    monkeypatch.setattr(pretrain, "evaluate_lm", original)
    resumed = pretrain.run(cfg)
    manifest = json.loads((resumed / "llmtrain.json").read_text())
    assert manifest["status"] == "finished" and manifest["resumed_at_steps"] == [12]
    assert (
        manifest["metrics"]["val_loss"] == json.loads((reference / "llmtrain.json").read_text())["metrics"]["val_loss"]
    )
    weights = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (reference, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_a_crash_resumes_from_the_last_periodic_checkpoint(tmp_path, small_corpus, monkeypatch):
    original = pretrain.TokenWindows.random_batch

    def crash_at_step_17(self, seed, step, *args, **kwargs):
        if step == 17:
            raise RuntimeError("simulated crash")
        return original(self, seed, step, *args, **kwargs)

    monkeypatch.setattr(pretrain.TokenWindows, "random_batch", crash_at_step_17)
    cfg = tiny_config(tmp_path, small_corpus, max_steps=24, eval_every=0, save_every=10, run_name="c")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain.run(cfg)
    # A half-written checkpoint (temporary folder) is never picked up.
    (tmp_path / "c" / "checkpoints" / ".tmp-step-0000016").mkdir()
    monkeypatch.setattr(pretrain.TokenWindows, "random_batch", original)
    pretrain.run(tiny_config(tmp_path, small_corpus, max_steps=24, eval_every=0, save_every=10, resume=True))
    manifest = json.loads((tmp_path / "c" / "llmtrain.json").read_text())
    assert manifest["status"] == "finished" and manifest["resumed_at_steps"] == [10]
    assert sorted(train_losses(tmp_path / "c")) == list(range(1, 25))


def test_a_nan_loss_stops_the_run_at_its_step_with_a_clear_message(tmp_path, small_corpus, monkeypatch):
    real_ce = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(pretrain.F, "cross_entropy", poisoned)
    cfg = tiny_config(tmp_path, small_corpus, max_steps=20, eval_every=0, run_name="n")
    with pytest.raises(LLMTrainError, match=r"gradients were not finite \(NaN or inf\) at step 6.*Lower --lr"):
        pretrain.run(cfg)
    assert json.loads((tmp_path / "n" / "llmtrain.json").read_text())["status"] == "failed"


def test_a_finished_run_is_not_overwritten_without_the_flag(tmp_path, small_corpus):
    cfg = tiny_config(tmp_path, small_corpus, max_steps=3, eval_every=0, run_name="done")
    pretrain.run(cfg)
    before = (tmp_path / "done" / "model.safetensors").read_bytes()
    with pytest.raises(LLMTrainError, match="is finished; it will not be overwritten. Pass --overwrite"):
        pretrain.run(cfg)
    assert (tmp_path / "done" / "model.safetensors").read_bytes() == before
    cfg.overwrite, cfg.seed = True, 7
    pretrain.run(cfg)
    assert (tmp_path / "done" / "model.safetensors").read_bytes() != before


def test_token_and_time_budgets_end_the_run_like_max_steps(tmp_path, small_corpus):
    by_tokens = pretrain.run(tiny_config(tmp_path, small_corpus, max_tokens=5 * 8 * 32, eval_every=0))
    m = json.loads((by_tokens / "llmtrain.json").read_text())
    assert m["metrics"]["steps"] == 5 and m["metrics"]["stop_reason"] == "max_tokens"
    by_time = pretrain.run(tiny_config(tmp_path, small_corpus, max_steps=100_000, max_time_s=1.0, eval_every=0))
    m = json.loads((by_time / "llmtrain.json").read_text())
    assert m["metrics"]["stop_reason"] == "max_time_s" and m["status"] == "finished"
    assert (by_time / "model.safetensors").is_file() and "val_loss" in m["metrics"]


def test_continued_pretraining_starts_from_a_run_and_records_its_parent(tmp_path, finished_run, small_corpus):
    runs = finished_run.parent
    child = pretrain.run(tiny_config(runs, small_corpus, preset="tiny", max_steps=5, eval_every=0, run_name="child"))
    m = json.loads((child / "llmtrain.json").read_text())
    assert m["parent"] == "tiny" and m["model"]["source"] == "run"
    first = json.loads((child / "metrics.jsonl").read_text().splitlines()[0])
    parent_last = json.loads((finished_run / "llmtrain.json").read_text())["metrics"]["train_loss"]
    assert first["train_loss"] < parent_last + 1.0  # it did not start from random weights (loss ~5.7)


def test_a_tokenizer_larger_than_the_model_embedding_is_refused(tmp_path, finished_run, small_corpus):
    from llmtrain.tokenizer import train_tokenizer

    big = train_tokenizer(small_corpus.read_text().split("\n\n"), vocab_size=800)
    big.save_pretrained(tmp_path / "big-tok")
    cfg = tiny_config(finished_run.parent, small_corpus, preset="tiny", tokenizer=str(tmp_path / "big-tok"))
    with pytest.raises(LLMTrainError, match=r"tokenizer has \d+ tokens but model 'tiny' has an embedding of only"):
        pretrain.run(cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"preset": "gpt-huge"}, "Could not resolve model 'gpt-huge'"),
        ({"data": "no/such/file.txt"}, r"no/such/file.txt does not exist"),
        ({"seq_len": 100_000}, r"train split has [\d,]+ tokens, fewer than one window"),
        ({"tracker": "wandb"}, r"needs the 'wandb' package.*pip install wandb"),
        ({"schedule": "linear"}, "Unknown schedule 'linear'"),
    ],
)
def test_bad_input_gets_a_clear_message(tmp_path, small_corpus, overrides, message):
    with pytest.raises(LLMTrainError, match=message):
        overrides = dict(overrides)
        pretrain.run(tiny_config(tmp_path, overrides.pop("data", small_corpus), **overrides))


def test_a_corpus_smaller_than_one_window_is_reported(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("\n\n".join(f"What is {i} + {i}? {i} + {i} = {2 * i}." for i in range(10, 40)))
    with pytest.raises(LLMTrainError, match="fewer than one window"):
        pretrain.run(tiny_config(tmp_path, tiny, seq_len=512))


@pytest.mark.slow
def test_a_compiled_run_saves_plain_hf_weights(tmp_path, small_corpus):
    from safetensors.torch import load_file

    run_dir = pretrain.run(
        tiny_config(tmp_path, small_corpus, compile=True, max_steps=2, eval_every=0, num_samples=1, sample_tokens=2)
    )
    assert not any(key.startswith("_orig_mod") for key in load_file(run_dir / "model.safetensors"))
    AutoModelForCausalLM.from_pretrained(run_dir)
