"""The stage-kind registry: everything stagebudget knows about a kind, registered in one call.

A kind is named once, with its place in the stage order, the stage fields only it takes (and
their defaults), the TRL config class it trains with, extra TRL arguments, whether it generates
(its steps cost generation, and its batch counts prompts) and the function that trains it, as an
import path so registering stays light. Schedules, the space schema, the cost model, the planner,
the training pipeline and export all read this registry; adding a kind is one
:func:`register_stage_kind` call (like peft's ``register_peft_method``, duplicates are refused).

>>> stage_kinds()
('cpt', 'sft', 'rl')
>>> get_kind("rl").defaults["num_generations"]
8
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class StageKindInfo:
    """One stage kind. ``defaults`` holds the kind-only stage fields and their default values
    (fields of :class:`~stagebudget.schedule.StageSpec` that other kinds must leave unset)."""

    name: str
    order: int
    runner: str | Callable[..., Any]
    trl_config: str
    generates: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    trl_args: Mapping[str, Any] = field(default_factory=dict)
    uses_max_length: bool = True
    first_only: bool = False


_KINDS: dict[str, StageKindInfo] = {}


def register_stage_kind(info: StageKindInfo) -> StageKindInfo:
    """Register a stage kind; a name already registered is refused (unregister it first).

    Kind-only fields must be fields of ``StageSpec``; this is checked when a stage of the kind
    is validated (this module imports nothing from stagebudget, so schedules can import it).
    """
    if not info.name.isidentifier():
        raise ValueError(f"a stage kind name must be an identifier, got {info.name!r}")
    if info.name in _KINDS:
        raise ValueError(f"stage kind {info.name!r} is already registered; registered: "
                         f"{', '.join(stage_kinds())}")
    frozen = StageKindInfo(**{**info.__dict__, "defaults": MappingProxyType(dict(info.defaults)),
                              "trl_args": MappingProxyType(dict(info.trl_args))})
    _KINDS[info.name] = frozen
    return frozen


def unregister_stage_kind(name: str) -> None:
    """Remove a registered kind (tests register toy kinds and remove them again)."""
    _KINDS.pop(name, None)


def stage_kinds() -> tuple[str, ...]:
    """Registered kind names in stage order (the order stages run in a schedule)."""
    return tuple(k.name for k in sorted(_KINDS.values(), key=lambda k: (k.order, k.name)))


def get_kind(name: str) -> StageKindInfo:
    """The registration of ``name``; an unknown name is a ValueError listing the known ones."""
    if name not in _KINDS:
        raise ValueError(f"unknown stage kind {name!r}; allowed: {', '.join(stage_kinds())}")
    return _KINDS[name]


def kind_only_fields() -> tuple[str, ...]:
    """Stage fields that belong to one kind only (e.g. rl's ``num_generations``)."""
    seen: dict[str, None] = {}
    for kind in stage_kinds():
        seen.update(dict.fromkeys(_KINDS[kind].defaults))
    return tuple(seen)


# Measured workable on the embedded default suite (see FINDINGS): 8 generations per prompt,
# 12 completion tokens, no KL term, sampling at temperature 1.
register_stage_kind(StageKindInfo(
    name="cpt", order=0, runner="stagebudget.training.stages.cpt:run_cpt", trl_config="trl.SFTConfig",
    first_only=True,
    trl_args={"completion_only_loss": False, "dataset_text_field": "text"}))
register_stage_kind(StageKindInfo(
    name="sft", order=10, runner="stagebudget.training.stages.sft:run_sft", trl_config="trl.SFTConfig",
    trl_args={"completion_only_loss": True}))
register_stage_kind(StageKindInfo(
    name="rl", order=20, runner="stagebudget.training.stages.rl:run_rl", trl_config="trl.GRPOConfig",
    generates=True, uses_max_length=False,
    defaults={"num_generations": 8, "max_completion_length": 12, "beta": 0.0, "temperature": 1.0},
    # prompts come in the stage's own stratified order (stagebudget.training.stages.rl.rl_rows)
    trl_args={"shuffle_dataset": False}))
