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
import functools
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stagebudget.errors import ConfigError, UserError
from stagebudget.fileio import DISK_FULL, atomic_write_yaml, read_json
from stagebudget.names import COMPLETE, ERROR_ATTR, FAILED, INTERRUPTED, PRUNED, RUNNING
from stagebudget.rundir import RunDir, charged_hours, is_interrupted, spend_summary
from stagebudget.space import SearchSpace, check_run_name, make_sampler
from stagebudget.studystore import normalize_url, open_storage, study_storage_url
from stagebudget.version import __version__, numerics, numerics_changes

log = logging.getLogger(__name__)

TrialFn = Callable[..., Any] | str


class ClusterError(UserError):
    """The Ray cluster named by ``--address`` cannot be used."""


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
               trials: int | None = None, budget_hours: float | None = None,
               concurrency: int | None = None, address: str | None = None,
               storage: str | None = None, resume: bool = False, live: bool = True,
               trial_fn: TrialFn | None = None, mlflow: str | None = None) -> Path:
    """Run (or resume) a budgeted multi-objective search; return the run directory.

    ``trial_fn`` defaults to ``stagebudget.pipeline.run_schedule``; tests pass a fake (a callable
    importable on Ray workers, or ``"module:function"``). ``budget_hours`` is the search-wide
    device-hour budget (overrides ``budget.search_hours``): no trial starts past it.
    ``mlflow`` is an MLflow tracking URI: trials are also logged there (kept for a resume).
    When Ray is already initialised in this process, the search runs on it and leaves it
    running (a benchmark of many searches starts Ray once); otherwise it starts a private local
    Ray (or joins ``address``) and shuts it down at the end.
    """
    _check_flags(name, Path(runs_dir))
    if address is None:
        choose_local_ray_auth()
    if mlflow is not None:
        check_mlflow(mlflow)
    plan = (_plan_resume if resume else _plan_new)(
        Path(space_path), name=name, runs_dir=Path(runs_dir), trials=trials,
        budget_hours=budget_hours, concurrency=concurrency, address=address, storage=storage)
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
            raise _settle_interrupted(plan) from None
        elif _is_disk_full(exc):
            raise _disk_full(plan, exc) from None
        raise
    plan.meta.update(stopped_by_budget=stopped, finished=time.time(),
                     spend=spend_summary(plan.run.records()))
    plan.run.write_meta(_without_tool(plan.meta))
    _summarise(plan, live)
    return plan.run.root


def check_mlflow(uri: str) -> None:
    """``--mlflow URI`` needs the mlflow package (Ray's MLflowLoggerCallback uses it)."""
    try:
        import mlflow
    except ImportError:
        raise UserError(f"--mlflow {uri!r} needs MLflow: pip install mlflow (or mlflow-skinny), "
                        "or leave --mlflow out") from None
    try:  # reach the tracking store now, not after the run directory exists
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--mlflow {uri!r}: MLflow cannot use this tracking URI: {first} "
                        "(e.g. sqlite:///mlflow.db or http://HOST:5000)") from None


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
            study = _load_study(plan.storage, plan.meta["study_name"])
            return mark_interrupted(study, plan.run, [o.name for o in plan.space.objectives])
        except StorageInternalError as exc:
            log.warning("settling the study after Ctrl-C failed (%s); retrying", exc)
            gc.collect()  # drops the interrupted session's connection
            time.sleep(0.5 * (attempt + 1))
    return None


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a search; the message says what finished and how to resume."""


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


def reap_ray_session(meta: dict[str, Any]) -> list[int]:
    """End the processes of the private local Ray a killed driver left behind (its
    DashboardAgent, RuntimeEnvAgent, raylet...): those whose command line names the session
    directory recorded in run.json, on this host. Call only while holding the run's
    :class:`DriverLock` (the driver that started that Ray is then gone). Returns the pids ended.
    """
    session, host = meta.get("ray_session_dir"), meta.get("ray_host")
    proc = Path("/proc")
    if not session or host != os.uname().nodename or not proc.is_dir():
        return []
    mine = {os.getpid(), os.getppid()}
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        if _uses_session(entry, session):
            pids.append(int(entry.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(map(_alive, pids)):
            time.sleep(0.1)
    if pids:
        log.info("ended %d processes left by the killed driver's Ray (%s)", len(pids), session)
    return pids


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent that never reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _uses_session(proc_entry: Path, session: str) -> bool:
    """Whether a /proc entry belongs to the Ray session: its command line names the session
    directory, or (agents retitle themselves, e.g. ``ray::DashboardAgent``) it holds a log file
    open there."""
    try:
        if session.encode() in (proc_entry / "cmdline").read_bytes():
            return True
        for fd in (proc_entry / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(session + os.sep):
                    return True
    except OSError:  # gone, or not ours to read
        return False
    return False


class DriverLock:
    """One driver per run: an exclusive ``flock`` on ``RUN/.driver.lock`` for the whole search
    or resume. The kernel drops it when the process dies, so a killed driver never blocks a
    resume; a second driver on a live run is refused, naming the one that holds it."""

    def __init__(self, run: RunDir) -> None:
        import fcntl

        self.path = run.root / ".driver.lock"
        self._fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise UserError(
                f"run {run.root} is being driven right now by {holder}; one driver per run: "
                "wait for it to finish (or stop it), then resume with --resume") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"stagebudget pid {os.getpid()} on {os.uname().nodename}, started "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fh.flush()

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock)."""
        if not self._fh.closed:
            self._fh.close()


