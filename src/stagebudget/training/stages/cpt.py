"""Continued pre-training: causal-LM loss on raw text with TRL ``SFTTrainer`` (language modelling)."""

from __future__ import annotations

from typing import Any

from stagebudget.training.stages.common import (
    StageContext,
    StageOutput,
    quiet_libraries,
    train_and_merge,
    training_args,
)
from stagebudget.training.stages.sft import loss_metrics, sft_trainer
from stagebudget.trlconfig import corpus_name, corpus_size


def cpt_rows(ctx: StageContext) -> list[dict[str, Any]]:
    """``{"text"}`` rows of the stage's corpus (:func:`stagebudget.tasks.pretrain_corpus`, one pass
    of the stage)."""
    from stagebudget.tasks import pretrain_corpus

    texts = pretrain_corpus(seed=ctx.seed, n=corpus_size(ctx.spec), corpus=corpus_name(ctx.spec))
    return [{"text": t} for t in texts]


def run_cpt(ctx: StageContext) -> StageOutput:
    """Train one cpt stage on raw sequences (loss on every token) and merge its adapter."""
    from trl import SFTConfig

    quiet_libraries()
    with ctx.clock.setting_up():
        trainer = sft_trainer(ctx, SFTConfig(**training_args(ctx)), cpt_rows(ctx))
    model, steps, adapter = train_and_merge(ctx, trainer)
    return StageOutput(model=model, metrics=loss_metrics(ctx), steps_done=steps, adapter=adapter)
