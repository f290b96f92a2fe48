"""A model defined by its own repository's code (config.json `auto_map`): refused without --trust_remote_code,
trained with it, and saved so that the run folder loads again with that code."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import tiny_sft_config
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmtrain.errors import LLMTrainError
from llmtrain.stages import sft

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGURATION = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"
"""
MODELING = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture
def modules_cache(tmp_path, monkeypatch) -> Path:
    """transformers copies a model's code into HF_MODULES_CACHE (read once, at import) and puts that folder on
    sys.path: both go to tmp_path and are restored after the test."""
    import transformers.dynamic_module_utils as dynamic

    cache = tmp_path / "modules"
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", [*sys.path])
    return cache


def custom_code_checkpoint(folder: Path, tokenizer_run: Path) -> Path:
    """A 2-layer, width-64 Llama whose config and class come from the folder's own .py files, with random weights
    and the tokenizer of `tokenizer_run`."""
    base = json.loads((tokenizer_run / "config.json").read_text())
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    ids = {k: base[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    LlamaForCausalLM(LlamaConfig(**shape, **ids)).save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": "tiny-custom",
        "architectures": ["TinyCustomForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "configuration_tiny.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny.py").write_text(MODELING)
    for name in TOKENIZER_FILES:
        if (tokenizer_run / name).is_file():
            shutil.copy(tokenizer_run / name, folder / name)
    return folder


def test_a_model_with_its_own_code_trains_only_with_trust_remote_code(finished_run, tmp_path, modules_cache):
    checkpoint = custom_code_checkpoint(tmp_path / "tiny-custom", finished_run)
    runs = tmp_path / "runs"
    tiny = dict(init=str(checkpoint), max_steps=2, eval_every=0, task_eval_rows=0)

    with pytest.raises(
        LLMTrainError, match=r"'.*tiny-custom' runs code from its own repository.*--trust_remote_code true"
    ):
        sft.run(tiny_sft_config(runs, run_name="refused", **tiny))
    assert not (runs / "refused").exists()

    run = sft.run(tiny_sft_config(runs, run_name="trusted", trust_remote_code=True, **tiny))
    assert {"configuration_tiny.py", "modeling_tiny.py"} <= {p.name for p in run.glob("*.py")}
    model = AutoModelForCausalLM.from_pretrained(run, trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"


def test_the_model_card_of_a_run_with_its_models_code_loads_it_with_that_code():
    from llmtrain.hub import usage_snippet

    for reward in (False, True):
        code = usage_snippet("me/tiny", reward, "sft", trust_remote_code=True)
        assert code.count('from_pretrained("me/tiny", trust_remote_code=True)') == 2
    assert "trust_remote_code" not in usage_snippet("me/tiny", False, "sft")
