"""`llmtrain show-data`: rows as the model sees them, with exactly the trained tokens marked."""

from __future__ import annotations

import json

from llmtrain.cli import main
from llmtrain.data.corpus import REPO_DATA_DIR

SAMPLES = REPO_DATA_DIR / "samples"


def test_chat_rows_are_shown_with_the_answers_and_end_of_turn_marked(family_models, capsys):
    model = str(family_models["qwen2.5"])
    assert main(["show-data", model, "--data", str(SAMPLES / "sft_messages.jsonl"), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    first = json.loads((SAMPLES / "sft_messages.jsonl").read_text().splitlines()[0])["messages"]
    answers = [m["content"] for m in first if m["role"] == "assistant"]
    # Every answer is marked with its end-of-turn token and nothing else is: user text stays outside the marks.
    rows = out.split("\n\n", 1)[1]  # after the legend
    marked = [part.split("]]")[0] for part in rows.split("[[")[1:]]
    assert marked == [f"{a}<|im_end|>" for a in answers]
    assert "end of turn '<|im_end|>'" in out and "0 dropped" in out


def test_sharegpt_rows_are_recognised_as_chat_rows(family_models, capsys):
    model = str(family_models["qwen2.5"])
    assert main(["show-data", model, "--data", str(SAMPLES / "sft_sharegpt.jsonl"), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    rows = out.split("\n\n", 1)[1]  # after the legend
    marked = [part.split("]]")[0] for part in rows.split("[[")[1:]]
    assert marked == ["18 + 38 = 56<|im_end|>", "52 + 62 = 114<|im_end|>"]
    assert "3 conversations -> 3 examples" in out


def test_preference_and_prompt_rows_are_recognised_and_counted(family_models, capsys):
    model = str(family_models["gemma2"])
    assert main(["show-data", model, "--data", str(SAMPLES / "prefs.jsonl"), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert ", chosen:" in out and ", rejected:" in out and "preference pairs ->" in out
    assert "no system role" in out  # Gemma 2 folds a system turn into the first user turn
    assert main(["show-data", model, "--data", str(SAMPLES / "prompts.jsonl"), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "the policy continues after the last token" in out and out.rstrip().endswith("longer than 2048 tokens")


def test_rows_whose_answers_cannot_be_located_are_counted_not_trained(family_models, tmp_path, capsys):
    template = tmp_path / "upper.jinja"
    # Renders the generation prompt as "Bot:" but answers after "Assistant:": no answer can be verified.
    template.write_text(
        "{% for m in messages %}{{ ('Assistant: ' if m['role'] == 'assistant' else 'User: ') + m['content'] }}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}Bot: {% endif %}"
    )
    data = str(SAMPLES / "sft_prompt_response.jsonl")
    assert main(["show-data", str(family_models["gpt2"]), "--data", data, "--chat_template", str(template)]) == 0
    out = capsys.readouterr().out
    rows = len((SAMPLES / "sft_prompt_response.jsonl").read_text().splitlines())
    assert f"{rows} dropped as unverifiable" in out and "[[" not in out.split("\n\n", 1)[1]
