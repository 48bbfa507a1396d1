"""Stage specs and schedules: frozen, hashable, validated, YAML round-trip.

A :class:`Schedule` is everything that determines a trained model: base model, ordered stages,
task suite and seed. Between stages the adapter is merged, so each stage has its own LoRA rank.

>>> s = Schedule(stages=(StageSpec(kind="sft", steps=50, lora_rank=64),))
>>> Schedule.from_dict(s.to_dict()) == s
True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stagebudget.errors import ConfigError, from_pydantic
from stagebudget.fileio import atomic_write_yaml, read_yaml
from stagebudget.kinds import get_kind, kind_only_fields, stage_kinds

LORA_TARGETS = "all-linear"  # every linear layer but the output head (Llama, Qwen and others)
# The texts a cpt stage trains on (tasks/corpus.py builds them): "mixture", the default, is the
# built-in base's own pre-training mixture (raw sequences and task examples under every rule);
# "raw" holds the raw DNA and protein chunks alone.
CorpusName = Literal["mixture", "raw"]
CPT_CORPORA: tuple[str, ...] = get_args(CorpusName)


class Strict(BaseModel):
    """Frozen pydantic model that rejects unknown keys, naming them and the allowed ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"unknown key `{unknown[0]}`; allowed keys: {', '.join(cls.model_fields)}"
                )
        return data


def _check_targets(v: str) -> str:
    if v != LORA_TARGETS and not all(
            p.strip().replace(".", "_").isidentifier() for p in v.split(",")):
        raise ValueError(f"LoRA target modules must be '{LORA_TARGETS}' or comma-separated "
                         f"module names such as 'q_proj,v_proj', got {v!r}")
    return v


def vllm_misplaced(field: str) -> str:
    """The one message for a ``vllm`` setting on a stage kind that does not generate."""
    gen = [k for k in stage_kinds() if get_kind(k).generates]
    return f"`{field}` applies only to stages that generate ({' / '.join(gen)})"


class VLLMSpec(Strict):
    """A generating stage's completions sampled by vLLM (TRL's ``use_vllm``) instead of
    transformers' ``generate``: faster GRPO steps on a CUDA GPU, not bit-reproducible.

    ``mode``: ``colocate`` only (vLLM runs inside the trial's process on its GPU; TRL's
    ``server`` mode shares one server, whose weights concurrent trials would overwrite).
    ``gpu_memory_utilization``: the share of the GPU vLLM reserves (TRL's default 0.3).
    ``tensor_parallel_size``: GPUs one vLLM engine spans; TRL requires it to divide the
    trial's training processes, so it is 1 for a one-process trial. ``enable_sleep_mode``:
    vLLM releases its memory between generations (slower, less memory).
    """

    mode: Literal["colocate"] = "colocate"
    gpu_memory_utilization: float = Field(default=0.3, gt=0, le=1, strict=True)
    tensor_parallel_size: int = Field(default=1, ge=1, strict=True)
    enable_sleep_mode: bool = Field(default=False, strict=True)


