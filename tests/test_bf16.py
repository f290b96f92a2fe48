"""bf16 mixed precision: the numerically delicate parts compute in fp32 whatever the autocast, and every stage runs in
bf16 on a CPU close to its fp32 curve, with fp32 weights and optimizer state and the precision in its manifest."""

import math

import pytest
import torch
from helpers import REPO, STEPS, few_steps_config, logged, manifest, stage_runners
from safetensors.torch import load_file

from llmtrain import rl
from llmtrain.data.chat import masked_lm_loss
from llmtrain.data.preferences import sequence_logprobs
from llmtrain.losses import bradley_terry_loss, dpo_loss
from llmtrain.models import ScoreHead
from llmtrain.run_dir import Run


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def as_model_gives(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors as a model under bf16 autocast hands them over: rounded to bf16, and in bf16."""
    return [t.bfloat16() for t in tensors]


def widened(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The fp32 reference's inputs: the same bf16 values, widened before any arithmetic."""
    return [t.float() for t in tensors]


# ---------------------------------------------------------------- the delicate functions, in fp32 under autocast


def test_preference_losses_compute_in_fp32_from_bf16_scores():
    torch.manual_seed(0)
    logps = as_model_gives(*(-20 + torch.randn(8) for _ in range(4)))
    with bf16_autocast():
        out = dpo_loss(*logps, beta=0.1)
        bt = bradley_terry_loss(logps[0], logps[1])
    reference = dpo_loss(*widened(*logps), beta=0.1)
    assert out.loss.dtype == out.chosen_rewards.dtype == bt.dtype == torch.float32
    # Exactly the fp32 result; in bf16 the log-ratio of two sums near -20 keeps only multiples of 1/8.
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)
    torch.testing.assert_close(out.chosen_rewards, reference.chosen_rewards, rtol=1e-6, atol=0)
    assert bt.item() == pytest.approx(bradley_terry_loss(*widened(logps[0], logps[1])).item(), rel=1e-6)


def test_rl_arithmetic_computes_in_fp32_from_bf16_inputs():
    torch.manual_seed(0)
    mask = torch.ones(4, 6)
    mask[0, 4:] = mask[2, 3:] = 0
    lp, old_lp, ref_lp, values, old_values = as_model_gives(*(torch.randn(4, 6) for _ in range(5)))
    scores = as_model_gives(torch.randn(4))[0]

    def everything(lp, old_lp, ref_lp, values, old_values, scores):
        rewards, kl = rl.kl_penalty_rewards(scores, old_lp, ref_lp, mask, kl_coef=0.05)
        advantages, returns = rl.gae(rewards, old_values, mask, gamma=1.0, lam=0.95)
        return {
            "rewards": rewards,
            "kl": kl,
            "advantages": rl.masked_whiten(advantages, mask),
            "returns": returns,
            "mean": rl.masked_mean(values, mask),
            "group": rl.group_advantages(scores, group_size=2),
            "policy_loss": rl.policy_loss(lp, old_lp, advantages, mask, clip_range=0.2).loss,
            "value_loss": rl.value_loss(values, old_values, returns, mask, clip_range_value=0.2)[0],
        }

    with bf16_autocast():
        got = everything(lp, old_lp, ref_lp, values, old_values, scores)
    expected = everything(*widened(lp, old_lp, ref_lp, values, old_values, scores))
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random Llama with a vocabulary of 512 and a batch of token rows for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 512, (4, 24))
    return model, tokens


