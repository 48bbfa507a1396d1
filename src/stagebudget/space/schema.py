"""Search spaces: YAML files in ``search_spaces/``, validated before any compute.

The YAML uses a short distribution schema (``type``, ``low``, ``high``, ``log``, ``step``,
``choices``); :func:`to_optuna` is the one place it becomes Optuna distributions, and
:meth:`SearchSpace.schedule_from_params` is the one pure function from sampled params to a
:class:`~stagebudget.schedule.Schedule`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stagebudget.errors import ConfigError, TaskFileError, UserError, from_pydantic
from stagebudget.fileio import read_yaml
from stagebudget.kinds import get_kind, kind_only_fields, stage_kinds
from stagebudget.names import DEVICE_HOURS, ID_ACCURACY, OOD_ACCURACY
from stagebudget.plan.cost import (
    OVERRUN_GUARD,
    Budget,
    CostModel,
    ModelShape,
    default_cost_model,
    plan_schedule,
)
from stagebudget.schedule import BUILTIN_SIZES, Schedule, StageSpec, Strict, TasksRef, vllm_misplaced
from stagebudget.space.dims import FIXED_FIELDS, TUNABLE_FIELDS, Dist, StageDims, share_high, to_optuna
from stagebudget.space.inputs import check_inputs, generated_tokens
from stagebudget.space.points import check_feasible, feasibility_params, reference_points
from stagebudget.tasks.scoring import is_scorer_file

OBJECTIVES: dict[str, str] = {
    ID_ACCURACY: "maximize",
    OOD_ACCURACY: "maximize",
    DEVICE_HOURS: "minimize",
}
RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")


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
    # GP and TPE find the most of the true front on the replayed published grid: GP first on
    # the table of 2026-12-02, TPE first at a quarter of the trials on the rebuilt one, a tie at
    # half (bench/RESULTS.md, "Search quality")
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
    """What one trial holds. With ``workers: N`` (N > 1) the trial trains data-parallel on N
    Ray Train workers, and ``cpu``/``gpu`` are what *each* worker holds."""

    cpu: float = Field(default=1, gt=0)
    gpu: float = Field(default=0, ge=0)
    workers: int = Field(default=1, ge=1, le=1024, strict=True)


def check_workers(workers: int, stages: dict[str, Any]) -> None:
    """Refuse, before any compute, a multi-worker trial that cannot train as planned.

    A stage's ``batch_size`` is the global batch: each of the ``workers`` trains its share of
    every step, so the examples of a step (cpt/sft: ``batch_size``; rl: ``batch_size x
    num_generations`` completions) must divide evenly, for every value the space can give
    (fixed, each choice, every value of an int range).
    """
    if workers == 1:
        return
    field = "resources_per_trial.workers"
    for kind, dims in stages.items():
        generates = get_kind(kind).generates
        sizes = _values_of(kind, dims, "batch_size", workers)
        generations = _values_of(kind, dims, "num_generations", workers) if generates else [1]
        bad = [(b, g) for b in sizes for g in generations if (b * g) % workers]
        if bad:
            b, g = bad[0]
            what = (f"`stages.{kind}.batch_size` x `stages.{kind}.num_generations` (completions "
                    "per step)" if generates else f"`stages.{kind}.batch_size`")
            raise ValueError(
                f"{what} is the global batch, split evenly across `{field}: {workers}`, so every "
                f"value it can take must be a multiple of {workers}; {b * g}"
                f"{f' = {b} x {g}' if generates else ''} is not (batch sizes: "
                f"{sizes[:8]}{' ...' if len(sizes) > 8 else ''}). Give batch sizes that are "
                f"multiples of {workers} (an int range with `low` and `step` multiples of "
                f"{workers}), or change `{field}`")


def _values_of(kind: str, dims: Any, name: str, workers: int) -> list[int]:
    """The values a stage's int setting ``name`` can take (the kind's or StageSpec's default
    when unset)."""
    value = getattr(dims, name, None)
    if value is None:
        value = get_kind(kind).defaults.get(name, StageSpec.model_fields[name].default)
    return _batch_sizes(value, workers)


def _batch_sizes(value: Any, workers: int) -> list[int]:
    """The batch sizes a fixed or searched ``batch_size`` can take; of an int range its first
    ``workers + 1`` values (their remainders modulo ``workers`` repeat after that)."""
    if not isinstance(value, Dist):
        return [int(value)]
    if value.type == "categorical":
        return [int(c) for c in value.choices or ()]
    step = int(value.step) if value.step is not None else 1
    return list(range(int(value.low), int(value.high) + 1, step)[:workers + 1])  # type: ignore[arg-type]


class EarlyStoppingSpec(Strict):
    """Early stopping at stage boundaries (:mod:`stagebudget.searching.earlystop`); off by default.

    ``margin_se``: how many standard errors of the difference a completed trial must be better
    by, on every accuracy objective at the same budget point, to stop a trial there.
    """

    enabled: bool = Field(default=False, strict=True)
    margin_se: float = Field(default=2.0, ge=0, le=100, allow_inf_nan=False)


class ReuseSpec(Strict):
    """Stage-prefix reuse (:mod:`stagebudget.prefixcache`): trials start from the longest
    prefix of their schedule any trial has trained. ``cache_dir`` (relative: to the space
    file) must be readable by every node of a cluster; ``max_gb`` caps its size (least
    recently used entries are evicted first; unset: chosen from the model size, see
    :func:`~stagebudget.prefixcache.default_max_gb`). A trial leaves a Trainer checkpoint (optimizer
    state included) at the steps other trials of the space can plan for the same stage and at
    its stage's end; ``recovery_minutes`` adds one at the first evaluation point after that
    much training since the last, so an interrupted trial goes on from it (0: at every
    evaluation point); the trial removes it when a newer one lands and when the stage ends."""

    enabled: bool = Field(default=True, strict=True)
    cache_dir: str | None = None
    max_gb: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    recovery_minutes: float = Field(default=10.0, ge=0, allow_inf_nan=False)

    def cache(self, largest_entry_bytes: int = 0) -> Any:
        """The :class:`~stagebudget.prefixcache.PrefixCache` to train with (None when off);
        without ``max_gb`` its cap holds several entries of ``largest_entry_bytes``. A relative
        ``cache_dir`` was made absolute when the space file was loaded."""
        from stagebudget.prefixcache import PrefixCache, default_max_gb

        if not self.enabled:
            return None
        root = Path(self.cache_dir).expanduser() if self.cache_dir is not None else None
        cap = self.max_gb if self.max_gb is not None else default_max_gb(largest_entry_bytes)
        return PrefixCache(root, max_gb=cap)


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

    @model_validator(mode="after")
    def _vllm_has_a_gpu(self) -> SearchSpace:
        for kind, dims in self.stages.items():
            if dims.vllm is None:
                continue
            if self.device in ("cpu", "mps"):
                raise ValueError(f"`{kind}.vllm` generates on a CUDA GPU, but device is "
                                 f"{self.device!r}; set device: auto or cuda, or leave vllm out")
            if self.resources_per_trial.gpu <= 0:
                raise ValueError(f"`{kind}.vllm` needs a GPU in every trial: set "
                                 "`resources_per_trial.gpu` > 0 (Ray hides GPUs from trials that "
                                 "ask for none), or leave vllm out")
            processes = self.resources_per_trial.workers
            tp = dims.vllm.tensor_parallel_size
            if processes % tp:
                raise ValueError(
                    f"`{kind}.vllm.tensor_parallel_size` = {tp} must divide the trial's "
                    f"training processes ({processes}): TRL's colocated vLLM spans "
                    "tensor-parallel groups of training processes; use 1")
        return self

    @model_validator(mode="after")
    def _workers_split_the_batch(self) -> SearchSpace:
        check_workers(self.resources_per_trial.workers, self.stages)
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
        top = sum(share_high(d.share) for d in v.values() if d.share not in (None, "rest"))
        if modes == {"share"} and top > 1 + 1e-9:
            raise ValueError(f"the stages' largest shares add up to {top:g} > 1")
        for kind, dims in v.items():
            if dims.vllm is not None and not get_kind(kind).generates:
                raise ValueError(vllm_misplaced(f"{kind}.vllm"))
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
        from stagebudget.tasks import task_file_sizes

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

    @property
    def source_file(self) -> str | None:
        """The space file this space was loaded from, as given (None when built in code);
        error messages name it."""
        return self._source

    def with_search_hours(self, hours: float) -> SearchSpace:
        """This space with ``budget.search_hours`` set to ``hours`` (``--budget-hours``),
        still naming the file it was loaded from."""
        budget = self.budget.model_copy(update={"search_hours": hours})
        space = self.model_copy(update={"budget": budget})
        space._source = self._source
        return space

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
            fields.update({f: getattr(stage, f) for f in FIXED_FIELDS
                           if getattr(stage, f) is not None})
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
        """The points :meth:`check_feasible` plans (see :func:`spacepoints.feasibility_params`)."""
        return feasibility_params(self, limit)

    def check_feasible(self, cost: CostModel | None = None) -> tuple[Schedule, Schedule]:
        """The cheapest and most expensive planned schedules; points that cannot fit the
        budget are one error (see :func:`spacepoints.check_feasible`)."""
        return check_feasible(self, cost)

    def reference_points(self) -> list[tuple[str, dict[str, Any]]]:
        """Reference schedules every front is read against, as params inside this space
        (see :func:`spacepoints.reference_points`)."""
        return reference_points(self)


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


def check_run_name(name: str) -> str:
    """A run name becomes a directory under the runs folder: letters, digits, ``.``, ``_``, ``-``."""
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"a run name may use letters, digits, '.', '_' and '-' only (it names a directory "
            f"inside the runs folder), got {name!r}"
        )
    return name
