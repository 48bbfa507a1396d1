"""Search spaces: YAML files in ``search_spaces/``, validated before any compute.

The YAML uses a short distribution schema (``type``, ``low``, ``high``, ``log``, ``step``,
``choices``); :func:`to_optuna` is the one place it becomes Optuna distributions, and
:meth:`SearchSpace.schedule_from_params` is the one pure function from sampled params to a
:class:`~stagebudget.schedule.Schedule`.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from stagebudget.cost import Budget, CostModel, ModelShape, default_cost_model, plan_schedule
from stagebudget.errors import BudgetError, ConfigError, from_pydantic
from stagebudget.fileio import read_yaml
from stagebudget.schedule import (
    BUILTIN_SIZES,
    STAGE_KINDS,
    Schedule,
    StageSpec,
    Strict,
    TasksRef,
)
from stagebudget.tasks.scoring import is_scorer_file

OBJECTIVES: dict[str, str] = {
    "id_accuracy": "maximize",
    "ood_accuracy": "maximize",
    "device_hours": "minimize",
}
RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
TUNABLE_FIELDS = tuple(f for f in StageSpec.model_fields if f not in ("kind", "steps"))


class Dist(Strict):
    """One searched dimension: ``{type: float, low: 1e-4, high: 1e-2, log: true}``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> Dist:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("`choices` must be a non-empty list for type categorical")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"`choices` must not repeat a value, got {list(self.choices)}")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("type categorical takes only `choices` (no low/high/log/step)")
            return self
        if self.choices is not None:
            raise ValueError(f"`choices` is only for type categorical, not {self.type}")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type} needs both `low` and `high`")
        if self.low > self.high:
            raise ValueError(f"`low <= high` must hold, but got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, but got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("`log` and `step` cannot be combined (Optuna forbids it)")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"`step` must be > 0, got {self.step}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"type int needs integer low/high, got {self.low}..{self.high}")
        return self

    def corners(self) -> list[Any]:
        """Extreme values (all choices for categorical): used to cost the space's edges."""
        if self.type == "categorical":
            return list(self.choices or ())
        lo, hi = self.low, self.high
        return [int(lo), int(hi)] if self.type == "int" else [lo, hi]  # type: ignore[arg-type]

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler; continuous ranges need a ``step``."""
        if self.type == "categorical":
            return list(self.choices or ())
        lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None:
            raise ValueError("the grid sampler needs `step` on every float dimension")
        n = math.floor((hi - lo) / step + 1e-9) + 1
        values = [lo + i * step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]

    def middle(self) -> Any:
        """A representative value inside the range (geometric middle for log ranges)."""
        if self.type == "categorical":
            return (self.choices or ())[len(self.choices or ()) // 2]
        lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
        mid = math.sqrt(lo * hi) if self.log else (lo + hi) / 2
        if self.step is not None:
            mid = lo + round((mid - lo) / self.step) * self.step
        return round(mid) if self.type == "int" else mid


def to_optuna(dist: Dist) -> Any:
    """The single converter from the YAML schema to an Optuna distribution."""
    import optuna.distributions as od

    if dist.type == "categorical":
        return od.CategoricalDistribution(list(dist.choices or ()))
    if dist.type == "int":
        step = int(dist.step) if dist.step is not None else 1
        return od.IntDistribution(int(dist.low), int(dist.high), log=dist.log, step=step)  # type: ignore[arg-type]
    return od.FloatDistribution(dist.low, dist.high, log=dist.log, step=dist.step)  # type: ignore[arg-type]


Value = Dist | float | int | str | bool


class StageDims(Strict):
    """One stage in a space: a budget share (or steps) plus fixed or searched stage fields."""

    share: Dist | float | Literal["rest"] | None = None
    steps: Dist | int | None = None
    lora_rank: Dist | int = 8
    lora_alpha: Dist | int | None = None
    learning_rate: Dist | float = 5e-4
    batch_size: Dist | int = 32
    eval_interval: Dist | int = 25
    max_length: Dist | int | None = None
    num_generations: Dist | int | None = None
    max_completion_length: Dist | int | None = None
    beta: Dist | float | None = None
    temperature: Dist | float | None = None

    @field_validator("lora_rank")
    @classmethod
    def _rank(cls, v: Any) -> Any:
        values = v.choices if isinstance(v, Dist) and v.type == "categorical" else (
            [v.low, v.high] if isinstance(v, Dist) else [v])
        for r in values or ():
            if isinstance(r, bool) or not isinstance(r, int | float) or r < 0 or r != int(r):
                raise ValueError(
                    f"LoRA ranks must be non-negative integers (0 = full fine-tuning), got {r!r}")
        return v

    @model_validator(mode="after")
    def _amount(self) -> StageDims:
        if (self.share is None) == (self.steps is None):
            raise ValueError("give exactly one of `share` (fraction of the budget) or `steps`")
        if isinstance(self.share, float | int) and not 0 <= self.share <= 1:
            raise ValueError(f"`share` must be within [0, 1], got {self.share}")
        if isinstance(self.share, Dist) and ((self.share.type == "categorical" and any(
                not isinstance(c, int | float) or not 0 <= c <= 1 for c in self.share.choices or ()))
                or (self.share.type != "categorical" and not 0 <= self.share.low <= self.share.high <= 1)):  # type: ignore[operator]
            raise ValueError("`share` values must lie within [0, 1]")
        return self


class BudgetSpec(Strict):
    per_trial_hours: float = Field(gt=0)
    search_hours: float | None = Field(default=None, gt=0)


class ObjectiveSpec(Strict):
    name: str
    direction: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="after")
    def _known(self) -> ObjectiveSpec:
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; allowed: {', '.join(OBJECTIVES)}")
        if self.direction is None:
            object.__setattr__(self, "direction", OBJECTIVES[self.name])
        return self


class SamplerSpec(Strict):
    name: str = "tpe"
    seed: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v not in SAMPLERS:
            raise ValueError(f"unknown sampler {v!r}; allowed: {', '.join(SAMPLERS)}")
        return v


class Resources(Strict):
    cpu: float = Field(default=1, gt=0)
    gpu: float = Field(default=0, ge=0)


DEFAULT_OBJECTIVES = (ObjectiveSpec(name="id_accuracy"), ObjectiveSpec(name="ood_accuracy"))


class SearchSpace(Strict):
    """A whole search: what varies, the budgets, objectives, sampler and how many trials."""

    name: str = "search"
    base_model: str = "builtin:tiny"
    tasks: TasksRef = TasksRef()
    budget: BudgetSpec
    stages: dict[str, StageDims]
    objectives: tuple[ObjectiveSpec, ...] = DEFAULT_OBJECTIVES
    sampler: SamplerSpec = SamplerSpec()
    trials: int = Field(default=8, ge=1)
    concurrency: int = Field(default=1, ge=1)
    resources_per_trial: Resources = Resources()
    seed: int = 0
    references: bool = True
    max_retries: int = Field(default=1, ge=0)
    device: str = "auto"
    cost_table: str | None = None
    trust_remote_code: bool = False

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_run_name(v)

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_names(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if not v:
                raise ValueError(f"at least one stage is needed; allowed: {', '.join(STAGE_KINDS)}")
            for kind in v:
                if kind not in STAGE_KINDS:
                    raise ValueError(f"unknown stage {kind!r}; allowed: {', '.join(STAGE_KINDS)}")
        return v

    @field_validator("stages")
    @classmethod
    def _stage_kinds(cls, v: dict[str, StageDims]) -> dict[str, StageDims]:
        modes = {"share" if d.share is not None else "steps" for d in v.values()}
        if len(modes) > 1:
            raise ValueError("all stages must use `share`, or all `steps`, not a mix")
        rests = [k for k, d in v.items() if d.share == "rest"]
        if len(rests) > 1:
            raise ValueError(f"only one stage may take `share: rest`, got {rests}")
        top = sum(_high(d.share) for d in v.values() if d.share not in (None, "rest"))
        if modes == {"share"} and top > 1 + 1e-9:
            raise ValueError(f"the stages' largest shares add up to {top:g} > 1")
        for kind, dims in v.items():
            if kind != "rl":
                extra = [f for f in ("num_generations", "max_completion_length", "beta",
                                     "temperature") if getattr(dims, f) is not None]
                if extra:
                    raise ValueError(f"`{kind}.{extra[0]}` applies only to the rl stage")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: tuple[ObjectiveSpec, ...]) -> tuple[ObjectiveSpec, ...]:
        names = [o.name for o in v]
        if not names:
            raise ValueError(f"at least one objective is needed; allowed: {', '.join(OBJECTIVES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"objectives must not repeat, got {names}")
        return v

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> SearchSpace:
        """Read and validate a space file; ``overrides`` (e.g. from the CLI) replace top-level keys."""
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError("a search space must be a YAML mapping (key: value)", source=path)
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        try:
            space = cls.model_validate(data)
        except ValidationError as exc:
            raise from_pydantic(exc, path) from None
        space = space._with_resolved_paths(Path(path).resolve().parent, path)
        space._source = str(path)
        space = space._with_task_sizes()
        if space.sampler.name == "grid":
            space.grid_space()
        space.check_feasible()
        return space

    def check_inputs(self) -> list[str]:
        """Check the task file and the base model together before any compute is spent.

        Task rows, splits, the scorer and the answer extraction are validated by loading the
        suite (the scorer is imported and called once); a local model directory must hold a
        config, safetensors weights and a tokenizer whose chat template and tokenisation fit
        the prompts (:func:`stagebudget.chat.check_model_tasks`). Built-in base models are
        built later, once, by the search driver. Returns warnings to show the user.
        """
        from stagebudget.tasks import load_suite

        try:
            suite = load_suite(**self.tasks.suite_args())
        except ValueError as exc:
            raise ConfigError(str(exc), source=self._source, field="tasks") from None
        warnings = list(suite.warnings)
        if self.base_model.startswith("builtin:"):
            if suite.conversational:
                raise ConfigError(
                    f"the task file {self.tasks.source} gives prompts as chat messages, but the "
                    f"built-in model {self.base_model} has no chat template; write the prompts "
                    "as plain text or use a local model directory whose tokenizer has one",
                    source=self._source, field="tasks")
            return warnings
        return warnings + self._check_model(suite)

    def _check_model(self, suite: Any) -> list[str]:
        from stagebudget.basemodel import load_tokenizer, resolve_base_model
        from stagebudget.chat import check_model_tasks

        try:
            path = resolve_base_model(self.base_model, allow_build=False)
            tokenizer = load_tokenizer(path, trust_remote_code=self.trust_remote_code)
            return check_model_tasks(tokenizer, suite, self.base_model)
        except ValueError as exc:
            raise ConfigError(str(exc), source=self._source, field="base_model") from None

    def _with_task_sizes(self) -> SearchSpace:
        """A task file's split sizes filled in from the rows it holds (records show them).

        Planned schedules carry them; loading the file again checks they still hold.
        """
        from stagebudget.tasks import TaskFileError, task_file_sizes

        t = self.tasks
        if t.source == "builtin" or all(getattr(t, k) is not None for k in BUILTIN_SIZES):
            return self
        try:
            held = task_file_sizes(Path(t.source))
        except TaskFileError:
            return self  # check_inputs reports the file's problem, naming the line
        fill = {k: v for k, v in held.items() if getattr(t, k) is None}
        return self.model_copy(update={"tasks": t.model_copy(update=fill)})

    def _with_resolved_paths(self, folder: Path, source: str | Path) -> SearchSpace:
        """Make relative paths absolute against the space file's folder, which they may not leave."""
        def inside(value: str, field: str) -> str:
            p = Path(value).expanduser()
            if p.is_absolute():
                return str(p)
            resolved = (folder / p).resolve()
            if not resolved.is_relative_to(folder):
                raise ConfigError(
                    f"relative path {value!r} leaves the space file's folder {folder}; give an "
                    "absolute path to use a file elsewhere", source=source, field=field)
            return str(resolved)

        update: dict[str, Any] = {}
        if self.tasks.source != "builtin":
            update["tasks"] = self.tasks.model_copy(
                update={"source": inside(self.tasks.source, "tasks.source")})
        is_local = self.base_model.startswith((".", "/", "~")) or (folder / self.base_model).exists()
        if not self.base_model.startswith("builtin:") and is_local:
            update["base_model"] = inside(self.base_model, "base_model")
        if is_scorer_file(self.tasks.scorer):
            file, _, function = str(self.tasks.scorer).rpartition(":")
            tasks = update.get("tasks", self.tasks)
            update["tasks"] = tasks.model_copy(
                update={"scorer": f"{inside(file, 'tasks.scorer')}:{function}"})
        if self.cost_table:
            update["cost_table"] = inside(self.cost_table, "cost_table")
        return self.model_copy(update=update) if update else self

    _source: str | None = None

    # --- the search dimensions --------------------------------------------------------------
    def dimensions(self) -> dict[str, Dist]:
        """Searched dimensions by Optuna parameter name (``sft.lora_rank``...)."""
        dims: dict[str, Dist] = {}
        for kind, stage in self.stages.items():
            for fname in ("share", "steps", *TUNABLE_FIELDS):
                value = getattr(stage, fname, None)
                if isinstance(value, Dist):
                    dims[f"{kind}.{fname}"] = value
        return dims

    def optuna_space(self) -> dict[str, Any]:
        return {name: to_optuna(d) for name, d in self.dimensions().items()}

    def grid_space(self) -> dict[str, list[Any]]:
        try:
            return {name: d.grid() for name, d in self.dimensions().items()}
        except ValueError as exc:
            raise ConfigError(str(exc), source=self._source, field="sampler.name") from None

    @property
    def mode(self) -> str:
        return "share" if any(d.share is not None for d in self.stages.values()) else "steps"

    @property
    def per_trial_budget(self) -> Budget:
        return Budget(hours=self.budget.per_trial_hours)

    def cost_model(self, device: str = "cpu") -> CostModel:
        """The calibrated table if one is named (or saved for this model+device), else analytic."""
        if self.cost_table:
            path = Path(self.cost_table)
            if not path.is_file():
                raise ConfigError(f"cost table {path} not found (run `stagebudget calibrate`)",
                                  source=self._source, field="cost_table")
            return CostModel.load(path, ModelShape.for_ref(self.base_model))
        return default_cost_model(self.base_model, device)

    # --- params -> schedule (pure) -----------------------------------------------------------
    def schedule_from_params(self, params: dict[str, Any], cost: CostModel, seed: int | None = None,
                             name: str | None = None) -> Schedule:
        """The one function from sampled params to a schedule that fits the per-trial budget."""
        allocation: dict[str, float] = {}
        stage_params: dict[str, dict[str, Any]] = {}
        for kind, stage in self.stages.items():
            fields: dict[str, Any] = {}
            for fname in TUNABLE_FIELDS:
                value = params.get(f"{kind}.{fname}", getattr(stage, fname))
                if value is not None and not isinstance(value, Dist):
                    fields[fname] = value
            stage_params[kind] = fields
            amount_field = "share" if self.mode == "share" else "steps"
            amount = params.get(f"{kind}.{amount_field}", getattr(stage, amount_field))
            allocation[kind] = amount
        rest = [k for k, v in allocation.items() if v == "rest"]
        if rest:
            taken = sum(float(v) for k, v in allocation.items() if k not in rest)
            allocation[rest[0]] = max(0.0, 1.0 - taken)
            if allocation[rest[0]] < 1e-9:
                allocation[rest[0]] = 0.0
        return plan_schedule(
            allocation, stage_params, self.per_trial_budget, cost, mode=self.mode,
            base_model=self.base_model, tasks=self.tasks,
            seed=self.seed if seed is None else seed, name=name,
        )

    def corner_params(self, limit: int = 4096) -> Iterator[dict[str, Any]]:
        """Every combination of the dimensions' extremes (sampled when there are too many)."""
        dims = self.dimensions()
        names = list(dims)
        values = [dims[n].corners() for n in names]
        total = math.prod(len(v) for v in values) if values else 1
        if total <= limit:
            for combo in itertools.product(*values):
                yield dict(zip(names, combo, strict=True))
            return
        rng = random.Random(0)
        for _ in range(limit):
            yield {n: rng.choice(v) for n, v in zip(names, values, strict=True)}

    def check_feasible(self, cost: CostModel | None = None) -> tuple[Schedule, Schedule]:
        """Plan every corner of the space; return the cheapest and most expensive schedules.

        A corner that cannot fit one step of a stage is an error naming the file and what would fit.
        """
        cost = cost or self.cost_model()
        plans = []
        for params in self.corner_params():
            try:
                schedule = self.schedule_from_params(params, cost)
            except BudgetError as exc:
                raise ConfigError(f"{exc} (at {params})", source=self._source,
                                  field="budget.per_trial_hours") from None
            plans.append((cost.schedule_seconds(schedule), schedule))
        plans.sort(key=lambda p: p[0])
        return plans[0][1], plans[-1][1]

    def reference_points(self) -> list[tuple[str, dict[str, Any]]]:
        """Reference schedules every front is read against, as params inside this space.

        ``sft_only`` and ``rl_only`` (from the base), and ``heuristic``: the published
        recipe of brief SFT (a quarter of the budget), a larger RL share, and an SFT LoRA rank
        above the RL rank. A reference that the space cannot express is left out.
        """
        dims = self.dimensions()
        base: dict[str, Any] = {name: d.middle() for name, d in dims.items()}
        if "sft.lora_rank" in dims and dims["sft.lora_rank"].type == "categorical":
            base["sft.lora_rank"] = max(dims["sft.lora_rank"].choices or (), key=_capacity)
        if "rl.lora_rank" in dims and dims["rl.lora_rank"].type == "categorical":
            base["rl.lora_rank"] = min(dims["rl.lora_rank"].choices or (), key=_capacity)
        refs = []
        for name, sft_share in (("sft_only", 1.0), ("rl_only", 0.0), ("heuristic", 0.25)):
            point = dict(base)
            if not self._set_share(point, dims, sft_share):
                continue
            refs.append((name, point))
        return refs

    def _set_share(self, point: dict[str, Any], dims: dict[str, Dist], sft_share: float) -> bool:
        if self.mode != "share" or "sft.share" not in dims or "rl" not in self.stages:
            return False
        if self.stages["rl"].share != "rest" or "cpt.share" in dims:
            return False
        d = dims["sft.share"]
        if d.type == "categorical":
            if sft_share not in (d.choices or ()):
                return False
        elif not (d.low <= sft_share <= d.high):  # type: ignore[operator]
            return False
        point["sft.share"] = sft_share
        return True


def check_run_name(name: str) -> str:
    """A run name becomes a directory under the runs folder: letters, digits, ``.``, ``_``, ``-``."""
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"a run name may use letters, digits, '.', '_' and '-' only (it names a directory "
            f"inside the runs folder), got {name!r}"
        )
    return name


def _capacity(rank: Any) -> float:
    """Adapter capacity of a rank: 0 means full fine-tuning, the most capacity of all."""
    return math.inf if rank == 0 else float(rank)


def _high(share: Any) -> float:
    if isinstance(share, Dist):
        return float(max(share.choices or ()) if share.type == "categorical" else share.high)  # type: ignore[arg-type]
    return float(share)
