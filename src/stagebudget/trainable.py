"""The one Ray Tune trainable: sampled params -> schedule -> trained, measured, recorded.

Every dict given to ``ray.tune.report`` carries all objective metric names (latest values so
far). Exceptions propagate after the record is marked FAILED, so Tune retries the trial
(``max_retries``) and then Optuna records it as FAIL, never as a zero score.

``fake_trial_fn`` at the bottom is for tests only: it stands in for ``pipeline.run_schedule`` and
lives in the package (not under tests/) so Ray workers on other nodes can import it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from stagebudget.errors import UserError
from stagebudget.fileio import atomic_write_text
from stagebudget.records import (
    DEVICE_HOURS,
    ID_ACCURACY,
    ID_ACCURACY_SE,
    OOD_ACCURACY,
    OOD_ACCURACY_SE,
    RunDir,
    TrialRecord,
)
from stagebudget.space import SearchSpace

TrialFn = Callable[..., Any]
DEFAULT_TRIAL_FN = "stagebudget.pipeline:run_schedule"
STEP_KEY = "timesteps_total"  # ray.tune.result.TIMESTEPS_TOTAL, without importing Ray here
VERSIONED = ("stagebudget", "torch", "transformers", "trl", "peft", "ray", "optuna")


def resolve_trial_fn(fn: TrialFn | str | None) -> TrialFn:
    """A callable, or ``"module:function"`` imported here (on the worker)."""
    if fn is None:
        fn = DEFAULT_TRIAL_FN
    if callable(fn):
        return fn
    module, _, attr = fn.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a trial's result."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


class _Reporter:
    """Forwards curve rows to Tune with every objective present (latest value so far)."""

    def __init__(self, report: Callable[[dict[str, Any]], None]) -> None:
        self.report = report
        self.latest: dict[str, float] = {ID_ACCURACY: 0.0, OOD_ACCURACY: 0.0, DEVICE_HOURS: 0.0}

    def __call__(self, row: dict[str, Any]) -> None:
        for key in (ID_ACCURACY, OOD_ACCURACY):
            if row.get(key) is not None:
                self.latest[key] = float(row[key])
        if row.get("device_seconds") is not None:
            self.latest[DEVICE_HOURS] = float(row["device_seconds"]) / 3600.0
        if isinstance(row.get("global_step"), int):
            # Ray's own loggers (TensorBoard under tune/, MLflow) plot against this key.
            self.latest[STEP_KEY] = row["global_step"]
        self.report({**row, **self.latest, "final": False})


def _start_record(run: RunDir, key: str, params: dict[str, Any], schedule: dict[str, Any],
                  reference: str | None) -> TrialRecord:
    attempt = 1
    path = run.trial_dir(key) / "record.json"
    if path.is_file():  # Tune is retrying this trial after a failure
        try:
            attempt = int(json.loads(path.read_text()).get("attempt", 1)) + 1
        except (OSError, ValueError):
            attempt = 2
    record = TrialRecord(key=key, params=params, schedule=schedule, status="RUNNING",
                         reference=reference, versions=package_versions(), started=time.time(),
                         attempt=attempt)
    run.write_record(record)
    return record


def trial_trainable(config: dict[str, Any], *, space: SearchSpace, run_dir: str,
                    trial_fn: TrialFn | str | None, cost: Any, device: str,
                    cache_dir: str | None = None, base_dir: str | None = None) -> None:
    """Train and measure one schedule (a Ray Tune function trainable).

    ``config`` is the sampled params (``{"sft.share": 0.25, ...}``); the rest comes from
    ``tune.with_parameters``. ``base_dir`` resolves a relative ``base_model`` path (the
    directory of the original space file).
    """
    from ray import tune

    from stagebudget.tune_adapter import reference_name

    fn = resolve_trial_fn(trial_fn)
    run = RunDir(Path(run_dir))
    key = tune.get_context().get_trial_id()
    params = dict(config)
    reference = reference_name(params, space.reference_points())
    schedule = space.schedule_from_params(params, cost, name=reference or key)
    record = _start_record(run, key, params, schedule.to_dict(), reference)
    reporter = _Reporter(tune.report)
    twin = finished_twin(run, schedule.to_dict(), exclude=key)
    if twin is not None:
        _reuse(run, record, twin)
        tune.report({**reporter.latest, **record.objectives, "final": True})
        return
    try:
        result = fn(schedule, out_dir=run.trial_dir(key), report=reporter, device=device,
                    cost=cost, cache_dir=Path(cache_dir) if cache_dir else None,
                    base_dir=Path(base_dir) if base_dir else None)
        objectives = {k: float(v) for k, v in result.objectives().items()}
    except Exception as exc:
        record_failure(run, record, exc)
        raise
    record.status, record.finished = "COMPLETE", time.time()
    record.objectives, record.ledger = objectives, dict(getattr(result, "ledger", {}) or {})
    run.write_record(record)
    tune.report({**reporter.latest, **objectives, "final": True})


def _content(schedule: dict[str, Any]) -> str:
    """What determines a trained model: the schedule without its display name."""
    return json.dumps({k: v for k, v in schedule.items() if k != "name"}, sort_keys=True)


def finished_twin(run: RunDir, schedule: dict[str, Any], exclude: str) -> TrialRecord | None:
    """A COMPLETE trial of this run that trained exactly this schedule, if any.

    Different params can plan the same schedule (an RL rank is irrelevant when RL gets no
    budget; samplers also re-propose points). Training is deterministic by seed, so the twin's
    measurements are what a re-run would give: the trial reuses them instead of training.
    """
    want = _content(schedule)
    for rec in run.records():
        if rec.key != exclude and rec.status == "COMPLETE" and rec.objectives \
                and rec.reused_from is None and _content(rec.schedule) == want:
            return rec
    return None


def _reuse(run: RunDir, record: TrialRecord, twin: TrialRecord) -> None:
    """Complete ``record`` with ``twin``'s measurements; its curves are copied, nothing trains.

    The objectives keep the twin's device-hours: a schedule is charged its full cost, what it
    would cost to train alone; the ledger says that nothing was spent this time.
    """
    src = run.trial_dir(twin.key) / "curves.jsonl"
    if src.is_file():
        atomic_write_text(run.trial_dir(record.key) / "curves.jsonl", src.read_text())
    record.status, record.finished, record.reused_from = "COMPLETE", time.time(), twin.key
    record.objectives = dict(twin.objectives)
    record.ledger = {**twin.ledger, "reused_from": twin.key, "spent_device_seconds": 0.0}
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
    record.status, record.finished = "FAILED", time.time()
    record.objectives = {}
    record.error = describe_error(exc)
    with contextlib.suppress(UserError):
        run.write_record(record)


# --- for tests only -----------------------------------------------------------------------------
class FakeResult:
    """What ``fake_trial_fn`` returns: the shape of ``pipeline.TrialResult`` (tests only)."""

    def __init__(self, id_accuracy: float, ood_accuracy: float, device_hours: float,
                 curves: list[dict[str, Any]], se: dict[str, float] | None = None) -> None:
        self.id_accuracy, self.ood_accuracy = id_accuracy, ood_accuracy
        self.se = dict(se or {})
        self.device_hours = self.planned_device_hours = device_hours
        self.curves = curves
        self.ledger: dict[str, Any] = {"device_hours": device_hours, "fake": True, "pid": os.getpid()}
        self.metrics: dict[str, Any] = {}

    def objectives(self) -> dict[str, float]:
        return {ID_ACCURACY: self.id_accuracy, OOD_ACCURACY: self.ood_accuracy,
                DEVICE_HOURS: self.device_hours, **self.se}


def fake_trial_fn(schedule: Any, out_dir: Path | None = None, *,
                  report: Callable[[dict[str, Any]], None] | None = None,
                  seconds: float = 0.2, fail: str | None = None, kill: str | None = None,
                  marker_dir: str | None = None, se: bool = False, **_: Any) -> FakeResult:
    """A fast stand-in for ``pipeline.run_schedule``. FOR TESTS ONLY.

    Scores are a deterministic function of the schedule: more SFT steps raise ID and lower OOD,
    so the front has several points. Faults, for fault-injection tests (bind them with
    ``functools.partial``):

    - ``fail="always"`` raises ``FloatingPointError`` (like a NaN loss) in every trial;
      ``fail="first"`` in every attempt of the first trial to start.
    - ``kill="once"`` SIGKILLs its own process on each trial's first attempt (a retry then
      succeeds); ``kill="first"`` on every attempt of the first trial to reach it.

    Which trial is "first" is decided by marker files in ``marker_dir``.
    Spent device-hours = the schedule's ``budget_hours`` (or 0.001). ``se=True`` adds binomial
    standard errors of the objectives (as if measured on 200 prompts).
    """
    key = Path(out_dir).name if out_dir else "trial"
    if fail == "always" or (fail == "first" and _chosen(marker_dir, "fail", key)):
        raise FloatingPointError(f"loss is NaN at step 3 (fake, trial {key})")
    if (kill == "once" and _chosen(marker_dir, f"kill-{key}", "")) or (
            kill == "first" and _chosen(marker_dir, "kill", key)):
        os.kill(os.getpid(), 9)
    sft = sum(s.steps for s in schedule.stages if s.kind == "sft")
    total = max(1, sum(s.steps for s in schedule.stages))
    frac = sft / total
    hours = schedule.budget_hours or 0.001
    rows = []
    for i in range(1, 3):
        time.sleep(seconds / 2)
        row = {"stage": schedule.stages[-1].kind, "stage_index": len(schedule.stages) - 1,
               "step": i, "global_step": i, "device_seconds": hours * 3600 * i / 2,
               ID_ACCURACY: round(0.3 + 0.6 * frac * i / 2, 4),
               OOD_ACCURACY: round(0.8 - 0.5 * frac * i / 2, 4), "train_loss": 1.0 / i}
        rows.append(row)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(out_dir) / "curves.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if report is not None:
            report(row)
    final = rows[-1]
    errors = {name: round(math.sqrt(final[k] * (1 - final[k]) / 200), 4)
              for k, name in ((ID_ACCURACY, ID_ACCURACY_SE), (OOD_ACCURACY, OOD_ACCURACY_SE))
              } if se else None
    return FakeResult(final[ID_ACCURACY], final[OOD_ACCURACY], hours, rows, errors)


def _chosen(marker_dir: str | None, name: str, key: str) -> bool:
    """True for the caller that creates marker ``name`` first, and later for the same ``key``.

    With ``key=""`` it is true exactly once. False without a marker dir.
    """
    if marker_dir is None:
        return False
    path = Path(marker_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return bool(key) and path.read_text() == key
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return True
