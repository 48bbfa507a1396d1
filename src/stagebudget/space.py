"""Search spaces: YAML files in ``search_spaces/``, validated before any compute.

The YAML uses a short distribution schema (``type``, ``low``, ``high``, ``log``, ``step``,
``choices``); :func:`to_optuna` is the one place it becomes Optuna distributions, and
:meth:`SearchSpace.schedule_from_params` is the one pure function from sampled params to a
:class:`~stagebudget.schedule.Schedule`.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from stagebudget.cost import OVERRUN_GUARD, Budget, CostModel, ModelShape, default_cost_model, plan_schedule
from stagebudget.errors import BudgetError, ConfigError, UserError, from_pydantic
from stagebudget.fileio import read_json, read_yaml, safetensors_problem
from stagebudget.kinds import get_kind, kind_only_fields, stage_kinds
from stagebudget.names import DEVICE_HOURS, ID_ACCURACY, OOD_ACCURACY
from stagebudget.schedule import BUILTIN_SIZES, Schedule, StageSpec, Strict, TasksRef
from stagebudget.tasks.scoring import is_scorer_file

OBJECTIVES: dict[str, str] = {
    ID_ACCURACY: "maximize",
    OOD_ACCURACY: "maximize",
    DEVICE_HOURS: "minimize",
}
RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
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
            kinds = {"number" if isinstance(c, int | float) and not isinstance(c, bool)
                     else type(c).__name__ for c in self.choices}
            if len(kinds) > 1:
                raise ValueError(f"`choices` must all be of one type, got {sorted(kinds)} in "
                                 f"{list(self.choices)}")
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
        if self.step is not None:
            n = (self.high - self.low) / self.step
            if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
                raise ValueError(
                    f"`step` {self.step:g} does not divide the range {self.low:g}..{self.high:g} "
                    f"(Optuna would silently cut it to {self.low + math.floor(n) * self.step:g}); "
                    "change `high` or `step`")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"type int needs integer low/high, got {self.low}..{self.high}")
        return self

    def corners(self) -> list[Any]:
        """Extreme values (all choices for categorical): used to cost the space's edges."""
        if self.type == "categorical":
            return list(self.choices or ())
        lo, hi = self.low, self.high
        return [int(lo), int(hi)] if self.type == "int" else [lo, hi]  # type: ignore[arg-type]

    def probe_values(self, small_grid: int = 16) -> list[Any]:
        """Values that decide whether a dimension fits a budget: every choice, every value of a
        grid of at most ``small_grid`` values, else the two ends and their grid neighbours
        (a share one step above 0 is where a stage can no longer fit one step)."""
        if self.type == "categorical":
            return list(self.choices or ())
        if self.type == "int" or self.step is not None:
            lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
            step = self.step if self.step is not None else 1
            n = math.floor((hi - lo) / step + 1e-9) + 1
            if n <= small_grid:
                return self.grid()
            ends = [lo, lo + step, lo + (n - 2) * step, lo + (n - 1) * step]
            return list(dict.fromkeys(int(v) if self.type == "int" else round(v, 12)
                                      for v in ends))
        return self.corners()

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


class _StageDimsBase(Strict):
    """A stage's budget amount; :data:`StageDims` adds every tunable :class:`StageSpec` field."""

    share: Dist | float | Literal["rest"] | None = None
    steps: Dist | int | None = None

    @field_validator("*")
    @classmethod
    def _within_stage_spec(cls, v: Any, info: Any) -> Any:
        if info.field_name in TUNABLE_FIELDS and v is not None:
            check_stage_value(info.field_name, v)
        return v

    @model_validator(mode="after")
    def _amount(self) -> _StageDimsBase:
        if (self.share is None) == (self.steps is None):
            raise ValueError("give exactly one of `share` (fraction of the budget) or `steps`")
        if isinstance(self.share, float | int) and not 0 <= self.share <= 1:
            raise ValueError(f"`share` must be within [0, 1], got {self.share}")
        if isinstance(self.share, Dist) and ((self.share.type == "categorical" and any(
                not isinstance(c, int | float) or not 0 <= c <= 1 for c in self.share.choices or ()))
                or (self.share.type != "categorical" and not 0 <= self.share.low <= self.share.high <= 1)):  # type: ignore[operator]
            raise ValueError("`share` values must lie within [0, 1]")
        steps = _values(self.steps) if self.steps is not None else []
        bad = [v for v in steps if isinstance(v, bool) or not isinstance(v, int | float)
               or v < 0 or v != int(v)]
        if bad or (isinstance(self.steps, Dist) and self.steps.type == "float"):
            raise ValueError(f"`steps` must be whole numbers >= 0 (0 leaves the stage out), got "
                             f"{bad[0] if bad else getattr(self.steps, 'type', '')!r}")
        return self


