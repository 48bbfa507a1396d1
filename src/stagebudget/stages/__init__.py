"""Stage registry: each stage kind is a function ``StageContext -> StageOutput``.

>>> sorted(STAGES)
['cpt', 'rl', 'sft']
"""

from __future__ import annotations

from collections.abc import Callable

from stagebudget.stages.common import (
    StageContext,
    StageFn,
    StageOutput,
    TrainingDiverged,
    lora_config,
    merge,
    resolve_device,
)
from stagebudget.stages.cpt import run_cpt
from stagebudget.stages.rl import run_rl
from stagebudget.stages.sft import run_sft

STAGES: dict[str, StageFn] = {"cpt": run_cpt, "sft": run_sft, "rl": run_rl}


def register_stage(kind: str) -> Callable[[StageFn], StageFn]:
    """Register ``fn`` as the stage function of ``kind`` (replacing any earlier one).

    >>> @register_stage("sft")
    ... def my_sft(ctx): ...
    >>> STAGES["sft"] is my_sft
    True
    >>> _ = register_stage("sft")(run_sft)
    """

    def decorator(fn: StageFn) -> StageFn:
        STAGES[kind] = fn
        return fn

    return decorator


def get_stage(kind: str) -> StageFn:
    """The stage function of ``kind``; unknown kinds name the registered ones."""
    if kind not in STAGES:
        raise KeyError(f"no stage registered for kind {kind!r}; registered: {', '.join(STAGES)}")
    return STAGES[kind]


__all__ = [
    "STAGES",
    "StageContext",
    "StageFn",
    "StageOutput",
    "TrainingDiverged",
    "get_stage",
    "lora_config",
    "merge",
    "register_stage",
    "resolve_device",
    "run_cpt",
    "run_rl",
    "run_sft",
]
