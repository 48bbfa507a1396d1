"""The one Ray Tune trainable: sampled params -> schedule -> trained, measured, recorded.

Every dict given to ``ray.tune.report`` carries all objective metric names (latest values so
far). Exceptions propagate after the record is marked FAILED, so Tune retries the trial
(``max_retries``) and then Optuna records it as FAIL, never as a zero score. A deterministic
failure (:class:`~stagebudget.errors.DeterministicError`: bad input, a diverged loss) is not
retried: it is reported with ``DETERMINISTIC_FAILURE`` and the searcher records FAIL. A trial
that early stopping stops at a stage boundary (:mod:`stagebudget.searching.earlystop`) is recorded PRUNED
and reported with ``PRUNED_FLAG``; the searcher records PRUNED.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagebudget.errors import DeterministicError, StagePruned, UserError
from stagebudget.fileio import atomic_write_text, read_json
from stagebudget.names import (
    COMPLETE,
    DETERMINISTIC_FAILURE,
    DEVICE_HOURS,
    FAILED,
    ID_ACCURACY,
    OOD_ACCURACY,
    PRUNED,
    PRUNED_FLAG,
    RUNNING,
    SECONDS_PER_HOUR,
    SPENT_DEVICE_HOURS,
)
from stagebudget.rundir import RunDir, TrialRecord, charged_hours, told_objectives
from stagebudget.schedule import identity
from stagebudget.searching.earlystop import StageGate
from stagebudget.searching.workers import run_on_workers
from stagebudget.space.points import checkpoint_steps, largest_cache_entry
from stagebudget.space.schema import SearchSpace
from stagebudget.trialresult import TrialResult
from stagebudget.version import package_versions

TrialFn = Callable[..., TrialResult]
DEFAULT_TRIAL_FN = "stagebudget.training.pipeline:run_schedule"
STEP_KEY = "timesteps_total"  # ray.tune.result.TIMESTEPS_TOTAL, without importing Ray here


def resolve_trial_fn(fn: TrialFn | str | None) -> TrialFn:
    """A callable, or ``"module:function"`` imported here (on the worker)."""
    if fn is None:
        fn = DEFAULT_TRIAL_FN
    if callable(fn):
        return fn
    module, _, attr = fn.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


class Reporter:
    """Forwards curve rows to Tune with every objective present (latest value so far)."""

    def __init__(self, report: Callable[[dict[str, Any]], None]) -> None:
        self.report = report
        self.latest: dict[str, float] = {ID_ACCURACY: 0.0, OOD_ACCURACY: 0.0, DEVICE_HOURS: 0.0}

    def __call__(self, row: dict[str, Any]) -> None:
        self.observe(row)
        self.report({**row, **self.latest, "final": False})

    def observe(self, row: dict[str, Any]) -> None:
        """Take ``row``'s values as the latest, without reporting it."""
        for key in (ID_ACCURACY, OOD_ACCURACY):
            if row.get(key) is not None:
                self.latest[key] = float(row[key])
        if row.get("device_seconds") is not None:
            self.latest[DEVICE_HOURS] = float(row["device_seconds"]) / SECONDS_PER_HOUR
        if isinstance(row.get("global_step"), int):
            # Ray's own loggers (MLflow, the JSON/CSV results under tune/) plot against this key.
            self.latest[STEP_KEY] = row["global_step"]


def _start_record(run: RunDir, key: str, params: dict[str, Any], schedule: dict[str, Any],
                  reference: str | None, planned_hours: float | None = None) -> TrialRecord:
    previous = run.read_record(key)  # Tune is retrying this trial after a failure
    attempt = previous.attempt + 1 if previous is not None else 1
    record = TrialRecord(key=key, params=params, schedule=schedule, status=RUNNING,
                         reference=reference, versions=package_versions(), started=time.time(),
                         attempt=attempt, node=this_node(), planned_device_hours=planned_hours)
    run.write_record(record)
    return record