def test_log_probs_and_losses_over_the_vocabulary_are_fp32_under_autocast(tiny_lm):
    model, tokens = tiny_lm
    labels = tokens.clone()
    labels[:, :10] = -100  # a prompt that is not trained
    with torch.no_grad():
        full = model(input_ids=tokens).logits
        with bf16_autocast():
            half = model(input_ids=tokens).logits
            assert half.dtype == torch.bfloat16  # the model's own output: the functions must widen it
            got = {
                "logprobs_of": rl.logprobs_of(half[:, :-1], tokens[:, 1:], temperature=0.7),
                "entropy_of": rl.entropy_of(half, temperature=0.7),
                "sequence_logprobs": sequence_logprobs(half, labels),
                "masked_lm_loss": masked_lm_loss(half, labels)[0],
            }
    for name, value in got.items():
        assert value.dtype == torch.float32, name
    # Exactly what log_softmax in fp32 gives on the same bf16 logits.
    exact = torch.log_softmax(half[:, :-1].float() / 0.7, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got["logprobs_of"], exact, rtol=0, atol=2e-6)
    # Against the fp32 model: only the bf16 matmuls differ. Measured (this model, 2-core CPU): log-probs within
    # 0.009 nats of about -6.5, sums of 14 of them within 0.03 of about -90, the summed loss within 0.03 of 90.
    torch.testing.assert_close(got["logprobs_of"], rl.logprobs_of(full[:, :-1], tokens[:, 1:], 0.7), rtol=0, atol=0.03)
    torch.testing.assert_close(got["entropy_of"], rl.entropy_of(full, 0.7), rtol=0, atol=0.03)
    torch.testing.assert_close(got["sequence_logprobs"], sequence_logprobs(full, labels), rtol=1e-3, atol=0)
    assert got["masked_lm_loss"].item() == pytest.approx(masked_lm_loss(full, labels)[0].item(), rel=1e-3)


def test_a_score_head_computes_rewards_in_fp32_under_autocast():
    torch.manual_seed(0)
    head = ScoreHead(64, 1)
    # Hidden states of a chosen and a rejected answer that differ a little, as at the start of reward training.
    chosen = torch.randn(16, 64)
    rejected = chosen + 1e-3 * torch.randn(16, 64)
    hidden = torch.cat([chosen, rejected])
    with bf16_autocast():
        scores = head(hidden).squeeze(-1)
        plain = torch.nn.functional.linear(hidden, head.weight, head.bias).squeeze(-1)
    assert scores.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(scores, head(hidden).squeeze(-1), rtol=0, atol=0)  # as without autocast
    c, r = scores.chunk(2)
    pc, pr = plain.float().chunk(2)
    assert (pc == pr).sum() >= 4 and (c == r).sum() == 0  # bf16 ties pairs (7 of 16 here) that fp32 tells apart


def test_a_reward_model_scores_in_fp32_and_tells_close_answers_apart_under_autocast(sft_run):
    from llmtrain.data.preferences import collate_pairs, load_preference_pairs, tokenize_pairs
    from llmtrain.models import load_reward_model, token_scores
    from llmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(sft_run))
    torch.manual_seed(0)
    model = load_reward_model(str(sft_run), tokenizer, "sft-tiny").eval()  # a fresh score head, as reward training
    pairs, _ = tokenize_pairs(tokenizer, load_preference_pairs(str(REPO / "data" / "prefs_val.jsonl"), max_rows=16), 64)
    batch = collate_pairs(pairs, model.config.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        full = model(**batch).logits[:, 0]
        with bf16_autocast():
            half = model(**batch).logits[:, 0]
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            per_token = token_scores(model, batch["input_ids"], batch["attention_mask"], positions)
    assert half.dtype == per_token.dtype == torch.float32
    last = batch["attention_mask"].sum(-1) - 1
    torch.testing.assert_close(per_token[torch.arange(len(last)), last], half)  # PPO reads where training does
    chosen, rejected = half.chunk(2)
    assert (chosen != rejected).all()  # with the head in bf16, 12 of these 16 pairs tied
    # Scores near 0.32 whose chosen and rejected differ by 5e-6 to 2e-3; the bf16 backbone moves them by up to 5e-4.
    torch.testing.assert_close(half, full, rtol=0, atol=2e-3)


# ---------------------------------------------------------------- every stage in bf16 against fp32


STAGES = stage_runners()


@pytest.fixture(scope="module", params=list(STAGES))
def stage_runs(request, held_out, one_thread):
    """One stage run in bf16, then in fp32, in one process (which Accelerate's one state per process refused before
    `runtime._forget_other_precision`); the process ends in the default precision."""
    stage = request.param
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "remove_checkpoints", lambda self: None)  # keep the checkpoint to read its optimizer
        patch.setattr(Run, "plot", lambda self, *curves: None)  # plotting took half of the time
        runs = {
            p: STAGES[stage](few_steps_config(stage, request, held_out, mixed_precision=p, run_name=f"{stage}-{p}"))
            for p in ("bf16", "no")
        }
    return stage, runs


