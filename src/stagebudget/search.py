"""The search driver: validate, set up the run directory and study, run the trials, summarise.

>>> run_search("search_spaces/demo.yaml", name="demo-1", live=False)  # doctest: +SKIP
PosixPath('runs/demo-1')

Everything is checked before any compute. The Optuna study (named in run.json) is the source of
truth for which trials are finished, which is what makes ``resume=True`` simple and robust: the
study is loaded by name, trials left RUNNING by a killed driver are marked FAIL, and a fresh Tuner
runs only the trials still missing, attached to the same study.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stagebudget import __version__
from stagebudget.errors import UserError
from stagebudget.fileio import atomic_write_yaml
from stagebudget.records import DEVICE_HOURS, RunDir
from stagebudget.space import SearchSpace

log = logging.getLogger(__name__)

TrialFn = Callable[..., Any] | str


@dataclass
class SearchPlan:
    """Everything validated and decided before Ray starts."""

    run: RunDir
    space: SearchSpace
    meta: dict[str, Any]
    storage: Any
    remaining: int
    points: list[dict[str, Any]] = field(default_factory=list)
    prior_hours: float = 0.0


def run_search(space_path: str | Path, *, name: str | None = None, runs_dir: Path = Path("runs"),
               trials: int | None = None, budget_hours: float | None = None,
               concurrency: int | None = None, address: str | None = None,
               storage: str | None = None, resume: bool = False, live: bool = True,
               trial_fn: TrialFn | None = None) -> Path:
    """Run (or resume) a budgeted multi-objective search; return the run directory.

    ``trial_fn`` defaults to ``stagebudget.pipeline.run_schedule``; tests pass a fake (a callable
    importable on Ray workers, or ``"module:function"``). ``budget_hours`` is the search-wide
    device-hour budget (overrides ``budget.search_hours``): no trial starts past it.
    """
    if budget_hours is not None and budget_hours <= 0:
        raise UserError(f"--budget-hours must be > 0, got {budget_hours}")
    plan = (_plan_resume if resume else _plan_new)(
        Path(space_path), name=name, runs_dir=Path(runs_dir), trials=trials,
        budget_hours=budget_hours, concurrency=concurrency, address=address, storage=storage)
    if plan.remaining <= 0:
        log.info("all %d trials of %s are finished; nothing to run", plan.meta["trials_requested"],
                 plan.run.root)
        _summarise(plan, live)
        return plan.run.root
    if trial_fn is None:
        _prepare_base_model(plan.space, plan.meta["space_file"])
    stopped = _execute(plan, address=address, live=live, trial_fn=trial_fn)
    plan.meta.update(stopped_by_budget=stopped, finished=time.time())
    plan.run.write_meta(_without_tool(plan.meta))
    _summarise(plan, live)
    return plan.run.root


def check_local_resources(space: SearchSpace) -> None:
    """``concurrency`` trials at once must fit this machine's CPUs (and GPUs)."""
    res, n = space.resources_per_trial, space.concurrency
    cpus = os.cpu_count() or 1
    if n * res.cpu > cpus:
        raise UserError(
            f"concurrency x resources_per_trial.cpu = {n} x {res.cpu:g} = {n * res.cpu:g} CPUs, "
            f"but this machine has {cpus}; lower `concurrency` (--concurrency) or "
            "`resources_per_trial.cpu`, or give --address of a Ray cluster")
    if res.gpu > 0:
        gpus = _local_gpus()
        if n * res.gpu > gpus:
            raise UserError(
                f"concurrency x resources_per_trial.gpu = {n} x {res.gpu:g} = {n * res.gpu:g} "
                f"GPUs, but this machine has {gpus}; lower `concurrency` or "
                "`resources_per_trial.gpu` (fractions such as 0.5 share a GPU)")


def _local_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        import torch

        return int(torch.cuda.device_count())
    except ImportError:
        return 0


def _load_space(path: Path, trials: int | None, concurrency: int | None,
                budget_hours: float | None, address: str | None) -> SearchSpace:
    """Load and validate the space with CLI overrides; check local resources."""
    space = SearchSpace.load(path, trials=trials, concurrency=concurrency)
    for warning in space.check_inputs():
        print(f"warning: {warning}", flush=True)
    if address is None:
        check_local_resources(space)
    if budget_hours is not None:
        budget = space.budget.model_copy(update={"search_hours": budget_hours})
        source = space._source
        space = space.model_copy(update={"budget": budget})
        space._source = source
    return space