class StageSpec(Strict):
    """One post-training stage.

    ``lora_rank`` 0 means full fine-tuning. ``batch_size`` is examples per step for cpt/sft and
    prompts per step for rl (each prompt gets ``num_generations`` completions). ``max_length``
    (tokens, cpt/sft) truncates training sequences; unset, sft takes the longest tokenised
    training example, so nothing is cut. ``max_completion_length`` (rl) caps generated tokens.
    """

    kind: str = Field(description="a registered stage kind")
    steps: int = Field(ge=1, strict=True)
    lora_rank: int = Field(default=8, ge=0, strict=True,
                           description="0 means full fine-tuning")
    lora_alpha: int | None = Field(default=None, ge=1, strict=True,
                                   description="default: twice the rank")
    lora_dropout: float | None = Field(default=None, ge=0, lt=1, strict=True,
                                       description="default: 0")
    lora_target_modules: Annotated[str, AfterValidator(_check_targets)] | None = Field(
        default=None, min_length=1, strict=True,
        description=f"'{LORA_TARGETS}' (the default) or comma-separated module names, "
                    "e.g. 'q_proj,v_proj'")
    learning_rate: float = Field(default=5e-4, gt=0, le=1.0, strict=True)
    batch_size: int = Field(default=32, ge=1, strict=True)
    eval_interval: int = Field(default=25, ge=1, strict=True)
    max_length: int | None = Field(default=None, ge=8, strict=True)
    num_generations: int | None = Field(default=None, ge=2, strict=True)
    max_completion_length: int | None = Field(default=None, ge=1, strict=True)
    beta: float | None = Field(default=None, ge=0, strict=True)
    temperature: float | None = Field(default=None, gt=0, strict=True)
    vllm: VLLMSpec | None = Field(default=None, description="generating stages (rl): sample "
                                  "completions with vLLM on a CUDA GPU; unset: transformers")
    corpus: CorpusName | None = Field(
        default=None, description=f"cpt stages: the texts trained on, one of {CPT_CORPORA}; unset: "
                                  f"'{CPT_CORPORA[0]}'")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        get_kind(v)  # raises, naming the registered kinds
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> StageSpec:
        own = get_kind(self.kind).defaults
        given = [f for f in kind_only_fields() if f not in own and getattr(self, f) is not None]
        if given:
            owners = [k for k in stage_kinds() if given[0] in get_kind(k).defaults]
            raise ValueError(f"`{given[0]}` applies only to {' / '.join(owners)} stages, but this "
                             f"stage is kind={self.kind!r}")
        if self.vllm is not None and not get_kind(self.kind).generates:
            raise ValueError(f"{vllm_misplaced('vllm')}, but this stage is kind={self.kind!r}")
        for name, value in own.items():  # the kind's defaults, written once in its registration
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        return self

    @property
    def alpha(self) -> int:
        """LoRA alpha; defaults to twice the rank."""
        return self.lora_alpha if self.lora_alpha is not None else max(1, 2 * self.lora_rank)

    @property
    def dropout(self) -> float:
        """LoRA dropout; defaults to 0."""
        return self.lora_dropout if self.lora_dropout is not None else 0.0

    @property
    def target_modules(self) -> str | list[str]:
        """LoRA target modules as peft takes them: ``"all-linear"`` or a list of names."""
        v = self.lora_target_modules
        return LORA_TARGETS if v in (None, LORA_TARGETS) else [p.strip() for p in v.split(",")]


BUILTIN_SIZES = {"n_train": 4000, "n_id_test": 200, "n_ood_test": 200}


class TasksRef(Strict):
    """Which tasks a schedule trains and is measured on, and how answers are scored.

    ``source`` is ``builtin`` or a path to a JSONL file of user tasks. ``seed`` is the data
    seed: it is fixed across trials so every trial is measured on the same held-out sets.
    The sizes ``n_train``/``n_id_test``/``n_ood_test`` choose how many built-in examples are
    drawn (default :data:`BUILTIN_SIZES`); for a task file they are the rows the file holds
    (filled in when a space is loaded, checked when the file is read again).

    ``scorer`` is a built-in scorer name or an import path ``package.module:function`` (see
    :mod:`stagebudget.tasks.scoring`); ``answer`` says which part of a completion is the answer
    (``full``, ``answer_tag``, ``last_line`` or ``regex:PATTERN``); ``format_reward`` is the RL
    reward's format term (default 0.1); ``max_new_tokens`` caps evaluation generation (default:
    the longest tokenised test completion, or answer, plus 2).
    """

    source: str = "builtin"
    names: tuple[str, ...] = ()
    n_train: int | None = Field(default=None, ge=1)
    n_id_test: int | None = Field(default=None, ge=1)
    n_ood_test: int | None = Field(default=None, ge=1)
    scorer: str | None = None
    answer: str | None = None
    format_reward: float | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _builtin_sizes(self) -> TasksRef:
        if self.source == "builtin":
            for name, value in BUILTIN_SIZES.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        return self

    def suite_args(self) -> dict[str, Any]:
        """Keyword arguments of :func:`stagebudget.tasks.load_suite` for this reference."""
        sizes = {k: getattr(self, k) for k in BUILTIN_SIZES if getattr(self, k) is not None}
        return {"source": self.source, "names": self.names, "seed": self.seed,
                "scorer": self.scorer, "answer": self.answer,
                "format_reward": self.format_reward, "max_new_tokens": self.max_new_tokens,
                **sizes}