def check_prefix_cache_dir(space: SearchSpace) -> None:
    """With reuse on, this machine must be able to create and write the prefix cache: else
    every trial would train alone and warn at every stage. Checked without writing anything
    (the nearest existing folder must be a writable directory)."""
    cache = space.reuse.cache()
    if cache is None:
        return
    root = Path(cache.root)
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    problem = None
    if existing is None or not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user"
    if problem is not None:
        raise ConfigError(
            f"the prefix cache directory {root} cannot be used: {problem}. Give reuse.cache_dir "
            "a directory this user can write (or set $STAGEBUDGET_PREFIX_CACHE), or turn reuse "
            "off with reuse: {enabled: false}", source=space._source, field="reuse.cache_dir")


def check_local_resources(space: SearchSpace) -> None:
    """``concurrency`` trials at once must fit this machine's CPUs (and GPUs)."""
    res, n = space.resources_per_trial, space.concurrency
    cpus = os.cpu_count() or 1
    where = f"{space._source}: " if space._source else ""
    if n * res.cpu > cpus:
        raise UserError(
            f"{where}concurrency x resources_per_trial.cpu = {n} x {res.cpu:g} = "
            f"{n * res.cpu:g} CPUs, but this machine has {cpus}; lower `concurrency` (--concurrency) or "
            "`resources_per_trial.cpu`, or give --address of a Ray cluster")
    if res.gpu > 0:
        gpus = _local_gpus()
        if n * res.gpu > gpus:
            raise UserError(
                f"{where}concurrency x resources_per_trial.gpu = {n} x {res.gpu:g} = "
                f"{n * res.gpu:g} GPUs, but this machine has {gpus}; lower `concurrency` or "
                "`resources_per_trial.gpu` (fractions such as 0.5 share a GPU)")


def check_cluster(address: str) -> None:
    """Before anything is written: a ``host:port`` address must answer, and let this driver in.

    Without this, Ray retries an unreachable address for 40 s and an authentication refusal for
    20 s, then raises with a traceback. ``ray://`` (Ray Client), ``auto`` and ``local`` are left
    to Ray.
    """
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach a Ray cluster at --address {address}: nothing accepts connections on "
            f"{host}:{port} ({exc.strerror or exc}). Give the address that `ray start --head` "
            "printed (host:6379 by default), or leave --address out to run on this machine; "
            "nothing was written") from None
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.exceptions import AuthenticationError

    try:
        with _quiet_stderr():  # Ray's C++ client logs the refusal on stderr as well
            GcsClient(address=address, cluster_id=None)
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE")
        now = f"RAY_AUTH_MODE is {mode!r}" if mode else "RAY_AUTH_MODE is not set"
        raise ClusterError(
            f"the Ray cluster at --address {address} refused this driver: it uses token "
            f"authentication and {now} here, or the token differs. Set RAY_AUTH_MODE=token and "
            "give the cluster's token: copy the head's ~/.ray/auth_token to this machine (or "
            "point RAY_AUTH_TOKEN_PATH at a copy, or set RAY_AUTH_TOKEN); every node started "
            "with `ray start` needs the same two settings. Nothing was written") from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C++ log lines) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _local_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        import torch

        return int(torch.cuda.device_count())
    except ImportError:
        return 0