_Scalar = StrictBool | StrictInt | StrictFloat | StrictStr
# Every tunable stage field, fixed (a value) or searched (a Dist). A field left out is None here
# and StageSpec's default applies: fields, defaults and bounds are StageSpec's, written once.
if TYPE_CHECKING:  # the fields below, as far as a type checker needs them
    StageDims = _StageDimsBase
else:
    StageDims = create_model(  # type: ignore[call-overload]
        "StageDims", __base__=_StageDimsBase, __module__=__name__,
        __doc__="One stage in a space: a budget share (or steps) plus fixed or searched stage fields.",
        **{name: (Dist | _Scalar | None, None) for name in TUNABLE_FIELDS},
    )


def _values(value: Any) -> list[Any]:
    """The values a fixed or searched setting can take at its edges (all choices, or low/high)."""
    if not isinstance(value, Dist):
        return [value]
    if value.type == "categorical":
        return list(value.choices or ())
    if value.type == "int":
        return [int(value.low), int(value.high)]  # type: ignore[arg-type]
    return [value.low, value.high]


@functools.cache
def _field_adapter(name: str) -> TypeAdapter[Any]:
    info = StageSpec.model_fields[name]
    return TypeAdapter(Annotated[info.annotation, info])  # type: ignore[arg-type]


def _types(name: str) -> set[type]:
    """The plain types StageSpec's field ``name`` takes (``{int}``), None and Annotated removed."""
    ann = StageSpec.model_fields[name].annotation
    out = set()
    for t in get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,):
        t = get_args(t)[0] if get_origin(t) is Annotated else t
        if t is not type(None):
            out.add(t)
    return out


def allowed_values(name: str) -> str:
    """What StageSpec allows for field ``name``, in words: ``an integer >= 1``."""
    info = StageSpec.model_fields[name]
    types = _types(name)
    what = ("an integer" if types == {int} else "a number" if types == {float}
            else "a string" if types == {str} else " or ".join(t.__name__ for t in types))
    bounds = []
    for meta in info.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="),
                         ("min_length", "of length >=")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{op} {getattr(meta, attr)}")
    text = f"{what} {' and '.join(bounds)}".strip()
    return f"{text} ({info.description})" if info.description else text


def check_stage_value(name: str, value: Any) -> None:
    """Raise ValueError unless every edge of ``value`` (fixed or a Dist) is a valid StageSpec
    ``name``. Bounds are intervals, so a range's two ends decide it."""
    types = _types(name)
    if isinstance(value, Dist) and int in types and float not in types and value.type == "float":
        raise ValueError(f"`{name}` takes {allowed_values(name)}; use type int or categorical, "
                         "not float")
    if isinstance(value, Dist) and str in types and value.type != "categorical":
        raise ValueError(f"`{name}` takes {allowed_values(name)}; search it with type categorical")
    for v in _values(value):
        try:
            _field_adapter(name).validate_python(v)
        except ValidationError:
            raise ValueError(f"`{name}` = {v!r} is not allowed; it must be "
                             f"{allowed_values(name)}") from None


MAX_TRIAL_HOURS = 10_000.0  # more is a unit mistake (seconds for hours), not a plan
MAX_TRIALS = 100_000


class BudgetSpec(Strict):
    per_trial_hours: float = Field(gt=0, allow_inf_nan=False)
    search_hours: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # A trial that trains past this many times its budget is stopped and FAILED as a runaway
    # (on a CPU counted in CPU time, so load never trips it): ledger.OVERRUN_GUARD by default.
    overrun_guard: float = Field(default=OVERRUN_GUARD, ge=1, le=1000, allow_inf_nan=False)

    @field_validator("per_trial_hours")
    @classmethod
    def _sane(cls, v: float) -> float:
        if v > MAX_TRIAL_HOURS:
            raise ValueError(f"a per-trial budget of {v:g} device-hours is refused (at most "
                             f"{MAX_TRIAL_HOURS:g}): it would plan billions of steps; the unit is "
                             "hours, e.g. 0.05 for 3 minutes")
        return v


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
    # GP found the most of the true front, soonest, on the replayed published grid
    # (bench/RESULTS.md, "Search quality")
    name: str = "gp"
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


