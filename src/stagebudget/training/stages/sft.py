"""Supervised fine-tuning: TRL ``SFTTrainer`` on prompt/completion pairs, loss on the completion."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

from stagebudget.training.stages.common import (
    StageContext,
    StageOutput,
    last_of,
    lora_config,
    mean_of,
    quiet_libraries,
    stage_callbacks,
    train_and_merge,
    training_args,
)


def sft_rows(ctx: StageContext) -> list[dict[str, Any]]:
    """``{"prompt", "completion"}`` rows in TRL's format (:func:`stagebudget.chat.sft_row`).

    Text prompts: the completion is the target followed by EOS, and the tokenizer adds BOS
    itself. Chat prompts: the chat template renders prompt and assistant turn. Either way
    exactly as in GRPO and evaluation.
    """
    from stagebudget.chat import sft_row

    rows = [sft_row(ctx.tokenizer, e) for e in ctx.suite.train]
    if not rows:
        raise ValueError("the task suite has no training examples: an sft stage needs n_train >= 1")
    return rows


# TRL prepares an SFT training set (tokenises, builds labels, truncates) the same way every time
# for the same rows, tokenizer and preparation arguments: ~4 s of one core for the demo's 8,000
# examples, most of an SFT stage's setup. A Ray worker trains trial after trial of one search on
# the same suite, so each process keeps the last sets TRL prepared and hands one back to TRL as
# prepared (``skip_prepare_dataset``) when everything that preparation reads is the same. A set
# larger than PREPARED_MAX_BYTES in memory is not kept: a worker must not hold a user's large
# corpus between trials.
PREPARED_KEPT = 2
PREPARED_MAX_BYTES = 1 << 30
_prepared: OrderedDict[str, Any] = OrderedDict()
# The SFTConfig fields TRL 1.16's preparation reads (``SFTTrainer._prepare_dataset``).
PREPARATION_ARGS = ("max_length", "truncation_mode", "packing", "packing_strategy",
                    "padding_free", "dataset_text_field", "completion_only_loss",
                    "assistant_only_loss", "eos_token", "chat_template_path")


def preparation_key(rows: list[dict[str, Any]], tokenizer: Any, args: Any) -> str | None:
    """What TRL's preparation of ``rows`` depends on, hashed: the rows, the tokenizer's whole
    content (vocabulary, normaliser, post-processor, special tokens, chat template) and the
    :data:`PREPARATION_ARGS` of ``args``. None for a tokenizer without a serialisable
    backend (never reused).

    >>> class Tok:
    ...     class backend_tokenizer:
    ...         to_str = staticmethod(lambda: '{"model": {}}')
    ...     chat_template, special_tokens_map = None, {"eos_token": "</s>"}
    >>> class Args:
    ...     max_length = 32
    >>> key = preparation_key([{"prompt": "a", "completion": "b</s>"}], Tok(), Args())
    >>> Args.max_length = 64
    >>> key == preparation_key([{"prompt": "a", "completion": "b</s>"}], Tok(), Args())
    False
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    content = {
        "rows": rows,
        "tokenizer": [type(tokenizer).__name__, backend.to_str(),
                      getattr(tokenizer, "chat_template", None),
                      getattr(tokenizer, "special_tokens_map", None)],
        "args": {name: getattr(args, name, None) for name in PREPARATION_ARGS},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def keep_prepared(key: str | None, dataset: Any) -> None:
    """Keep ``dataset`` (as TRL prepared it) under ``key``: the :data:`PREPARED_KEPT` latest,
    each at most :data:`PREPARED_MAX_BYTES` in memory."""
    if key is None or dataset.data.nbytes > PREPARED_MAX_BYTES:  # a datasets.Dataset's table
        return
    _prepared[key] = dataset
    _prepared.move_to_end(key)
    while len(_prepared) > PREPARED_KEPT:
        _prepared.popitem(last=False)


def sft_trainer(ctx: StageContext, args: Any, rows: list[dict[str, Any]]) -> Any:
    """TRL's ``SFTTrainer`` for the stage (SFT, or CPT's language modelling) on ``rows``, with
    the set TRL prepared before in this process when :func:`preparation_key` matches."""
    from datasets import Dataset
    from trl import SFTTrainer

    key = preparation_key(rows, ctx.tokenizer, args)
    prepared = _prepared.get(key) if key is not None else None
    if prepared is not None:
        args.dataset_kwargs = {"skip_prepare_dataset": True}  # stagebudget sets no others
    trainer = SFTTrainer(
        model=ctx.model,
        args=args,
        train_dataset=prepared if prepared is not None else Dataset.from_list(rows),
        processing_class=ctx.tokenizer,
        peft_config=lora_config(ctx.spec),
        callbacks=stage_callbacks(ctx),
    )
    keep_prepared(key, trainer.train_dataset)
    return trainer


def run_sft(ctx: StageContext) -> StageOutput:
    """Train one SFT stage (own LoRA adapter, or full fine-tuning at rank 0) and merge it."""
    from trl import SFTConfig

    quiet_libraries()
    with ctx.clock.setting_up():
        args = SFTConfig(**training_args(ctx, max_length=sft_max_length(ctx)))
        trainer = sft_trainer(ctx, args, sft_rows(ctx))
    model, steps, adapter = train_and_merge(ctx, trainer)
    return StageOutput(model=model, metrics=loss_metrics(ctx), steps_done=steps, adapter=adapter)


def sft_max_length(ctx: StageContext) -> int:
    """The stage's ``max_length``, or the longest tokenised training example when unset."""
    from stagebudget.chat import longest_sft_example

    if ctx.spec.max_length is not None:
        return ctx.spec.max_length
    return longest_sft_example(ctx.tokenizer, ctx.suite)


def loss_metrics(ctx: StageContext) -> dict[str, Any]:
    """First, last and mean logged training loss of a stage."""
    rows = [r for r in ctx.logs if "loss" in r]
    return {
        "train_loss": last_of(rows, "loss"),
        "train_loss_first": rows[0]["loss"] if rows else None,
        "train_loss_mean": mean_of(rows, "loss"),
    }