def check_space(path: str | Path, *, trials: int | None = None, concurrency: int | None = None,
                budget_hours: float | None = None, address: str | None = None,
                warn: Callable[[str], None] | None = None) -> SearchSpace:
    """Every check on a space, as ``validate`` and ``search`` both run it: the file and its
    feasibility at every corner, task files and a local model, this machine's resources, the
    sampler and its options, and the search budget. Nothing is written and Ray is not started.
    ``trials``, ``concurrency`` and ``budget_hours`` are the CLI overrides; ``warn`` receives
    the input checks' warnings (default: printed as ``warning: ...``).
    """
    if budget_hours is not None and not (math.isfinite(budget_hours) and budget_hours > 0):
        raise UserError(f"--budget-hours must be a positive number of device-hours, got "
                        f"{budget_hours}")
    space = SearchSpace.load(path, trials=trials, concurrency=concurrency)
    for warning in space.check_inputs():
        if warn is not None:
            warn(warning)
        else:
            print(f"warning: {warning}", flush=True)
    if address is None:
        check_local_resources(space)
        check_prefix_cache_dir(space)  # on a cluster: the nodes' storage
    else:
        check_cluster(address)
    make_sampler(space, space.trials)  # a bogus sampler option is an error now, not in Ray
    if budget_hours is not None:
        budget = space.budget.model_copy(update={"search_hours": budget_hours})
        source = space._source
        space = space.model_copy(update={"budget": budget})
        space._source = source
    search, per_trial = space.budget.search_hours, space.budget.per_trial_hours
    if search is not None and search < per_trial:
        raise UserError(
            f"{path}: the search budget ({search:g} device-hours, --budget-hours or "
            f"budget.search_hours) is smaller than one trial's budget (budget.per_trial_hours = "
            f"{per_trial:g}), so no trial could start; give at least {per_trial:g}")
    return space


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
              budget_hours: float | None, concurrency: int | None, address: str | None,
              storage: str | None) -> SearchPlan:
    space = check_space(space_path, trials=trials, concurrency=concurrency,
                        budget_hours=budget_hours, address=address)
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


def warn_numerics_changed(meta: dict[str, Any]) -> list[str]:
    """Warn when this machine's numerics differ from those run.json recorded at the start: the
    trials run from here may then not match the earlier ones exactly. Returns the changes."""
    changes = numerics_changes(meta["numerics"], numerics()) if meta.get("numerics") else []
    if changes:
        log.warning("resuming %s on other numerics than it started with (%s): trials run from "
                    "here may differ from the earlier ones even for the same schedule",
                    meta.get("name"), "; ".join(changes))
    return changes


def _plan_resume(space_path: Path, *, name: str | None, runs_dir: Path, trials: int | None,
                 budget_hours: float | None, concurrency: int | None, address: str | None,
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
                            budget_hours=budget_hours, concurrency=concurrency,
                            address=address, storage=storage)
    except BaseException:
        lock.release()
        raise