# Largest relative distance of a bf16 step's loss from fp32's, measured on a 2-core CPU: pretrain 1.1e-5, SFT 2.6e-4,
# reward 8.6e-5, DPO 2.3e-4 (and up to 3.5e-4 over 4 steps on more rows). The losses average over hundreds of
# tokens, so bf16's rounding of each matmul output (up to 2^-9 relative) mostly averages out: 1e-3 leaves a margin
# of 3 over the largest, where a loss rounded to bf16 (off by up to 2e-3) would fall outside about half the time.
LOSS_RTOL = 1e-3


def test_every_stage_stays_finite_and_close_to_its_fp32_curve_in_bf16(stage_runs):
    stage, runs = stage_runs
    half, full = logged(runs["bf16"]), logged(runs["no"])
    steps = list(range(1, STEPS[stage] + 1))  # and step 0, the parent's evaluation, for a stage that makes one
    assert sorted(half) == sorted(full) and sorted(half) in (steps, [0, *steps])
    for step in half:
        for key, value in half[step].items():
            assert not isinstance(value, float) or math.isfinite(value), (stage, step, key)
    if stage == "dpo":  # before the first step the policy is its reference, in any precision: h = 0, loss log 2
        assert half[1]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    if stage != "ppo":
        # DPO's loss is a function of h, a small difference of sequence log-prob sums, so the first update made in
        # bf16 moves it more than other stages' losses: 1.0e-3 relative at step 2 on the current rows (3.5e-4 on
        # the rows before the task's test set was drawn from the training pool); a loss computed in bf16 is still
        # tested by step 1, exactly log 2 in both.
        rtol = 2 * LOSS_RTOL if stage == "dpo" else LOSS_RTOL
        for step in (s for s in half if s > 0):
            assert half[step]["train_loss"] == pytest.approx(full[step]["train_loss"], rel=rtol), (stage, step)
        return
    # PPO samples its rollouts, and a policy moved by bf16's rounding samples other tokens from step 2 on; step 1
    # samples from the same weights. Measured at step 1: the same samples (the same reward), value loss 2e-4
    # relative, policy loss 0.002 from -0.016 (its later minibatches follow updates made in bf16); the KL is 0 in
    # both, as policy and reference compute in the same precision.
    first, reference = half[1], full[1]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and reference["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["reward_mean"] == pytest.approx(reference["reward_mean"], rel=0.02)
    assert first["value_loss"] == pytest.approx(reference["value_loss"], rel=LOSS_RTOL)
    assert first["policy_loss"] == pytest.approx(reference["policy_loss"], abs=0.005)


def test_bf16_keeps_the_weights_and_the_optimizer_state_in_fp32_and_the_manifest_says_bf16(stage_runs):
    stage, runs = stage_runs
    for precision, run_dir in runs.items():
        assert manifest(run_dir)["mixed_precision"] == precision
    run_dir = runs["bf16"]
    saved = load_file(run_dir / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]  # the last step's, saved before the end
    assert {t.dtype for t in load_file(checkpoint / "model.safetensors").values()} == {torch.float32}
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    moments = [s[k] for s in optimizer["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}
