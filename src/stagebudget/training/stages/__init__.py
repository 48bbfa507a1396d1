"""Stage functions: each stage kind is a function ``StageContext -> StageOutput``.

Which function trains a kind is part of the kind's one registration
(:func:`stagebudget.kinds.register_stage_kind`, its ``runner``: a ``"module:function"`` path
imported when first used, or a callable); :func:`get_stage` resolves it.

>>> get_stage("sft").__name__
'run_sft'
"""

from __future__ import annotations

import importlib

from stagebudget.errors import TrainingDiverged
from stagebudget.kinds import get_kind
from stagebudget.training.stages.common import (
    StageContext,
    StageFn,
    StageOutput,
    lora_config,
    merge,
    resolve_device,
)
from stagebudget.training.stages.cpt import run_cpt
from stagebudget.training.stages.rl import run_rl
from stagebudget.training.stages.sft import run_sft


def get_stage(kind: str) -> StageFn:
    """The stage function of ``kind`` (its registered runner); unknown kinds name the known."""
    try:
        runner = get_kind(kind).runner
    except ValueError as exc:
        raise KeyError(str(exc)) from None
    if callable(runner):
        return runner  # type: ignore[no-any-return]
    module, _, attr = runner.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


__all__ = [
    "StageContext",
    "StageFn",
    "StageOutput",
    "TrainingDiverged",
    "get_stage",
    "lora_config",
    "merge",
    "resolve_device",
    "run_cpt",
    "run_rl",
    "run_sft",
]