def default_storage_url(run: RunDir) -> str:
    """SQLite in the run directory (one writer: the driver)."""
    return f"sqlite:///{run.study_db.resolve()}"


def _plan_new(space_path: Path, *, name: str | None, runs_dir: Path, trials: int | None,
              budget_hours: float | None, concurrency: int | None, address: str | None,
              storage: str | None) -> SearchPlan:
    from stagebudget.tune_adapter import open_storage

    space = _load_space(space_path, trials, concurrency, budget_hours, address)
    name = name or space.name
    run = RunDir(runs_dir / name)
    if run.root.exists():
        raise UserError(f"run directory {run.root} already exists; continue it with --resume, "
                        "or start a new run with --name NEW_NAME")
    url = storage or default_storage_url(run)
    if "://" not in url:  # a journal file: absolute, so resume works from any directory
        prefix = "journal:" if url.startswith("journal:") else ""
        url = prefix + str(Path(url.removeprefix("journal:")).resolve())
    run.root.mkdir(parents=True)
    try:
        store = open_storage(url)
    except UserError:
        run.root.rmdir()
        raise
    meta = {
        "version": __version__, "name": name, "study_name": f"{name}-{uuid.uuid4().hex[:8]}",
        "storage": url, "space_file": str(Path(space_path).resolve()), "created": time.time(),
        "objectives": [{"name": o.name, "direction": o.direction} for o in space.objectives],
        "trials_requested": space.trials, "search_budget_hours": space.budget.search_hours,
        "address": address, "stopped_by_budget": False,
    }
    run.write_meta(meta)
    atomic_write_yaml(run.space, space.model_dump(mode="json", exclude_none=True))
    points = [p for _, p in space.reference_points()] if space.references else []
    return SearchPlan(run, space, meta, store, space.trials, points)


def _plan_resume(space_path: Path, *, name: str | None, runs_dir: Path, trials: int | None,
                 budget_hours: float | None, concurrency: int | None, address: str | None,
                 storage: str | None) -> SearchPlan:
    """Load the run by name; mark what a killed driver left RUNNING as FAIL; count what is left."""
    from stagebudget.tune_adapter import open_storage

    run = RunDir(runs_dir / (name or _space_name(space_path)))
    if not run.root.exists():
        raise UserError(f"cannot resume: run directory {run.root} does not exist; start it "
                        "without --resume (or give the --name of an existing run)")
    meta = _without_tool(run.read_meta())
    if storage and storage != meta["storage"]:
        raise UserError(f"--storage {storage!r} differs from this run's {meta['storage']!r}; "
                        "leave --storage out when resuming")
    space = _load_space(run.space, trials or meta["trials_requested"], concurrency,
                        budget_hours or meta.get("search_budget_hours"), address)
    store = open_storage(meta["storage"])
    study = _load_study(store, meta["study_name"])
    finished = mark_interrupted(study, run, [o.name for o in space.objectives])
    meta.update(trials_requested=space.trials, search_budget_hours=space.budget.search_hours,
                resumed=[*meta.get("resumed", []), time.time()])
    run.write_meta(meta)
    # Enqueued trials not yet asked (WAITING) keep their params in system_attrs["fixed_params"].
    seen = [t.system_attrs.get("fixed_params", t.params) for t in study.get_trials(deepcopy=False)]
    points = [p for _, p in space.reference_points()
              if space.references and not any(_same_params(p, s) for s in seen)]
    prior = sum(r.objectives.get(DEVICE_HOURS, 0.0) for r in run.records())
    return SearchPlan(run, space, meta, store, space.trials - finished, points, prior)


def _space_name(space_path: Path) -> str:
    return SearchSpace.load(space_path).name


def _without_tool(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "tool"}


def _load_study(storage: Any, study_name: str) -> Any:
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise UserError(f"study {study_name!r} not found in its storage; the run directory's "
                        "run.json and study storage do not match") from None


def _same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    from stagebudget.tune_adapter import reference_name

    return reference_name(b, [("x", a)]) is not None


