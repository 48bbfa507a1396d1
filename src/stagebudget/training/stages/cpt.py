"""Continued pre-training: causal-LM loss on raw text with TRL ``SFTTrainer`` (language modelling)."""

from __future__ import annotations

from typing import Any

from stagebudget.training.stages.common import (
    StageContext,
    StageOutput,
    lora_config,
    quiet_libraries,
    stage_callbacks,
    train_and_merge,
    training_args,
)
from stagebudget.training.stages.sft import loss_metrics
from stagebudget.trlconfig import corpus_name, corpus_size


def cpt_dataset(ctx: StageContext) -> Any:
    """``{"text"}`` rows of the stage's corpus (:func:`stagebudget.tasks.pretrain_corpus`, one pass
    of the stage)."""
    from datasets import Dataset

    from stagebudget.tasks import pretrain_corpus

    texts = pretrain_corpus(seed=ctx.seed, n=corpus_size(ctx.spec), corpus=corpus_name(ctx.spec))
    return Dataset.from_list([{"text": t} for t in texts])


def run_cpt(ctx: StageContext) -> StageOutput:
    """Train one cpt stage on raw sequences (loss on every token) and merge its adapter."""
    from trl import SFTConfig, SFTTrainer

    quiet_libraries()
    spec = ctx.spec
    with ctx.clock.setting_up():
        args = SFTConfig(**training_args(ctx))
        trainer = SFTTrainer(
            model=ctx.model,
            args=args,
            train_dataset=cpt_dataset(ctx),
            processing_class=ctx.tokenizer,
            peft_config=lora_config(spec),
            callbacks=stage_callbacks(ctx),
        )
    model, steps, adapter = train_and_merge(ctx, trainer)
    return StageOutput(model=model, metrics=loss_metrics(ctx), steps_done=steps, adapter=adapter)