IDENTITY_EXCLUDES = ("name",)  # a display label; it does not change what trains


def identity(schedule: Mapping[str, Any]) -> str:
    """The one answer to "same trained model?": canonical JSON of a schedule's dict form
    (``Schedule.to_dict()`` or a record's ``schedule``) without its display name.

    >>> a = Schedule(stages=(StageSpec(kind="sft", steps=5),), name="a").to_dict()
    >>> identity(a) == identity({**a, "name": "b"})
    True
    """
    return json.dumps({k: v for k, v in schedule.items() if k not in IDENTITY_EXCLUDES},
                      sort_keys=True)


class Schedule(Strict):
    """Base model + ordered stages + task suite + seed. Frozen, hashable, YAML round-trip."""

    base_model: str = "builtin:tiny"
    tasks: TasksRef = TasksRef()
    stages: tuple[StageSpec, ...]
    seed: int = 0
    budget_hours: float | None = Field(default=None, gt=0)
    trust_remote_code: bool = Field(default=False, strict=True)
    name: str | None = None

    @model_validator(mode="after")
    def _order(self) -> Schedule:
        if not self.stages:
            raise ValueError(f"a schedule needs at least one stage ({', '.join(stage_kinds())})")
        late = [s.kind for s in self.stages[1:] if get_kind(s.kind).first_only]
        if late:
            raise ValueError(f"a {late[0]} stage may only come first (e.g. continued pre-training "
                             "precedes SFT/RL)")
        return self

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) with unset RL fields dropped."""
        data = self.model_dump(mode="json", exclude_none=True)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> Schedule:
        """Validate ``data``; errors name ``source`` and the field."""
        if not isinstance(data, dict):
            raise ConfigError("a schedule must be a mapping with a `stages` list", source=source)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise from_pydantic(exc, source) from None

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        """Read a schedule YAML file (safe loading). Export files keep it under ``schedule:``."""
        data = read_yaml(path)
        if isinstance(data, dict) and "schedule" in data and "stages" not in data:
            data = data["schedule"]
        return cls.from_dict(data, source=path)

    def save(self, path: str | Path) -> None:
        """Write as YAML, atomically."""
        atomic_write_yaml(path, self.to_dict())

    def digest(self) -> str:
        """Content hash of everything that determines the trained model (see :func:`identity`)."""
        return hashlib.sha256(identity(self.to_dict()).encode()).hexdigest()[:16]

    def stage(self, kind: str) -> StageSpec | None:
        """The first stage of ``kind``, if any."""
        return next((s for s in self.stages if s.kind == kind), None)

    def describe(self, fields: Collection[str] = ()) -> str:
        """Short human label, e.g. ``sft 40@r64 -> rl 120@r4``: kind, steps and rank of each
        stage, plus the settings named in ``fields`` (see :func:`label_fields`), so that two
        schedules that differ only in, say, the SFT learning rate are told apart.

        >>> s = Schedule(stages=(StageSpec(kind="sft", steps=40, learning_rate=3e-3),))
        >>> s.describe({"sft.learning_rate"})
        'sft 40@r8 lr=3e-3'
        """
        parts = []
        for key, spec in _keyed_stages(self.stages):
            extra = "".join(f" {_short_name(f)}={_show(_shown(spec, f))}"
                            for f in _stage_settings(spec) if f"{key}.{f}" in fields)
            parts.append(f"{spec.kind} {spec.steps}@r{spec.lora_rank}{extra}")
        top = [f"{_short_name(k)}={_show(v)}" for k, v in _schedule_settings(self).items()
               if k in fields]
        return " -> ".join(parts) + (f", {', '.join(top)}" if top else "")


# What a label always shows of a stage (``sft 40@r8``); other settings only when they differ.
LABEL_BASE_FIELDS = ("kind", "steps", "lora_rank")
# Settings a difference in which does not need a label of its own (unless searched): the
# planner derives the evaluation interval from the steps (cost.eval_interval_for), and it
# decides when a stage is measured, not what it trains.
LABEL_DERIVED_FIELDS = ("eval_interval",)
# Short names of the settings a label shows (:meth:`Schedule.describe`); others keep their name.
LABEL_NAMES = {"learning_rate": "lr", "batch_size": "bs", "lora_alpha": "alpha",
               "lora_dropout": "dropout", "lora_target_modules": "targets",
               "eval_interval": "eval_every", "num_generations": "generations",
               "max_completion_length": "max_completion", "temperature": "temp",
               "base_model": "base"}


def label_fields(schedules: Iterable[Schedule | None], searched: Iterable[str] = ()) -> frozenset[str]:
    """The settings a label must show to tell ``schedules`` apart: those whose value is not
    the same in all of them (``sft.learning_rate``, ``seed``...), plus the searched Optuna
    parameters that name a setting (``searched``: a run's param names), so that a trial's
    label does not depend on which trials happen to exist yet. Steps and ranks are always
    shown (:data:`LABEL_BASE_FIELDS`), derived settings only when searched
    (:data:`LABEL_DERIVED_FIELDS`); None entries are skipped.

    >>> a = Schedule(stages=(StageSpec(kind="sft", steps=40, learning_rate=1e-3),))
    >>> sorted(label_fields([a, a.model_copy(update={"seed": 1})], searched=["sft.share"]))
    ['seed']
    """
    flat = [_flat_settings(s) for s in schedules if s is not None]
    keys = {k for f in flat for k in f}
    # compared among the schedules that have the setting (an SFT-only schedule has no RL lr)
    differ = {k for k in keys if k.rpartition(".")[2] not in LABEL_DERIVED_FIELDS
              and len({json.dumps(f[k], sort_keys=True) for f in flat if k in f}) > 1}
    known = keys | {f"{kind}.{name}" for kind in stage_kinds() for name in StageSpec.model_fields}
    return frozenset(differ | (set(searched) & known)) - {
        f"{kind}.{name}" for kind in stage_kinds() for name in LABEL_BASE_FIELDS}


def _keyed_stages(stages: Iterable[StageSpec]) -> list[tuple[str, StageSpec]]:
    """Stages keyed as Optuna params name them (``sft``); a repeated kind gets ``sft2``..."""
    seen: dict[str, int] = {}
    out = []
    for spec in stages:
        seen[spec.kind] = seen.get(spec.kind, 0) + 1
        out.append((spec.kind if seen[spec.kind] == 1 else f"{spec.kind}{seen[spec.kind]}", spec))
    return out


def _stage_settings(spec: StageSpec) -> dict[str, Any]:
    """A stage's settings as given (an unset alpha follows the rank: it differs only when set)."""
    return {f: getattr(spec, f) for f in StageSpec.model_fields if f not in LABEL_BASE_FIELDS}


def _shown(spec: StageSpec, name: str) -> Any:
    """A stage setting as trained: alpha, dropout and targets with their defaults applied."""
    effective = {"lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
                 "lora_target_modules": spec.lora_target_modules or LORA_TARGETS}
    return effective.get(name, getattr(spec, name))


def _schedule_settings(schedule: Schedule) -> dict[str, Any]:
    """The schedule-wide settings (seed, base model, tasks...), without the display name."""
    data = schedule.model_dump(mode="json", exclude={"stages", *IDENTITY_EXCLUDES})
    tasks = data.pop("tasks", {}) or {}
    return {**data, **{f"tasks.{k}": v for k, v in tasks.items()}}


def _flat_settings(schedule: Schedule) -> dict[str, Any]:
    stages = {f"{key}.{f}": v for key, spec in _keyed_stages(schedule.stages)
              for f, v in _stage_settings(spec).items()}
    return {**stages, **_schedule_settings(schedule)}


def _short_name(name: str) -> str:
    return LABEL_NAMES.get(name, name)


def _show(value: Any) -> str:
    """``1e-3`` for small or large floats, ``64`` for ints, ``default`` for an unset setting."""
    if value is None:
        return "default"
    if isinstance(value, float) and value != 0 and not 1e-2 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, list | tuple):
        return "+".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