class EarlyStoppingSpec(Strict):
    """Early stopping at stage boundaries (:mod:`stagebudget.earlystop`); off by default.

    ``margin_se``: how many standard errors of the difference a completed trial must be better
    by, on every accuracy objective at the same budget point, to stop a trial there.
    """

    enabled: bool = Field(default=False, strict=True)
    margin_se: float = Field(default=2.0, ge=0, le=100, allow_inf_nan=False)


class ReuseSpec(Strict):
    """Stage-prefix reuse (:mod:`stagebudget.prefixcache`): trials start from the longest
    prefix of their schedule any trial has trained. ``cache_dir`` (relative: to the space
    file) must be readable by every node of a cluster; ``max_gb`` caps its size (least
    recently used entries are evicted first)."""

    enabled: bool = Field(default=True, strict=True)
    cache_dir: str | None = None
    max_gb: float = Field(default=20.0, gt=0, allow_inf_nan=False)

    def cache(self) -> Any:
        """The :class:`~stagebudget.prefixcache.PrefixCache` to train with (None when off).
        A relative ``cache_dir`` was made absolute when the space file was loaded."""
        from stagebudget.prefixcache import PrefixCache

        if not self.enabled:
            return None
        root = Path(self.cache_dir).expanduser() if self.cache_dir is not None else None
        return PrefixCache(root, max_gb=self.max_gb)


