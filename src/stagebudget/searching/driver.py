"""The search driver: validate, set up the run directory and study, run the trials, summarise.

>>> run_search("search_spaces/demo.yaml", name="demo-1", live=False)  # doctest: +SKIP
PosixPath('runs/demo-1')

Everything is checked before any compute. The Optuna study (named in run.json) is the source of
truth for which trials are finished, which is what makes ``resume=True`` simple and robust: the
study is loaded by name, trials left RUNNING by a killed driver are marked FAIL ("interrupted") and
enqueued again with the same params (the same schedule, so its cached checkpoints let it go on),
and a fresh Tuner runs only the trials still missing, attached to the same study.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stagebudget.errors import SearchInterrupted, UserError
from stagebudget.fileio import DISK_FULL, atomic_write_yaml, read_json
from stagebudget.rundir import RunDir, charged_hours, spend_summary
from stagebudget.searching.preflight import check_mlflow, check_space
from stagebudget.searching.raysession import (
    DriverLock,
    choose_local_ray_auth,
    ctrl_c_latch,
    init_ray,
    reap_ray_session,
    shutdown_ray,
    tune_env,
)
from stagebudget.searching.resume import (
    finished_trials,
    load_study,
    mark_interrupted,
    retry_interrupted,
    same_params,
    warn_numerics_changed,
)
from stagebudget.space.schema import SearchSpace, check_run_name
from stagebudget.studystore import normalize_url, open_storage, study_storage_url
from stagebudget.version import __version__, numerics

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
    lock: Any = None

    def __post_init__(self) -> None:
        # Only the references that trials will ask for are enqueued: one enqueued and never
        # asked (fewer trials than references) would stay WAITING in the study for good.
        self.points = self.points[:max(0, self.remaining)]


def run_search(space_path: str | Path, *, name: str | None = None, runs_dir: Path = Path("runs"),
               trials: int | None = None, search_hours: float | None = None,
               concurrency: int | None = None, address: str | None = None,
               storage: str | None = None, resume: bool = False, live: bool = True,
               trial_fn: TrialFn | None = None, mlflow: str | None = None,
               budget_hours: float | None = None) -> Path:
    """Run (or resume) a budgeted multi-objective search; return the run directory.

    ``trial_fn`` defaults to ``stagebudget.training.pipeline.run_schedule``; tests pass a fake (a callable
    importable on Ray workers, or ``"module:function"``). ``search_hours`` is the search-wide
    device-hour budget (overrides ``budget.search_hours``): no trial starts past it
    (``budget_hours``, its earlier name, is kept as an alias). The per-trial budget is the
    space's ``budget.per_trial_hours``.
    ``mlflow`` is an MLflow tracking URI: trials are also logged there (kept for a resume).
    When Ray is already initialised in this process, the search runs on it and leaves it
    running (a benchmark of many searches starts Ray once); otherwise it starts a private local
    Ray (or joins ``address``) and shuts it down at the end.
    """
    if budget_hours is not None:
        if search_hours is not None:
            raise UserError("give the search budget once: search_hours (budget_hours is its old "
                            "name)")
        search_hours = budget_hours
    _check_flags(name, Path(runs_dir))
    if address is None:
        choose_local_ray_auth()
    if mlflow is not None:
        check_mlflow(mlflow)
    plan = (_plan_resume if resume else _plan_new)(
        Path(space_path), name=name, runs_dir=Path(runs_dir), trials=trials,
        search_hours=search_hours, concurrency=concurrency, address=address, storage=storage)
    try:
        if mlflow is not None:
            plan.meta["mlflow"] = mlflow
            plan.run.write_meta(_without_tool(plan.meta))  # a resume keeps logging there
        return _drive(plan, resume=resume, address=address, live=live, trial_fn=trial_fn)
    finally:
        plan.lock.release()


def _drive(plan: SearchPlan, *, resume: bool, address: str | None, live: bool,
           trial_fn: TrialFn | None) -> Path:
    """Run the planned trials; settle an interrupted run so that it can be resumed."""
    if plan.remaining <= 0:
        log.info("all %d trials of %s are finished; nothing to run", plan.meta["trials_requested"],
                 plan.run.root)
        _summarise(plan, live)
        return plan.run.root
    interrupted = False
    try:
        if trial_fn is None:
            _prepare_base_model(plan.space, plan.meta["space_file"])
        stopped = _execute(plan, address=address, live=live, trial_fn=trial_fn)
    except BaseException as exc:
        if not resume and not plan.run.trials.exists():
            # Nothing ran (the base model or Ray failed to start): leave no directory behind
            # that would block the name.
            shutil.rmtree(plan.run.root, ignore_errors=True)
        elif isinstance(exc, KeyboardInterrupt):
            interrupted = True
        elif _is_disk_full(exc):
            raise _disk_full(plan, exc) from None
        if not interrupted:
            raise
    if interrupted:
        # Settled once the handler has let go of the traceback: its frames hold the study
        # write that Ctrl-C cut, and with it a database connection whose open transaction
        # locks an SQLite study against the settling writes (CI: five refusals in a row).
        raise _settle_interrupted(plan) from None
    plan.meta.update(stopped_by_budget=stopped, finished=time.time(),
                     spend=spend_summary(plan.run.records()))
    plan.run.write_meta(_without_tool(plan.meta))
    _summarise(plan, live)
    return plan.run.root


def _settle_study(plan: SearchPlan, attempts: int = 5) -> int | None:
    """Mark what Ctrl-C left RUNNING (:func:`mark_interrupted`); the finished trials' count.

    Ctrl-C can land inside a study write of this very process, whose half-done transaction may
    hold the database a moment longer: retry, and if the study still refuses, leave it to
    ``--resume`` (which settles it first) instead of failing the exit.
    """
    import gc

    from optuna.exceptions import StorageInternalError

    for attempt in range(attempts):
        try:
            study = load_study(plan.storage, plan.meta["study_name"])
            return mark_interrupted(study, plan.run, [o.name for o in plan.space.objectives])
        except StorageInternalError as exc:
            log.warning("settling the study after Ctrl-C failed (%s: %s); retrying", exc,
                        exc.__cause__)
            # An RDB storage keeps the session Ctrl-C broke (its transaction half done): every
            # retry failed on it, five times in a row, in one test run. Closing it rolls the
            # transaction back and releases its database lock; the next call opens a new one.
            sessions = getattr(plan.storage, "scoped_session", None)
            if sessions is not None:
                sessions.remove()
            gc.collect()  # drops the interrupted session's connection
            time.sleep(0.5 * (attempt + 1))
    return None


def _settle_interrupted(plan: SearchPlan) -> SearchInterrupted:
    """After Ctrl-C (Ray already shut down): no trial is left RUNNING in the study or the
    records, run.json says when it was interrupted, and the message says how to resume."""
    finished = _settle_study(plan)
    plan.meta.update(interrupted=[*plan.meta.get("interrupted", []), time.time()])
    plan.run.write_meta(_without_tool(plan.meta))
    runs_dir, name = plan.run.root.parent, plan.run.root.name
    return SearchInterrupted(
        f"search interrupted: {'some' if finished is None else finished} of "
        f"{plan.meta['trials_requested']} trials are finished "
        f"and kept in {plan.run.root}; trials that were running are marked FAILED "
        f"(\"interrupted\") and run again on resume. Continue with: stagebudget search "
        f"{plan.meta['space_file']} --name {name} --runs-dir {runs_dir} --resume")


DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def _is_disk_full(exc: BaseException | None) -> bool:
    """A full disk anywhere in the chain (Ray wraps a callback's error into a TuneError whose
    text is the traceback)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        if any(t in str(exc) for t in DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full(plan: SearchPlan, exc: BaseException) -> UserError:
    """One paragraph for a disk that filled up mid-run; the run is kept for ``--resume``."""
    with contextlib.suppress(Exception):  # settling writes too; it may not fit yet
        _settle_interrupted(plan)
    return UserError(
        f"the disk holding {plan.run.root} is full (No space left on device), so the search "
        f"stopped; finished trials are kept. Free some space, then continue with: stagebudget "
        f"search {plan.meta['space_file']} --name {plan.run.root.name} --runs-dir "
        f"{plan.run.root.parent} --resume")


def command_line() -> str:
    """The command that started this process, as a shell would take it back."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return shlex.join([prog, *sys.argv[1:]])


def _check_flags(name: str | None, runs_dir: Path) -> None:
    """``--name`` must name a directory inside ``--runs-dir``, which must be a directory."""
    if name is not None:
        try:
            check_run_name(name)
        except ValueError as exc:
            raise UserError(f"--name: {exc}") from None
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UserError(f"--runs-dir {runs_dir} is a file, not a directory; give the folder where "
                        "run directories go (it is created if missing)")


def default_storage_url(run: RunDir) -> str:
    """SQLite in the run directory (one writer: the driver)."""
    return f"sqlite:///{run.study_db.resolve()}"


def _plan_new(space_path: Path, *, name: str | None, runs_dir: Path, trials: int | None,
              search_hours: float | None, concurrency: int | None, address: str | None,
              storage: str | None) -> SearchPlan:
    space = check_space(space_path, trials=trials, concurrency=concurrency,
                        search_hours=search_hours, address=address)
    name = name or space.name
    run = RunDir(runs_dir / name)
    if run.root.exists():
        raise UserError(f"run directory {run.root} already exists; continue it with --resume, "
                        "or start a new run with --name NEW_NAME")
    url = normalize_url(storage or default_storage_url(run))
    run.root.mkdir(parents=True)
    lock = DriverLock(run)
    try:
        store = open_storage(url)
        meta = {
            "version": __version__, "name": name, "study_name": f"{name}-{uuid.uuid4().hex[:8]}",
            "storage": url, "space_file": str(Path(space_path).resolve()),
            "created": time.time(),
            "objectives": [{"name": o.name, "direction": o.direction} for o in space.objectives],
            "trials_requested": space.trials, "search_budget_hours": space.budget.search_hours,
            "per_trial_hours": space.budget.per_trial_hours, "address": address,
            "stopped_by_budget": False, "command": command_line(), "numerics": numerics(),
        }
        run.write_meta(meta)
        atomic_write_yaml(run.space, space.model_dump(mode="json", exclude_none=True))
    except BaseException:  # e.g. a full disk: leave nothing behind that blocks the name
        lock.release()
        shutil.rmtree(run.root, ignore_errors=True)
        raise
    points = [p for _, p in space.reference_points()] if space.references else []
    return SearchPlan(run, space, meta, store, space.trials, points, lock=lock)


def _plan_resume(space_path: Path, *, name: str | None, runs_dir: Path, trials: int | None,
                 search_hours: float | None, concurrency: int | None, address: str | None,
                 storage: str | None) -> SearchPlan:
    """Load the run by name; mark what a killed driver left RUNNING as FAIL; count what is left."""

    run = RunDir(runs_dir / (name or _space_name(space_path)))
    if not run.root.exists():
        raise UserError(f"cannot resume: run directory {run.root} does not exist; start it "
                        "without --resume (or give the --name of an existing run)")
    run.read_meta()  # a clear error for a directory that is not a run, before the lock
    lock = DriverLock(run)  # before anything is settled: a live driver's trials are its own
    reap_ray_session(run.read_meta())  # the lock proves the driver that started it is gone
    try:
        return _resume_plan(run, _without_tool(run.read_meta()), lock, trials=trials,
                            search_hours=search_hours, concurrency=concurrency,
                            address=address, storage=storage)
    except BaseException:
        lock.release()
        raise


def _resume_plan(run: RunDir, meta: dict[str, Any], lock: DriverLock, *, trials: int | None,
                 search_hours: float | None, concurrency: int | None, address: str | None,
                 storage: str | None) -> SearchPlan:
    if storage and storage != meta["storage"]:
        raise UserError(f"--storage {storage!r} differs from this run's {meta['storage']!r}; "
                        "leave --storage out when resuming")
    space = check_space(run.space, trials=trials or meta["trials_requested"],
                        concurrency=concurrency,
                        search_hours=search_hours or meta.get("search_budget_hours"),
                        address=address)
    store = open_storage(study_storage_url(meta.get("storage"), run))  # a copied run: its own
    study = load_study(store, meta["study_name"])
    mark_interrupted(study, run, [o.name for o in space.objectives])
    retry_interrupted(study)  # same params, same schedule: its checkpoints let it go on
    finished = finished_trials(study)
    warn_numerics_changed(meta)
    meta.update(trials_requested=space.trials, search_budget_hours=space.budget.search_hours,
                resumed=[*meta.get("resumed", []), time.time()])
    run.write_meta(meta)
    # Enqueued trials not yet asked (WAITING) keep their params in system_attrs["fixed_params"].
    seen = [t.system_attrs.get("fixed_params", t.params) for t in study.get_trials(deepcopy=False)]
    points = [p for _, p in space.reference_points()
              if space.references and not any(same_params(p, s) for s in seen)]
    prior = sum(charged_hours(r) for r in run.records())
    return SearchPlan(run, space, meta, store, space.trials - finished, points, prior, lock=lock)


def _space_name(space_path: Path) -> str:
    return SearchSpace.load(space_path).name


def _without_tool(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "tool"}


def _prepare_base_model(space: SearchSpace, space_file: str) -> None:
    """Check the base model once, before trials run concurrently."""
    try:
        from stagebudget.modelref import resolve_base_model
    except ImportError:
        return
    try:
        resolve_base_model(space.base_model, base_dir=Path(space_file).parent)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _execute(plan: SearchPlan, *, address: str | None, live: bool,
             trial_fn: TrialFn | None) -> bool:
    """Run the remaining trials; return whether the search budget stopped the search."""
    import ray
    from ray import tune

    from stagebudget.searching.live import Display, LiveDisplay, ProgressCallback
    from stagebudget.searching.study_attrs import annotate_study
    from stagebudget.searching.tbcurves import TENSORBOARD_DIR
    from stagebudget.searching.trainable import trial_trainable
    from stagebudget.searching.tune_adapter import CtrlCCheck, build_tuner

    space = plan.space
    from stagebudget.training.stages.common import resolve_device

    device = resolve_device(space.device, gpus=space.resources_per_trial.gpu)
    cost = frozen_cost_model(plan.run.root, space, device)
    trainable = tune.with_parameters(
        trial_trainable, space=space, run_dir=str(plan.run.root.resolve()), trial_fn=trial_fn,
        cost=cost, device=device, base_dir=str(Path(plan.meta["space_file"]).parent))
    display = LiveDisplay() if live else Display()
    holder: dict[str, Any] = {}
    callback = ProgressCallback(display, lambda running: _stats(plan, holder, running))
    # A caller that started Ray itself (a benchmark running many searches, a notebook on a
    # cluster) keeps it: the search neither starts nor shuts it down.
    owns_ray = not ray.is_initialized()
    session = init_ray(address, space) if owns_ray else None
    if session:  # so that a resume after a killed driver can end this Ray's leftover processes
        plan.meta.update(ray_session_dir=session, ray_host=os.uname().nodename)
        plan.run.write_meta(_without_tool(plan.meta))
    try:
        with ctrl_c_latch() as ctrl_c:
            tuner, limiter, search = build_tuner(
                trainable, space, run_dir=plan.run.root, study_name=plan.meta["study_name"],
                storage=plan.storage, num_samples=plan.remaining, concurrency=space.concurrency,
                points=plan.points, callbacks=[callback, CtrlCCheck(ctrl_c)],
                mlflow_uri=plan.meta.get("mlflow"), cost=cost,
                limiter_kwargs={
                    "search_hours": space.budget.search_hours,
                    "per_trial_hours": space.budget.per_trial_hours,
                    "planned_hours": _planner(space, cost), "prior_hours": plan.prior_hours})
            holder.update(limiter=limiter, study=search.study)
            annotate_study(search.study, space, plan.run.root, plan.meta)
            print(f"curves: tensorboard --logdir {plan.run.root / TENSORBOARD_DIR}", flush=True)
            with display, tune_env():
                tuner.fit()
                display.update(_stats(plan, holder, 0), force=True)
    finally:
        if owns_ray:
            shutdown_ray()  # for an external cluster this only disconnects the driver
    return bool(limiter.stopped_by_budget)


COST_FILE = "cost.json"


def frozen_cost_model(run_root: Path, space: SearchSpace, device: str) -> Any:
    """The cost model this run plans with, frozen into ``RUN/cost.json`` when the run starts
    and read back on every resume: params -> schedule stays the same within a run even when a
    calibrated table is remade meanwhile."""
    from stagebudget.plan.cost import CostModel

    path = run_root / COST_FILE
    if path.is_file():
        frozen = CostModel.load(path, space.cost_model(device).shape)
        frozen.source = str(read_json(path).get("source", frozen.source))
        return frozen
    cost = space.cost_model(device)
    cost.save(path, source=cost.source)
    return cost


def _planner(space: SearchSpace, cost: Any) -> Callable[[dict[str, Any]], float]:
    def planned_hours(config: dict[str, Any]) -> float:
        return float(cost.schedule_hours(space.schedule_from_params(config, cost)))
    return planned_hours


def _stats(plan: SearchPlan, holder: dict[str, Any], running: int) -> Any:
    from stagebudget.searching.live import collect_stats

    limiter = holder["limiter"]
    return collect_stats(holder["study"], [o.name for o in plan.space.objectives],
                         requested=plan.space.trials, running=running,
                         spent_hours=limiter.committed_hours,
                         search_hours=plan.space.budget.search_hours)


def _summarise(plan: SearchPlan, live: bool) -> None:
    """Print the front read back from the study and the records (the source of truth), as
    ``stagebudget status`` shows it: the same trial labels."""
    from rich.console import Console

    from stagebudget.results.run import load_run
    from stagebudget.results.status import front_table

    front = load_run(plan.run.root).front(curves=False)
    console = Console(highlight=False)
    if front.empty:
        console.print("no completed trial: no Pareto front")
        return
    console.print(front_table(front))