def this_node() -> dict[str, str]:
    """The Ray node this process runs on (``node_id``) and its host name."""
    import ray

    node = {"hostname": socket.gethostname()}
    if ray.is_initialized():  # always inside a trial; a direct call (a unit test) has no node
        node["node_id"] = ray.get_runtime_context().get_node_id()
    return node


def torch_threads() -> int | None:
    """torch's intra-op thread count in this process (Ray sets it to the trial's CPUs through
    OMP_NUM_THREADS); None when the trial never imported torch (a fake)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def trial_trainable(config: dict[str, Any], *, space: SearchSpace, run_dir: str,
                    trial_fn: TrialFn | str | None, cost: Any, device: str,
                    base_dir: str | None = None) -> None:
    """Train and measure one schedule (a Ray Tune function trainable).

    ``config`` is the sampled params (``{"sft.share": 0.25, ...}``); the rest comes from
    ``tune.with_parameters``. ``base_dir`` resolves a relative ``base_model`` path (the
    directory of the original space file).
    """
    from ray import tune

    from stagebudget.space.points import reference_name

    # a TrialResult, or a WorkersResult: what is read of either is objectives() and ledger
    fn: Callable[..., Any] = resolve_trial_fn(trial_fn)
    run = RunDir(Path(run_dir))
    key = tune.get_context().get_trial_id()
    params = dict(config)
    reference = reference_name(params, space.reference_points())
    schedule = space.schedule_from_params(params, cost, name=reference or key)
    # The nominal cost: what the cost model planned (load-free), beside the measured ledger.
    record = _start_record(run, key, params, schedule.to_dict(), reference,
                           planned_hours=cost.schedule_hours(schedule))
    reporter = Reporter(tune.report)
    twin = finished_twin(run, schedule.to_dict(), exclude=key) if space.reuse.enabled else None
    if twin is not None:
        reuse_twin(run, record, twin)
        tune.report({**reporter.latest, **told_objectives(record), SPENT_DEVICE_HOURS: 0.0,
                     "final": True})
        return
    res = space.resources_per_trial
    if res.workers > 1:  # data-parallel on Ray Train workers; rank 0 writes what fn would
        fn = functools.partial(run_on_workers, trial_fn or DEFAULT_TRIAL_FN, workers=res.workers,
                               cpu=res.cpu, gpu=res.gpu)
    try:
        prefix = space.reuse.cache(largest_cache_entry(space, cost))
        result = fn(schedule, out_dir=run.trial_dir(key), report=reporter, device=device,
                    cost=cost, base_dir=Path(base_dir) if base_dir else None,
                    guard=space.budget.overrun_guard,
                    **({"prefix_cache": prefix,
                        "checkpoint_steps": checkpoint_steps(space, schedule, cost),
                        "recovery_seconds": 60.0 * space.reuse.recovery_minutes}
                       if prefix is not None else {}),
                    **_early_stopping(run, space, key, reference))
        objectives = {k: float(v) for k, v in result.objectives().items()}
    except StagePruned as exc:
        # Stopped at a stage boundary: PRUNED with where and why, never partial scores. The
        # searcher tells Optuna PRUNED when it sees the flag; the spend so far is charged.
        record_pruned(run, record, exc)
        spent = record.ledger.get(SPENT_DEVICE_HOURS, reporter.latest[DEVICE_HOURS])
        tune.report({**reporter.latest, SPENT_DEVICE_HOURS: spent, "final": True,
                     PRUNED_FLAG: str(exc)})
        return
    except DeterministicError as exc:
        # A retry would fail the same way: end the trial now. Ray retries every exception, so
        # this one is reported, not raised; the searcher records the trial as FAIL (never a
        # score) when it sees the flag.
        record_failure(run, record, exc)
        tune.report({**reporter.latest, "final": True, DETERMINISTIC_FAILURE: record.error})
        return
    except Exception as exc:
        record_failure(run, record, exc)
        raise
    record.status, record.finished = COMPLETE, time.time()
    record.objectives, record.ledger = objectives, dict(getattr(result, "ledger", {}) or {})
    record.torch_threads = torch_threads()
    run.write_record(record)
    spent = charged_hours(record)
    tune.report({**reporter.latest, **told_objectives(record), SPENT_DEVICE_HOURS: spent,
                 "final": True})


def _early_stopping(run: RunDir, space: SearchSpace, key: str,
                    reference: str | None) -> dict[str, Any]:
    """``{"stage_end": gate}`` when the space enables early stopping, else nothing (a trial
    function then never sees the argument). The gate snapshots the completed trials now.
    Reference schedules always run to the end: every front is read against them."""
    spec = space.early_stopping
    if not spec.enabled or reference is not None:
        return {}
    objectives = {o.name: str(o.direction) for o in space.objectives}
    return {"stage_end": StageGate.snapshot(run, objectives, spec.margin_se, exclude=key)}


def record_pruned(run: RunDir, record: TrialRecord, exc: StagePruned) -> None:
    """Mark ``record`` PRUNED: where and why in ``pruned``, the spend so far in ``ledger``
    (from the trial's ledger.json), no objectives."""
    record.status, record.finished = PRUNED, time.time()
    record.objectives, record.pruned = {}, dict(exc.info)
    ledger = run.trial_dir(record.key) / "ledger.json"
    with contextlib.suppress(UserError, OSError, ValueError):
        data = read_json(ledger) if ledger.is_file() else {}
        record.ledger = data if isinstance(data, dict) else {}
    run.write_record(record)


def finished_twin(run: RunDir, schedule: dict[str, Any], exclude: str) -> TrialRecord | None:
    """A COMPLETE trial of this run that trained exactly this schedule, if any.

    Different params can plan the same schedule (an RL rank is irrelevant when RL gets no
    budget; samplers also re-propose points). Training is deterministic by seed, so the twin's
    measurements are what a re-run would give: the trial reuses them instead of training.
    """
    want = identity(schedule)
    for rec in run.records():
        if rec.key != exclude and rec.status == COMPLETE and rec.objectives \
                and rec.reused_from is None and identity(rec.schedule) == want:
            return rec
    return None


def reuse_twin(run: RunDir, record: TrialRecord, twin: TrialRecord) -> None:
    """Complete ``record`` with ``twin``'s measurements; its curves are copied, nothing trains.

    The objectives keep the twin's device-hours: a schedule is charged its full cost, what it
    would cost to train alone; the ledger says that nothing was spent this time.
    """
    src = run.trial_dir(twin.key) / "curves.jsonl"
    if src.is_file():
        atomic_write_text(run.trial_dir(record.key) / "curves.jsonl", src.read_text())
    record.status, record.finished, record.reused_from = COMPLETE, time.time(), twin.key
    record.objectives, record.torch_threads = dict(twin.objectives), twin.torch_threads
    record.ledger = {**twin.ledger, "reused_from": twin.key, "spent_train_seconds": 0.0,
                     SPENT_DEVICE_HOURS: 0.0}
    run.write_record(record)


OOM_HINT = ("out of memory: give the trial more memory (resources_per_trial), or search smaller "
            "batch_size / lora_rank / max_length")


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for a record; out-of-memory errors get a hint on what to change."""
    text = f"{type(exc).__name__}: {exc}".strip()
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError" or "out of memory" in text.lower():
        text = f"{text} [{OOM_HINT}]"
    return text


def record_failure(run: RunDir, record: TrialRecord, exc: BaseException) -> None:
    """Mark ``record`` FAILED with the error, never a score (objectives cleared), and save it.

    A failure to save (e.g. the disk is full) must not hide the trial's own error, which the
    caller re-raises so Tune retries the trial and Optuna records it as FAIL.
    """
    record.status, record.finished = FAILED, time.time()
    record.objectives = {}
    record.error = describe_error(exc)
    with contextlib.suppress(UserError, OSError):
        run.write_record(record)