DEFAULT_OBJECTIVES = (ObjectiveSpec(name=ID_ACCURACY), ObjectiveSpec(name=OOD_ACCURACY))


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
    trust_remote_code: bool = Field(default=False, strict=True)
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    reuse: ReuseSpec = ReuseSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_run_name(v)

    @field_validator("trials")
    @classmethod
    def _trials(cls, v: int) -> int:
        if v > MAX_TRIALS:
            raise ValueError(f"{v} trials are refused (at most {MAX_TRIALS}): each trial is a "
                             "training run; a search of that size is a typo")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE.fullmatch(v):
            raise ValueError(f"unknown device {v!r}; allowed: auto, cpu, cuda, cuda:N, mps")
        return v

    @model_validator(mode="after")
    def _something_searched(self) -> SearchSpace:
        if not self.dimensions():
            raise ValueError(
                "nothing is searched: give at least one stage setting as a distribution, e.g. "
                "`share: {type: float, low: 0, high: 1, step: 0.25}` (to train one fixed "
                "schedule, use `stagebudget train SCHEDULE.yaml`)")
        return self

    @model_validator(mode="after")
    def _device_has_gpu(self) -> SearchSpace:
        if self.device.startswith("cuda") and self.resources_per_trial.gpu <= 0:
            raise ValueError(f"device {self.device!r} needs `resources_per_trial.gpu` > 0 (Ray "
                             "hides GPUs from trials that ask for none), got 0")
        return self

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_names(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if not v:
                raise ValueError(f"at least one stage is needed; allowed: {', '.join(stage_kinds())}")
            for kind in v:
                if kind not in stage_kinds():
                    raise ValueError(f"unknown stage {kind!r}; allowed: {', '.join(stage_kinds())}")
        return v

    @field_validator("stages")
    @classmethod
    def _stage_kinds(cls, v: dict[str, Any]) -> dict[str, Any]:
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
            own = get_kind(kind).defaults
            extra = [f for f in kind_only_fields() if f not in own and getattr(dims, f) is not None]
            if extra:
                owners = [k for k in stage_kinds() if extra[0] in get_kind(k).defaults]
                raise ValueError(f"`{kind}.{extra[0]}` applies only to the "
                                 f"{' / '.join(owners)} stage")
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

    @model_validator(mode="after")
    def _early_stopping_compares_accuracy(self) -> SearchSpace:
        names = [o.name for o in self.objectives]
        if self.early_stopping.enabled and not {ID_ACCURACY, OOD_ACCURACY} & set(names):
            raise ValueError(
                f"`early_stopping.enabled: true` compares {ID_ACCURACY} / {OOD_ACCURACY} at "
                f"stage boundaries, but the objectives are {names}; add one of them or set "
                "`early_stopping.enabled: false`")
        return self

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
        """Check the task file and the base model before any compute is spent (see
        :func:`check_inputs`); returns warnings to show the user."""
        return check_inputs(self.base_model, self.tasks, self._source,
                            trust_remote_code=self.trust_remote_code,
                            generation=generated_tokens(self.stages.items()))

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
        cache_dir = self.reuse.cache_dir
        if cache_dir is not None and not Path(cache_dir).expanduser().is_absolute():
            # an output folder, not an input: it may lie outside the space file's folder
            update["reuse"] = self.reuse.model_copy(
                update={"cache_dir": str((folder / cache_dir).resolve())})
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
            return CostModel.load(path, self._shape())
        self._shape()  # a damaged config.json is named here, with the space file
        return default_cost_model(self.base_model, device)

    def _shape(self) -> ModelShape:
        try:
            return ModelShape.for_ref(self.base_model)
        except UserError as exc:
            raise ConfigError(str(exc), source=self._source, field="base_model") from None

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
        if self.mode == "share":
            allocation = resolve_rest(allocation)
        return plan_schedule(
            allocation, stage_params, self.per_trial_budget, cost, mode=self.mode,
            base_model=self.base_model, tasks=self.tasks,
            seed=self.seed if seed is None else seed, name=name,
        )

    def feasibility_params(self, limit: int = 4096) -> Iterator[dict[str, Any]]:
        """The points :meth:`check_feasible` plans: every combination of each dimension's
        :meth:`Dist.probe_values` (all choices, every grid value of a small grid, the ends and
        their neighbours otherwise). Past ``limit`` combinations, all-low and all-high first,
        then a seeded sample."""
        dims = self.dimensions()
        names = list(dims)
        values = [dims[n].probe_values() for n in names]
        total = math.prod(len(v) for v in values) if values else 1
        if total <= limit:
            for combo in itertools.product(*values):
                yield dict(zip(names, combo, strict=True))
            return
        yield {n: v[0] for n, v in zip(names, values, strict=True)}
        yield {n: v[-1] for n, v in zip(names, values, strict=True)}
        rng = random.Random(0)
        for _ in range(limit - 2):
            yield {n: rng.choice(v) for n, v in zip(names, values, strict=True)}

    def check_feasible(self, cost: CostModel | None = None) -> tuple[Schedule, Schedule]:
        """Plan the whole space (see :meth:`feasibility_params`); return the cheapest and most
        expensive schedules. Points that cannot fit the budget are one error that names them
        (the first few), how many there are, and what budget would fit them all.
        """
        cost = cost or self.cost_model()
        plans, bad = [], []
        for params in self.feasibility_params():
            try:
                schedule = self.schedule_from_params(params, cost)
            except BudgetError as exc:
                bad.append((params, str(exc)))
                continue
            plans.append((cost.schedule_seconds(schedule), schedule))
        if bad:
            shown = "; ".join(f"at {_point(p)}: {why}" for p, why in bad[:3])
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ConfigError(
                f"{len(bad)} of {len(bad) + len(plans)} planned points of the space cannot fit "
                f"the budget{more}: {shown}. Raise the budget, or narrow the ranges that name "
                "these points", source=self._source, field="budget.per_trial_hours")
        plans.sort(key=lambda p: p[0])
        return plans[0][1], plans[-1][1]

    def checkpoint_steps(self, schedule: Schedule, cost: CostModel) -> list[list[int]]:
        """For each stage of ``schedule``, the step counts this space can plan for the same
        stage after the same earlier stages (every point :meth:`feasibility_params` plans): the
        prefixes other trials are likely to ask for, where a trial should leave a checkpoint.
        """
        from stagebudget.prefixcache import stage_keys

        by_key: dict[str, set[int]] = {}
        for params in self.feasibility_params():
            try:
                planned = self.schedule_from_params(params, cost)
            except (ValueError, UserError):
                continue
            for key, stage in zip(stage_keys({}, planned.stages), planned.stages, strict=True):
                by_key.setdefault(key, set()).add(stage.steps)
        return [sorted(s for s in by_key.get(key, ()) if s < stage.steps)
                for key, stage in zip(stage_keys({}, schedule.stages), schedule.stages,
                                      strict=True)]

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


def make_sampler(space: SearchSpace, trials: int) -> Any:
    """The Optuna sampler named in ``space.sampler``, seeded, with ``options`` as keyword args.

    >>> make_sampler(SearchSpace.load("search_spaces/demo.yaml"), 8)  # doctest: +SKIP
    <optuna.samplers._gp.sampler.GPSampler object ...>
    """
    import warnings

    import optuna

    from stagebudget.samplers import NSGAIISampler  # Optuna's, picklable (Tune pickles it)

    spec = space.sampler
    seed = spec.seed if spec.seed is not None else space.seed
    opts = dict(spec.options)
    samplers: dict[str, Callable[..., Any]] = {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": NSGAIISampler,
        "gp": optuna.samplers.GPSampler,
        "random": optuna.samplers.RandomSampler,
        "grid": optuna.samplers.GridSampler,
    }
    # Optuna's 10 random start-up trials would make a search of <= 10 trials a random search.
    startup = min(10, max(2, trials // 3))
    if spec.name == "tpe":
        # Without these, parallel trials collide.
        opts = {"multivariate": True, "constant_liar": True, "n_startup_trials": startup, **opts}
    elif spec.name == "gp":
        opts = {"n_startup_trials": startup, **opts}
    elif spec.name == "nsga2":
        # A population under 4 re-proposed identical params (FINDINGS); Optuna's default (50)
        # would make any small search a random search.
        opts = {"population_size": max(4, min(50, trials // 2)), **opts}
    args: tuple[Any, ...] = (space.grid_space(),) if spec.name == "grid" else ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return samplers[spec.name](*args, seed=seed, **opts)
        except TypeError as exc:
            raise ConfigError(f"bad option for the {spec.name} sampler: {exc}",
                              source=getattr(space, "_source", None),
                              field="sampler.options") from None


def resolve_rest(shares: dict[str, Any]) -> dict[str, float]:
    """Shares by stage, the one ``"rest"`` (or missing, ``None``) share given what the others
    leave, never below 0. The one place ``share: rest`` is resolved.

    >>> resolve_rest({"sft": 0.25, "rl": "rest"})
    {'sft': 0.25, 'rl': 0.75}
    """
    open_ = [k for k, v in shares.items() if v in ("rest", None)]
    out = {k: float(v) for k, v in shares.items() if k not in open_}
    if len(open_) == 1:
        left = 1.0 - sum(out.values())
        out[open_[0]] = left if left >= 1e-9 else 0.0
    return {k: out[k] for k in shares if k in out}


def check_inputs(base_model: str, tasks: TasksRef, source: str | Path | None,
                 base_dir: Path | None = None, trust_remote_code: bool = False,
                 generation: int = 0) -> list[str]:
    """Check a task file and the base model together before any compute (``search``,
    ``validate`` and ``train`` alike); errors name ``source`` and the field. Returns warnings
    to show the user.

    Task rows, splits, the scorer and the answer extraction are validated by loading the
    suite (the scorer is imported and called once). Chat-message prompts need a local model:
    built-in models have no chat template (and are built later, once). A local model directory
    must hold a readable config, tokenizer and whole safetensors weights, and a tokenizer whose
    chat template and tokenisation fit the prompts (:func:`stagebudget.chat.check_model_tasks`).
    Every prompt, with what is generated after it (``generation``: the most a training stage
    generates, see :func:`generated_tokens`), must fit the model's position window.
    """
    from stagebudget.tasks import load_suite

    try:
        suite = load_suite(**tasks.suite_args(), base_dir=base_dir)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source,
                          field=getattr(exc, "field", None) or "tasks") from None
    warnings = list(suite.warnings)
    if base_model.startswith("builtin:"):
        if suite.conversational:
            raise ConfigError(
                f"the task file {tasks.source} gives prompts as chat messages, but the "
                f"built-in model {base_model} has no chat template; write the prompts "
                "as plain text or use a local model directory whose tokenizer has one",
                source=source, field="tasks")
        _check_builtin_window(base_model, suite, source, generation)
        return warnings + builtin_vocab_warnings(suite, base_model)
    return warnings + _check_model(base_model, suite, source, base_dir, trust_remote_code,
                                   generation)


def _check_model(base_model: str, suite: Any, source: str | Path | None, base_dir: Path | None,
                 trust_remote_code: bool, generation: int = 0) -> list[str]:
    """A local model's files, then its tokenizer against the suite's prompts."""
    from stagebudget.basemodel import load_tokenizer
    from stagebudget.chat import check_model_tasks, check_prompt_window, prompt_ids
    from stagebudget.modelref import position_window, resolve_base_model

    try:
        path = resolve_base_model(base_model, base_dir=base_dir)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source, field="base_model") from None
    check_model_files(path, source)
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        warnings = check_model_tasks(tokenizer, suite, base_model)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source, field="base_model") from None
    try:
        check_prompt_window(
            suite, position_window(base_model, path), lambda p: len(prompt_ids(tokenizer, p)),
            lambda t: len(tokenizer(text=t, add_special_tokens=False)["input_ids"]), base_model,
            generation)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source,
                          field=getattr(exc, "field", None) or "tasks") from None
    return warnings


def generated_tokens(stages: Any) -> int:
    """The most tokens a generating stage (rl) writes after a prompt: its
    ``max_completion_length`` (the kind's default when unset, the top of a searched range).
    ``stages`` yields ``(kind, settings)`` with settings a :class:`StageSpec` or stage dims."""
    most = 0
    for kind, settings in stages:
        info = get_kind(kind)
        if not info.generates:
            continue
        value = getattr(settings, "max_completion_length", None)
        if value is None:
            value = info.defaults.get("max_completion_length", 0)
        most = max(most, int(_high(value)))
    return most


def builtin_vocab_warnings(suite: Any, base_model: str, shown: int = 5) -> list[str]:
    """One warning naming the task file, lines and characters the built-in character
    tokenizer lacks (it covers printable ASCII, ``modelref.CHARS``): it reads each as
    ``<unk>``, so such a prompt loses them and such an answer can never be written."""
    from stagebudget.modelref import CHARS

    known = set(CHARS)
    hits: list[tuple[int | None, str, str]] = []
    for ex in (*suite.train, *suite.id_test, *suite.ood_test):
        for field_name in ("prompt", "answer", "completion"):
            value = getattr(ex, field_name)
            missing = "".join(dict.fromkeys(c for c in value or "" if c not in known))
            if missing:
                hits.append((ex.line, field_name, missing))
    if not hits:
        return []
    hits.sort(key=lambda h: (h[0] is None, h[0] or 0))
    where = "; ".join(f"line {line} {name}: " + ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars)
                      for line, name, chars in hits[:shown])
    more = f" (and {len(hits) - shown} more)" if len(hits) > shown else ""
    return [f"{suite.path or 'the task file'}: {len(hits)} field(s) hold characters the "
            f"tokenizer of {base_model} lacks{more}: {where}. It knows printable ASCII only "
            "(' ' to '~') and reads any other character as <unk>: a prompt loses it, an answer "
            "with it can never be generated. Rewrite those rows, or use a local model directory "
            "whose tokenizer covers them"]


def _check_builtin_window(base_model: str, suite: Any, source: str | Path | None,
                          generation: int = 0) -> None:
    """A built-in model's window against the suite's longest prompts (no model is loaded)."""
    from stagebudget.chat import check_prompt_window
    from stagebudget.modelref import builtin_token_count, position_window

    try:
        check_prompt_window(suite, position_window(base_model), builtin_token_count,
                            lambda t: builtin_token_count(t, bos=False), base_model, generation)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source,
                          field=getattr(exc, "field", None) or "tasks") from None


def check_model_files(path: Path, source: str | Path | None) -> None:
    """A local model directory's config.json, tokenizer.json and safetensors framing, read
    before any compute (a damaged file would otherwise fail inside every trial)."""
    for name in ("config.json", "tokenizer.json"):
        if (path / name).is_file():
            try:
                read_json(path / name)
            except UserError as exc:
                raise ConfigError(str(exc), source=source, field="base_model") from None
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ConfigError(f"model directory {path}: {problem}; copy the model again",
                              source=source, field="base_model")


def _point(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


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