def mark_interrupted(study: Any, run: RunDir, objectives: list[str]) -> int:
    """Settle what a killed driver left RUNNING; return the finished trials (COMPLETE, FAIL,
    PRUNED) in the study afterwards.

    A trial whose record is COMPLETE finished before the driver died but was never told to the
    study: it is told now with the record's objectives (kept, not re-run). Any other RUNNING
    study trial becomes FAIL, and RUNNING records become FAILED with error "interrupted".
    """
    from optuna.trial import TrialState

    from stagebudget.tune_adapter import TUNE_ID_ATTR

    storage = study._storage
    records = {r.key: r for r in run.records()}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        rec = records.get(t.user_attrs.get(TUNE_ID_ATTR, ""))
        if rec and rec.status == "COMPLETE" and all(o in rec.objectives for o in objectives):
            values = [float(rec.objectives[o]) for o in objectives]
            storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, values)
            continue
        storage.set_trial_user_attr(t._trial_id, "error", "interrupted")  # before: FAIL is final
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    for record in records.values():
        if record.status == "RUNNING":
            record.status, record.error, record.finished = "FAILED", "interrupted", time.time()
            run.write_record(record)
    done = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done))


def _prepare_base_model(space: SearchSpace, space_file: str) -> None:
    """Build/resolve the base model once, before trials run concurrently."""
    try:
        from stagebudget.basemodel import resolve_base_model
    except ImportError:
        return
    base_dir = Path(space_file).parent
    if space.base_model.startswith("builtin:"):
        try:
            resolve_base_model(space.base_model, base_dir=base_dir, allow_build=False)
        except ValueError:
            print(f"building the base model {space.base_model} (first run only, cached after; "
                  "about 5 min on 2 CPU cores)...", flush=True)
    try:
        resolve_base_model(space.base_model, base_dir=base_dir)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _device(space: SearchSpace) -> str:
    if space.device != "auto":
        return space.device
    return "cuda" if space.resources_per_trial.gpu > 0 else "cpu"


def _init_ray(address: str | None, space: SearchSpace) -> None:
    import ray

    if address is None:
        # "local" always starts a private Ray: a bare ray.init() would join any cluster that
        # `ray start` left running on this machine.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, ignore_reinit_error=True,
                 configure_logging=False)


def _execute(plan: SearchPlan, *, address: str | None, live: bool,
             trial_fn: TrialFn | None) -> bool:
    """Run the remaining trials; return whether the search budget stopped the search."""
    import ray
    from ray import tune

    from stagebudget.live import Display, LiveDisplay, ProgressCallback
    from stagebudget.trainable import trial_trainable
    from stagebudget.tune_adapter import build_tuner

    space = plan.space
    device = _device(space)
    cost = space.cost_model(device)
    trainable = tune.with_parameters(
        trial_trainable, space=space, run_dir=str(plan.run.root.resolve()), trial_fn=trial_fn,
        cost=cost, device=device, base_dir=str(Path(plan.meta["space_file"]).parent))
    display = LiveDisplay() if live else Display()
    holder: dict[str, Any] = {}
    callback = ProgressCallback(display, lambda running: _stats(plan, holder, running))
    _init_ray(address, space)
    try:
        tuner, limiter, search = build_tuner(
            trainable, space, run_dir=plan.run.root, study_name=plan.meta["study_name"],
            storage=plan.storage, num_samples=plan.remaining, concurrency=space.concurrency,
            points=plan.points, callbacks=[callback], limiter_kwargs={
                "budget_hours": space.budget.search_hours,
                "per_trial_hours": space.budget.per_trial_hours,
                "planned_hours": _planner(space, cost), "prior_hours": plan.prior_hours})
        holder.update(limiter=limiter, study=search.study)
        with display:
            tuner.fit()
            display.update(_stats(plan, holder, 0), force=True)
    finally:
        ray.shutdown()  # for an external cluster this only disconnects the driver
    return bool(limiter.stopped_by_budget)


def _planner(space: SearchSpace, cost: Any) -> Callable[[dict[str, Any]], float]:
    def planned_hours(config: dict[str, Any]) -> float:
        return float(cost.schedule_seconds(space.schedule_from_params(config, cost))) / 3600.0
    return planned_hours


def _stats(plan: SearchPlan, holder: dict[str, Any], running: int) -> Any:
    from stagebudget.live import collect_stats

    limiter = holder["limiter"]
    return collect_stats(holder["study"], [o.name for o in plan.space.objectives],
                         requested=plan.space.trials, running=running,
                         spent_hours=limiter.committed_hours,
                         budget_hours=plan.space.budget.search_hours)


def _summarise(plan: SearchPlan, live: bool) -> None:
    """Print the front read back from the study (the source of truth)."""
    from rich.console import Console

    from stagebudget.live import front_table

    study = _load_study(plan.storage, plan.meta["study_name"])
    Console(highlight=False).print(front_table(study, [o.name for o in plan.space.objectives]))

