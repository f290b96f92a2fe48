"""Gradient checkpointing (`--gradient_checkpointing`): each decoder layer runs again in the backward pass instead of
keeping its activations, and the gradients, hence every stage's curve, are those of a run without it."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from helpers import few_steps_config, logged, stage_runners
from transformers import AutoModelForCausalLM

from llmtrain.errors import LLMTrainError
from llmtrain.models import use_gradient_checkpointing
from llmtrain.registry import preset_config
from llmtrain.run_dir import Run

NO_FSDP = SimpleNamespace(state=SimpleNamespace())  # an accelerator whose launch config checkpoints nothing itself


@contextmanager
def counting_linear_calls():
    """Counts the calls of every nn.Linear: a layer recomputed in the backward pass calls its projections again.
    (Module hooks would not see it: the recomputation calls the layer's `forward` with hooks left outside.)"""
    calls, forward = [0], torch.nn.Linear.forward

    def counted(self, x):
        calls[0] += 1
        return forward(self, x)

    torch.nn.Linear.forward = counted
    try:
        yield calls
    finally:
        torch.nn.Linear.forward = forward


def one_step(model, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], int]:
    """The loss, the gradients and the nn.Linear calls of one training step."""
    model.train()
    model.zero_grad()
    with counting_linear_calls() as calls:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, calls[0]


@pytest.mark.parametrize("lora", [False, True])
def test_each_layer_is_recomputed_in_the_backward_pass_and_the_gradients_are_unchanged(lora):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("gpt-nano", 64, 32, {}))
    layers = model.config.num_hidden_layers
    if lora:  # frozen embeddings: the layers' inputs need no gradient with non-reentrant checkpointing
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    tokens = torch.randint(0, 64, (2, 16))
    loss, grads, calls = one_step(model, tokens)
    assert calls >= layers * 7 + 1 and grads  # q, k, v, o, gate, up, down (LoRA: each with its A and B), the head

    use_gradient_checkpointing(model, NO_FSDP)
    loss_ckpt, grads_ckpt, calls_ckpt = one_step(model, tokens)
    assert calls_ckpt == 2 * calls - 1  # each layer once forward, once again backward; the head once
    assert loss_ckpt == loss and grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)


def test_a_model_that_cannot_checkpoint_is_refused_with_the_way_to_save_memory_instead():
    with pytest.raises(LLMTrainError, match=r"--gradient_checkpointing: Linear does not support .*--grad_accum"):
        use_gradient_checkpointing(torch.nn.Linear(2, 2), NO_FSDP)


STAGES = stage_runners()


@pytest.fixture(scope="module", params=list(STAGES))
def stage_runs(request, held_out, one_thread):
    """One stage's first steps with gradient checkpointing and without, counting the nn.Linear calls of each."""
    stage = request.param
    runs, calls = {}, {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "plot", lambda self, *curves: None)
        for on in (True, False):
            config = few_steps_config(stage, request, held_out, gradient_checkpointing=on, run_name=f"{stage}-gc{on}")
            with counting_linear_calls() as counted:
                runs[on] = STAGES[stage](config)
            calls[on] = counted[0]
    return stage, runs, calls


def test_every_stage_recomputes_its_layers_and_follows_the_same_curve(stage_runs):
    stage, runs, calls = stage_runs
    assert calls[True] > calls[False]  # the backward passes ran the layers again (evaluation and sampling did not)
    with_ckpt, without = logged(runs[True]), logged(runs[False])
    assert sorted(with_ckpt) == sorted(without)
    for step in without:
        for key in ("train_loss", "policy_loss", "value_loss", "reward_mean"):
            if key in without[step]:
                assert with_ckpt[step][key] == pytest.approx(without[step][key], rel=1e-5, abs=1e-7), (stage, key)
