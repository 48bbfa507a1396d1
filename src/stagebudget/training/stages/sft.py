"""Supervised fine-tuning: TRL ``SFTTrainer`` on prompt/completion pairs, loss on the completion."""

from __future__ import annotations

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


def sft_dataset(ctx: StageContext) -> Any:
    """``{"prompt", "completion"}`` rows in TRL's format (:func:`stagebudget.chat.sft_row`).

    Text prompts: the completion is the target followed by EOS, and the tokenizer adds BOS
    itself. Chat prompts: the chat template renders prompt and assistant turn. Either way
    exactly as in GRPO and evaluation.
    """
    from datasets import Dataset

    from stagebudget.chat import sft_row

    rows = [sft_row(ctx.tokenizer, e) for e in ctx.suite.train]
    if not rows:
        raise ValueError("the task suite has no training examples: an sft stage needs n_train >= 1")
    return Dataset.from_list(rows)


def run_sft(ctx: StageContext) -> StageOutput:
    """Train one SFT stage (own LoRA adapter, or full fine-tuning at rank 0) and merge it."""
    from trl import SFTConfig, SFTTrainer

    quiet_libraries()
    spec = ctx.spec
    with ctx.clock.setting_up():
        args = SFTConfig(**training_args(ctx, max_length=sft_max_length(ctx)))
        trainer = SFTTrainer(
            model=ctx.model,
            args=args,
            train_dataset=sft_dataset(ctx),
            processing_class=ctx.tokenizer,
            peft_config=lora_config(spec),
            callbacks=stage_callbacks(ctx),
        )
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