def _resume_plan(run: RunDir, meta: dict[str, Any], lock: DriverLock, *, trials: int | None,
                 budget_hours: float | None, concurrency: int | None, address: str | None,
                 storage: str | None) -> SearchPlan:
    if storage and storage != meta["storage"]:
        raise UserError(f"--storage {storage!r} differs from this run's {meta['storage']!r}; "
                        "leave --storage out when resuming")
    space = check_space(run.space, trials=trials or meta["trials_requested"],
                        concurrency=concurrency,
                        budget_hours=budget_hours or meta.get("search_budget_hours"),
                        address=address)
    store = open_storage(study_storage_url(meta.get("storage"), run))  # a copied run: its own
    study = _load_study(store, meta["study_name"])
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
              if space.references and not any(_same_params(p, s) for s in seen)]
    prior = sum(charged_hours(r) for r in run.records())
    return SearchPlan(run, space, meta, store, space.trials - finished, points, prior, lock=lock)


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
    """Settle what a killed driver left RUNNING; return the finished trials afterwards (see
    :func:`finished_trials`: interrupted ones are not finished).

    A trial whose record is COMPLETE finished before the driver died but was never told to the
    study: it is told now with the record's objectives (kept, not re-run); one whose record is
    PRUNED is told PRUNED. Any other RUNNING study trial becomes FAIL with error "interrupted"
    (``--resume`` runs it again, see :func:`retry_interrupted`), and RUNNING records become
    FAILED with that error.
    """
    from optuna.trial import TrialState

    from stagebudget.names import TUNE_ID_ATTR
    from stagebudget.studyinfo import annotate_trial

    storage = study._storage
    records = {r.key: r for r in run.records()}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        rec = records.get(t.user_attrs.get(TUNE_ID_ATTR, ""))
        if rec and rec.status in (COMPLETE, PRUNED):
            annotate_trial(functools.partial(storage.set_trial_user_attr, t._trial_id), rec)
        if rec and rec.status == COMPLETE and all(o in rec.objectives for o in objectives):
            values = [float(rec.objectives[o]) for o in objectives]
            storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, values)
            continue
        if rec and rec.status == PRUNED:
            storage.set_trial_state_values(t._trial_id, TrialState.PRUNED)
            continue
        storage.set_trial_user_attr(t._trial_id, ERROR_ATTR, INTERRUPTED)  # before: FAIL is final
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    for record in records.values():
        if record.status == RUNNING:
            record.status, record.error, record.finished = FAILED, INTERRUPTED, time.time()
            run.write_record(record)
    return finished_trials(study)


def finished_trials(study: Any) -> int:
    """Trials that count toward ``trials``: COMPLETE, PRUNED, and FAIL other than interrupted
    (an interrupted trial is run again on ``--resume``, so its retry is what counts) and other
    than twins (told an earlier trial's result, they took no trial slot)."""
    from optuna.trial import TrialState

    from stagebudget.rundir import is_twin

    done = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return sum(not is_interrupted(t) and not is_twin(t)
               for t in study.get_trials(deepcopy=False, states=done))


RETRY_OF_ATTR = "retry_of"


def retry_interrupted(study: Any) -> list[int]:
    """Enqueue every interrupted trial not yet retried, with the same params (so the same
    schedule); return the numbers of the trials retried.

    The retry is a WAITING trial that the searcher asks first, marked the way Optuna's own
    ``RetryHeartbeatStaleTrialCallback`` marks one (system attrs ``failed_trial`` and
    ``retry_history``), plus a ``retry_of`` user attribute for the dashboard. Idempotent: a
    driver killed again before it asked the retry leaves it WAITING, and nothing is added twice.
    """
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    out = []
    for t in trials:
        if not is_interrupted(t) or t.number in retried:
            continue
        history = [*t.system_attrs.get("retry_history", []), t.number]
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions,
            user_attrs={RETRY_OF_ATTR: t.number},
            system_attrs={"failed_trial": history[0], "retry_history": history}))
        out.append(t.number)
    if out:
        log.info("running again the %d trials the last driver left unfinished: %s", len(out),
                 ", ".join(map(str, out)))
    return out


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


def choose_local_ray_auth() -> None:
    """Ray turns token authentication on for a new local cluster and warns that it did unless
    ``RAY_AUTH_MODE`` says so; say so, with the same mode, while Ray can still read it (its
    config is read once, when ``ray`` is first imported: later it would refuse its own token).
    A user's own ``RAY_AUTH_MODE`` wins; a process that imported Ray already keeps the notice."""
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _init_ray(address: str | None, space: SearchSpace) -> str | None:
    """Start (or join) Ray; return the session directory of a private local Ray."""
    import ray

    if address is None:
        # "local" always starts a private Ray: a bare ray.init() would join any cluster that
        # `ray start` left running on this machine.
        ctx = ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                       log_to_driver=False, ignore_reinit_error=True, configure_logging=False)
        info = getattr(ctx, "address_info", None) or {}
        return str(info.get("session_dir") or "") or None
    else:
        try:
            ray.init(address=address, log_to_driver=False, ignore_reinit_error=True,
                     configure_logging=False)
        except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at --address {address}: "
                               f"{str(exc).splitlines()[0]}") from None
    return None


