"""The stage-kind registry: everything stagebudget knows about a kind, registered in one call.

A kind is named once, with its place in the stage order, the stage fields only it takes (and
their defaults), the TRL config class it trains with, extra TRL arguments, whether it generates
(its steps cost generation, and its batch counts prompts), what it trains on, which training
signal its curves carry, its part in the SFT/RL trade-off, how the exported script builds its
data, and the function that trains it, as an import path so registering stays light.
Schedules, the space schema, the cost model, the planner, the training pipeline, the reference
points, the run view and export all read this registry, never a kind's name; adding a kind is
one :func:`register_stage_kind` call (like peft's ``register_peft_method``, duplicates are
refused).

>>> stage_kinds()
('cpt', 'sft', 'rl')
>>> get_kind("rl").defaults["num_generations"]
8
>>> kinds_with_role(IMITATION)
('sft',)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# A kind's part in the SFT/RL trade-off stagebudget measures (``StageKindInfo.role``):
# imitation stages make up a trial's "SFT share" (status, the report, the reference points),
# the reinforcement stage takes the rest of the budget in the reference recipes.
IMITATION = "imitation"
REINFORCEMENT = "reinforcement"
ROLES = (IMITATION, REINFORCEMENT)


@dataclass(frozen=True)
class StageKindInfo:
    """One stage kind. ``defaults`` holds the kind-only stage fields and their default values
    (fields of :class:`~stagebudget.schedule.StageSpec` that other kinds must leave unset).

    ``text_corpus``: the stage trains on the generated pre-training corpus, one pass of
    :func:`~stagebudget.trlconfig.corpus_size` texts (exports say how many), not on the tasks.
    ``data_fields``: those of ``defaults`` that choose the stage's training data (cpt's
    ``corpus``); the others are TRL config fields, passed to ``trl_config`` as they are.
    ``signal``: the curve column its training signal fills, read from the TRL log entry
    ``signal_log``. ``role``: one of :data:`ROLES`, or None (a stage outside the SFT/RL
    trade-off, such as cpt). ``script_data``: the exported script's code that builds the
    stage's training rows (statements ending in ``return``; the names it may use are those of
    the script's ``stage_dataset``: ``stage``, ``suite``, ``tokenizer``, ``SEED``), with
    ``script_doc`` saying what they are; None: the exported script cannot train the kind.
    """

    name: str
    order: int
    runner: str | Callable[..., Any]
    trl_config: str
    generates: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    trl_args: Mapping[str, Any] = field(default_factory=dict)
    uses_max_length: bool = True
    first_only: bool = False
    text_corpus: bool = False
    data_fields: tuple[str, ...] = ()
    signal: str = "train_loss"
    signal_log: str = "loss"
    role: str | None = None
    script_data: str | None = None
    script_doc: str = ""


_KINDS: dict[str, StageKindInfo] = {}


def register_stage_kind(info: StageKindInfo) -> StageKindInfo:
    """Register a stage kind; a name already registered is refused (unregister it first).

    Kind-only fields must be fields of ``StageSpec``; this is checked when a stage of the kind
    is validated (this module imports nothing from stagebudget, so schedules can import it).
    """
    if not info.name.isidentifier():
        raise ValueError(f"a stage kind name must be an identifier, got {info.name!r}")
    if info.role is not None and info.role not in ROLES:
        raise ValueError(f"stage kind {info.name!r}: role must be one of {', '.join(ROLES)} or "
                         f"None, but got {info.role!r}")
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


def kinds_with_role(role: str) -> tuple[str, ...]:
    """Registered kinds with ``role`` (one of :data:`ROLES`), in stage order."""
    return tuple(k for k in stage_kinds() if _KINDS[k].role == role)


def signal_columns() -> tuple[str, ...]:
    """The curve columns the registered kinds' training signals fill, each once, in stage order
    (``('train_loss', 'reward')`` for the built-in kinds)."""
    return tuple(dict.fromkeys(_KINDS[k].signal for k in stage_kinds()))


register_stage_kind(StageKindInfo(
    name="cpt", order=0, runner="stagebudget.training.stages.cpt:run_cpt", trl_config="trl.SFTConfig",
    first_only=True, text_corpus=True, defaults={"corpus": None}, data_fields=("corpus",),
    trl_args={"completion_only_loss": False, "dataset_text_field": "text"},
    script_doc="raw text",
    script_data='''return Dataset.from_list([{"text": t} for t in pretrain_corpus(
        seed=SEED, n=stage["corpus_size"], corpus=stage["corpus"])])'''))
register_stage_kind(StageKindInfo(
    name="sft", order=10, runner="stagebudget.training.stages.sft:run_sft", trl_config="trl.SFTConfig",
    role=IMITATION,
    trl_args={"completion_only_loss": True},
    script_doc="prompt/completion rows as the trials build them (text: answer + EOS; chat "
               "messages: the template renders prompt and assistant turn)",
    script_data="return Dataset.from_list([sft_row(tokenizer, e) for e in suite.train])"))
# Measured workable on the embedded default suite (see FINDINGS): 8 generations per prompt,
# 12 completion tokens, no KL term, sampling at temperature 1.
register_stage_kind(StageKindInfo(
    name="rl", order=20, runner="stagebudget.training.stages.rl:run_rl", trl_config="trl.GRPOConfig",
    generates=True, uses_max_length=False, signal="reward", signal_log="reward", role=REINFORCEMENT,
    defaults={"num_generations": 8, "max_completion_length": 12, "beta": 0.0, "temperature": 1.0},
    # prompts come in the stage's own stratified order (stagebudget.training.stages.rl.rl_rows)
    trl_args={"shuffle_dataset": False},
    script_doc="prompts with answer and task, in stagebudget's stratified order (the config "
               "does not shuffle them)",
    script_data="return Dataset.from_list(rl_rows(suite.train, SEED))"))
