"""Loading the models the stages train: sequence lengths against a checkpoint's positions, and its vocabulary."""

import copy
import json
import types

import pytest
from helpers import tiny_config, tiny_sft_config
from transformers import AutoModelForCausalLM

from llmtrain.data.corpus import REPO_DATA_DIR
from llmtrain.errors import LLMTrainError
from llmtrain.models import check_positions
from llmtrain.stages import pretrain, sft

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_length_past_learned_positions_is_refused_and_past_rotary_ones_is_noted(family_models):
    gpt2 = AutoModelForCausalLM.from_pretrained(family_models["gpt2"])  # learned positions (wpe)
    limit = gpt2.config.n_positions
    check_positions(gpt2, limit, "--max_length", "gpt2", note=pytest.fail)
    with pytest.raises(LLMTrainError, match=rf"--max_length {limit + 1} is longer than the {limit} positions of "
                       rf"model 'gpt2'.*lower --max_length to at most {limit}"):  # fmt: skip
        check_positions(gpt2, limit + 1, "--max_length", "gpt2")

    qwen = AutoModelForCausalLM.from_pretrained(family_models["qwen3"])  # rotary positions
    notes: list[str] = []
    check_positions(qwen, qwen.config.max_position_embeddings, "--seq_len", "qwen3", note=notes.append)
    check_positions(qwen, 2 * qwen.config.max_position_embeddings, "--seq_len", "qwen3", note=notes.append)
    assert len(notes) == 1 and "past the 512 positions model 'qwen3' was trained with" in notes[0]
    assert "its saved config has max_position_embeddings 1024" in notes[0]
    assert qwen.config.max_position_embeddings == 1024  # what the model saved after training will say

    scaled = copy.deepcopy(qwen.config)
    scaled.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    stand_in = types.SimpleNamespace(config=scaled, named_modules=lambda: [])
    check_positions(stand_in, 4096, "--seq_len", "qwen3", note=notes.append)
    assert scaled.max_position_embeddings == 1024 and "keeps max_position_embeddings 1024" in notes[1]


def test_a_run_past_the_rotary_positions_of_its_checkpoint_saves_the_length_it_trained_on(
    finished_run, tmp_path, capsys
):
    assert json.loads((finished_run / "config.json").read_text())["max_position_embeddings"] == 64
    longer = dict(init=str(finished_run), max_length=96, max_steps=2, task_eval_rows=0)
    run = sft.run(tiny_sft_config(tmp_path, **longer))
    assert f"--max_length 96 is past the 64 positions model '{finished_run}' was trained" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["max_position_embeddings"] == 96


def test_continued_pretraining_refuses_a_tokenizer_that_is_not_the_checkpoints(family_models, tmp_path):
    # Both tokenizers fit the other's embedding, but give the same text other ids.
    cfg = tiny_config(
        tmp_path / "runs",
        REPO_DATA_DIR / "corpus.txt",
        preset=str(family_models["qwen3"]),
        tokenizer=str(family_models["llama3.2"]),
    )
    expected = r"--tokenizer .*llama3.2 is not the tokenizer model .*qwen3' was trained with: [\d,]+ of its [\d,]+"
    with pytest.raises(LLMTrainError, match=expected + r" tokens are missing or have other ids.*Drop --tokenizer"):
        pretrain.run(cfg)