def _execute(plan: SearchPlan, *, address: str | None, live: bool,
             trial_fn: TrialFn | None) -> bool:
    """Run the remaining trials; return whether the search budget stopped the search."""
    import ray
    from ray import tune

    from stagebudget.live import Display, LiveDisplay, ProgressCallback
    from stagebudget.studyinfo import annotate_study
    from stagebudget.tbcurves import TENSORBOARD_DIR
    from stagebudget.trainable import trial_trainable
    from stagebudget.tune_adapter import build_tuner

    space = plan.space
    from stagebudget.stages.common import resolve_device

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
    session = _init_ray(address, space) if owns_ray else None
    if session:  # so that a resume after a killed driver can end this Ray's leftover processes
        plan.meta.update(ray_session_dir=session, ray_host=os.uname().nodename)
        plan.run.write_meta(_without_tool(plan.meta))
    try:
        tuner, limiter, search = build_tuner(
            trainable, space, run_dir=plan.run.root, study_name=plan.meta["study_name"],
            storage=plan.storage, num_samples=plan.remaining, concurrency=space.concurrency,
            points=plan.points, callbacks=[callback], mlflow_uri=plan.meta.get("mlflow"),
            cost=cost,
            limiter_kwargs={
                "budget_hours": space.budget.search_hours,
                "per_trial_hours": space.budget.per_trial_hours,
                "planned_hours": _planner(space, cost), "prior_hours": plan.prior_hours})
        holder.update(limiter=limiter, study=search.study)
        annotate_study(search.study, space, plan.run.root, plan.meta)
        print(f"curves: tensorboard --logdir {plan.run.root / TENSORBOARD_DIR}", flush=True)
        with display, _tune_env():
            tuner.fit()
            display.update(_stats(plan, holder, 0), force=True)
    finally:
        if owns_ray:
            ray.shutdown()  # for an external cluster this only disconnects the driver
    return bool(limiter.stopped_by_budget)


# Tune settings read from the environment when ``fit`` starts (Ray's documented variables).
TUNE_ENV = {
    # Ctrl-C raises KeyboardInterrupt in the driver instead of Ray Tune's own handler (which
    # ends the experiment as if it had finished and prints a ``Tuner.restore`` hint that does
    # not apply): the search then settles the run for ``--resume`` and exits non-zero.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
    # No automatic loggers: build_tuner passes Tune's CSV and JSON loggers itself and leaves out
    # its TensorBoard logger, whose mere presence prints "To visualize your results with
    # TensorBoard, run: tensorboard --logdir <Ray's temporary session folder>". The curves are
    # in RUN/tensorboard/ (stagebudget.tbcurves), which the search names instead.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


@contextlib.contextmanager
def _tune_env() -> Iterator[None]:
    """:data:`TUNE_ENV` set while Tune runs, the previous values restored after."""
    old = {k: os.environ.get(k) for k in TUNE_ENV}
    os.environ.update(TUNE_ENV)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


COST_FILE = "cost.json"


def frozen_cost_model(run_root: Path, space: SearchSpace, device: str) -> Any:
    """The cost model this run plans with, frozen into ``RUN/cost.json`` when the run starts
    and read back on every resume: params -> schedule stays the same within a run even when a
    calibrated table is remade meanwhile."""
    from stagebudget.cost import CostModel

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
    from stagebudget.live import collect_stats

    limiter = holder["limiter"]
    return collect_stats(holder["study"], [o.name for o in plan.space.objectives],
                         requested=plan.space.trials, running=running,
                         spent_hours=limiter.committed_hours,
                         budget_hours=plan.space.budget.search_hours)


def _summarise(plan: SearchPlan, live: bool) -> None:
    """Print the front read back from the study and the records (the source of truth), as
    ``stagebudget status`` shows it: the same trial labels."""
    from rich.console import Console

    from stagebudget.runs import load_run
    from stagebudget.status import front_table

    front = load_run(plan.run.root).front(curves=False)
    console = Console(highlight=False)
    if front.empty:
        console.print("no completed trial: no Pareto front")
        return
    console.print(front_table(front))

