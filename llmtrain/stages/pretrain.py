"""Pretraining: a causal LM on a text corpus, with a nanoGPT-style loop on Accelerate.

Read top to bottom: accelerator and run folder, tokenizer, token shards (train, validation and test
documents), model, optimizer, the loop, the end (evaluate, keep the best, the test documents once,
sample, save, register). Each evaluation measures the validation windows and as many training windows.
Every stop, whether max_steps, token budget, time budget or a signal, ends the same way: a checkpoint
or a finished run, never a lost one.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llmtrain.config import PretrainConfig
from llmtrain.data.corpus import check_inline_preparation, find_pretrain_data, prepare_pretrain_data
from llmtrain.data.windows import TokenWindows
from llmtrain.distributed import micro_step
from llmtrain.errors import LLMTrainError
from llmtrain.evaluate import evaluate_lm
from llmtrain.flops import flops_per_token, non_embedding_params, parameter_count
from llmtrain.generate import sample
from llmtrain.loop import Loop, prepare
from llmtrain.models import check_positions, load_causal_lm
from llmtrain.registry import ModelSource, hub_snapshot, preset_config, resolve_model
from llmtrain.run_dir import Run
from llmtrain.runtime import cache_dir, make_accelerator
from llmtrain.tokenizer import load_tokenizer, save_tokenizer, token_byte_lengths

PLOT_CURVES = {"loss": ["train_loss", "val_loss"], "bits per byte": ["val_bpb"], "learning rate": ["lr"]}


def run(cfg: PretrainConfig) -> Path:
    """Pretrain per `cfg`; returns the finished run directory."""
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    source = hub_snapshot(resolve_model(cfg.preset, cfg.runs_dir), cfg.runs_dir, "--preset")
    run = Run.open(cfg, "pretrain", cfg.preset if source.kind == "preset" else "continued", accelerator)
    if source.kind != "preset":
        run.pin_parent("preset", cfg.preset, source.path)

    # ---- data: tokenizer and token shards, made by `llmtrain prepare` or, for a small corpus, here (main process
    # first, then the others find them in the cache)
    cache = cache_dir(cfg.cache_dir)
    data = find_pretrain_data(cfg, source, cache)
    if data.shards is None:
        check_inline_preparation(cfg, data.corpus, world)  # a large corpus stops here, before any process waits
        with accelerator.main_process_first():
            data = prepare_pretrain_data(cfg, source, cache)
    tokenizer, shards = data.tokenizer, data.shards
    train_data = TokenWindows(shards.tokens("train"), cfg.seq_len, "train")
    val_data = TokenWindows(shards.tokens("val"), cfg.seq_len, "val")
    token_bytes = torch.tensor(token_byte_lengths(tokenizer), device=device)

    train_sample = TokenWindows(shards.tokens("train")[: val_data.tokens.size], cfg.seq_len, "train")

    def evaluate(windows: TokenWindows = val_data) -> dict[str, float]:
        return evaluate_lm(model, windows, token_bytes, cfg.batch_size, cfg.eval_batches, accelerator)

    # ---- model and optimizer
    model = _build_model(cfg, source, tokenizer)
    n_params = parameter_count(model)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    total_steps = cfg.max_steps
    if cfg.max_tokens:
        total_steps = min(total_steps, math.ceil(cfg.max_tokens / tokens_per_step))
    model, optimizer, raw_model = prepare(accelerator, cfg, model)
    loop = Loop.begin(cfg, accelerator, run, model, optimizer, total_steps)
    loop.state.setdefault("tokens_seen", 0)
    if cfg.max_tokens and total_steps < cfg.max_steps:
        loop.stop_reason = "max_tokens"
    config = raw_model.config
    loop.flops_per_token = flops_per_token(
        non_embedding_params(raw_model), config.num_hidden_layers, config.hidden_size, cfg.seq_len
    )
    loop.start(
        _summary(cfg, n_params, data, tokens_per_step, world, device, accelerator.mixed_precision),
        preset=cfg.preset if source.kind == "preset" else None,
        parent=source.label if source.kind != "preset" else None,
        model={
            "source": source.kind,
            "spec": cfg.preset,
            "parameters": n_params,
            "architecture": type(raw_model).__name__,
        },
        data={"spec": cfg.data, "fingerprint": data.fingerprint, "shards": str(shards.path), **vars(shards.stats)},
    )

    # ---- the loop
    model.train()
    if loop.step == 0 and cfg.eval_every > 0:  # the fresh (or continued) model: the curves' first point
        loop.evaluated(evaluate(), evaluate(train_sample))
    with loop.training():
        for _ in loop.steps():
            if cfg.max_tokens and loop.state["tokens_seen"] >= cfg.max_tokens:  # a resumed run with a larger batch
                loop.stop("max_tokens")
                continue
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                with loop.waiting_for_data():
                    x, y = train_data.random_batch(cfg.seed, loop.step, micro, cfg.batch_size, device, rank, world)
                # Gradients are all-reduced once per optimizer step, on the last micro-step.
                with micro_step(accelerator, model, last=micro == cfg.grad_accum - 1):
                    logits = model(input_ids=x).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    accelerator.backward(loss / cfg.grad_accum)
                loss_sum += loss.detach()
            grad_norm = loop.optimizer_step()
            loop.state["tokens_seen"] += tokens_per_step
            totals = loop.reduce((loss_sum / cfg.grad_accum)[None], tokens=tokens_per_step / world)
            if totals is not None:
                logged = {"train_loss": totals[0] / world} | ({"grad_norm": grad_norm} if grad_norm is not None else {})
                loop.log(logged | {"tokens_seen": loop.state["tokens_seen"]})
            if loop.due(cfg.eval_every):
                val = evaluate()
                loop.evaluated(val, evaluate(train_sample))
                loop.write(f"step {loop.step}: val_loss {val['val_loss']:.4f}  val_bpb {val['val_bpb']:.4f}")
            if loop.due(cfg.sample_every):
                _print_samples(loop.write, raw_model, tokenizer, val_data, cfg, accelerator)
            loop.checkpoint()

        # ---- the end: evaluate (the best evaluation's weights with --keep_best), the test documents once, sample,
        # save a Hugging Face checkpoint, register
        final = evaluate()
        loop.evaluated(final, evaluate(train_sample))
        if loop.restore_best():
            final = evaluate()
        test = None
        if shards.stats.test_tokens > cfg.seq_len:
            test = evaluate(TokenWindows(shards.tokens("test"), cfg.seq_len, "test"))
        _print_samples(print, raw_model, tokenizer, val_data, cfg, accelerator)
        state_dict = loop.full_state_dict()
        if accelerator.is_main_process:
            if raw_model.generation_config.eos_token_id is None:  # a model's own end-of-sequence ids are kept
                raw_model.generation_config.eos_token_id = tokenizer.eos_token_id
            raw_model.generation_config.pad_token_id = tokenizer.pad_token_id
            raw_model.save_pretrained(run.path, state_dict=state_dict, safe_serialization=True)
            save_tokenizer(tokenizer, run.path)
        tokens_seen, train_time = loop.state["tokens_seen"], loop.train_time
        final |= {"tokens_seen": tokens_seen, "tokens_per_s": round(tokens_seen / train_time, 1) if train_time else 0.0}
        if loop.peak_flops and train_time:
            final["mfu"] = loop.flops_per_token * final["tokens_per_s"] / (loop.peak_flops * world)
        loop.finish(
            final,
            PLOT_CURVES,
            f"val_loss {final['val_loss']:.4f}, val_bpb {final['val_bpb']:.4f}, "
            f"{final['tokens_per_s']:,.0f} tokens/s ({loop.stop_reason})",
            test=test,
        )
    return run.path


# ---------------------------------------------------------------- helpers


def _build_model(cfg: PretrainConfig, source: ModelSource, tokenizer):
    from transformers import AutoModelForCausalLM

    if source.kind == "preset":
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        # Round the embedding up to a multiple of 64: faster matmuls, and unused rows cost nothing.
        vocab = 64 * math.ceil(len(tokenizer) / 64)
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(preset_config(cfg.preset, vocab, cfg.seq_len, special))
    model = load_causal_lm(source, cfg.runs_dir, cfg.attn_implementation, cfg.trust_remote_code)
    if len(tokenizer) > model.config.vocab_size:
        raise LLMTrainError(
            f"The tokenizer has {len(tokenizer)} tokens but model '{cfg.preset}' has an embedding of only "
            f"{model.config.vocab_size}: token ids past {model.config.vocab_size - 1} would crash. Use the model's "
            f"own tokenizer (drop --tokenizer) or a tokenizer with at most {model.config.vocab_size} tokens."
        )
    _check_same_vocabulary(cfg, source, tokenizer)
    check_positions(model, cfg.seq_len, "--seq_len", cfg.preset)
    return model


def _check_same_vocabulary(cfg: PretrainConfig, source: ModelSource, tokenizer) -> None:
    """A --tokenizer other than the one saved with the checkpoint gives its ids other meanings: every embedding
    would be read for the wrong token. Refuse it, saying how many tokens differ."""
    if not cfg.tokenizer or not any((Path(source.path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return
    own = load_tokenizer(source.path, trust_remote_code=cfg.trust_remote_code).get_vocab()
    given = tokenizer.get_vocab()
    differ = sum(own.get(token) != i for token, i in given.items()) + len(own.keys() - given.keys())
    if differ:
        raise LLMTrainError(
            f"--tokenizer {cfg.tokenizer} is not the tokenizer model '{cfg.preset}' was trained with: {differ:,} of "
            f"its {len(own):,} tokens are missing or have other ids, so the model's embeddings would be read for the "
            f"wrong tokens. Drop --tokenizer to continue with the model's own."
        )


def _print_samples(write, model, tokenizer, val_data: TokenWindows, cfg: PretrainConfig, accelerator) -> None:
    """Continue the first few tokens of held-out documents, so progress is visible as text. Every process
    samples (with sharded parameters each forward pass needs them all); the main one prints."""
    prompts = _sample_prompts(val_data, tokenizer, cfg.num_samples)
    outputs = sample(model, tokenizer, prompts, max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50)
    if not accelerator.is_main_process:
        return
    write("samples:")
    for prompt, out in zip(prompts, outputs):
        write(f"  {prompt!r} -> {out!r}")


def _sample_prompts(val_data: TokenWindows, tokenizer, n: int, prompt_tokens: int = 8) -> list[str]:
    tokens = val_data.tokens
    eos = tokenizer.eos_token_id
    starts = [0] + [int(i) + 1 for i in (tokens[:200_000] == eos).nonzero()[0][: n - 1]]
    # Cut at the last space so a prompt never ends inside a word or a number.
    texts = [tokenizer.decode(tokens[s : s + prompt_tokens], skip_special_tokens=True) for s in starts[:n]]
    prompts = [t.rsplit(" ", 1)[0] + " " if " " in t.strip() else t for t in texts]
    return [p for p in prompts if p.strip()] or [tokenizer.decode(tokens[:prompt_tokens])]


def _summary(cfg, n_params, data, tokens_per_step, world, device, precision) -> str:
    return (
        f"{cfg.preset}, {n_params / 1e6:.2f}M parameters, {world} process(es) on {device.type}, "
        f"precision {precision}\n"
        f"data: {data.shards.stats.describe()}\n"
        f"token shards {'prepared now' if data.prepared_now else 'found prepared'}: {data.shards.path}\n"
        f"{tokens_per_step:,} tokens per step (batch {cfg.batch_size} x seq {cfg.seq_len} x accum {cfg.grad_accum} "
        f"x {world} processes)"
    )
