"""The run directory and per-trial records: the source of truth beside the Optuna study.

Layout of ``runs/NAME/``::

    run.json                 what this is: tool, version, study name, storage URL, space file
    space.yaml               the validated search space the run was started with
    study.db                 the Optuna study (SQLite by default; optuna-dashboard opens it)
    tune/                    Ray Tune's experiment state
    trials/<key>/record.json one record per trial (written atomically, updated as it runs)
    trials/<key>/curves.jsonl ID/OOD curve rows, appended as they are measured
    tensorboard/<trial>/     the same curves as TensorBoard events, one run per trial
    report.html, exports/    what ``pareto`` and ``export`` write

Fronts, plots and exports read these files and the study, never in-memory Ray objects, so they
work on a finished or a half-finished run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from stagebudget.errors import RunError, UserError
from stagebudget.fileio import atomic_write_json, read_json
from stagebudget.names import (
    COMPLETE,
    DEVICE_HOURS,
    ERROR_ATTR,
    ID_ACCURACY,
    INTERRUPTED,
    OOD_ACCURACY,
    PRUNED,
    RUNNING,
    SECONDS_PER_HOUR,
    SPENT_DEVICE_HOURS,
    TWIN_ATTR,
)

TOOL = "stagebudget"
RECORD_FILE = "record.json"


def is_interrupted(trial: Any) -> bool:
    """An Optuna trial that a killed or interrupted driver cut short: FAIL with error
    "interrupted" (not a failure of its own; ``--resume`` runs it again)."""
    return bool(trial.state.name == "FAIL" and trial.user_attrs.get(ERROR_ATTR) == INTERRUPTED)


@dataclass
class TrialRecord:
    """Everything one trial leaves: schedule, objectives, ledger, status, error, versions.

    ``key`` is unique per trial (the Ray trial id); ``params`` are the sampled Optuna params,
    which also join a record to its Optuna trial.
    """

    key: str
    params: dict[str, Any]
    schedule: dict[str, Any]
    status: str = RUNNING
    reference: str | None = None
    objectives: dict[str, float] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None
    attempt: int = 1
    reused_from: str | None = None
    pruned: dict[str, Any] | None = None  # where and why early stopping stopped it
    node: dict[str, str] = field(default_factory=dict)  # Ray node id and host it ran on
    torch_threads: int | None = None  # see TORCH_THREADS
    planned_device_hours: float | None = None  # see PLANNED_DEVICE_HOURS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def meta(self) -> Path:
        return self.root / "run.json"

    @property
    def space(self) -> Path:
        return self.root / "space.yaml"

    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def storage_url(self, stored: str) -> str:
        """The study storage URL to open for this run, given run.json's ``storage``.

        A run's own SQLite study is found relative to its directory: a copied or moved run
        directory opens its own ``study.db``, never the original's (whose absolute path run.json
        still names). Other storages (a server URL, a journal, a SQLite file elsewhere) are
        used as written.
        """
        if stored.startswith("sqlite:///") and self.study_db.is_file():
            return f"sqlite:///{self.study_db.resolve()}"
        return stored

    def trial_dir(self, key: str) -> Path:
        return self.trials / key

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.meta, {"tool": TOOL, **meta})

    def read_meta(self) -> dict[str, Any]:
        """Read run.json; a directory that is not a stagebudget run is a clear error."""
        if not self.root.is_dir():
            raise RunError(f"{self.root}: no such run directory")
        if not self.meta.is_file():
            raise RunError(
                f"{self.root} is not a stagebudget run directory (no run.json); give the directory "
                "that `stagebudget search` created, e.g. runs/demo"
            )
        try:
            meta = read_json(self.meta)
        except UserError as exc:
            raise RunError(f"{exc}; the run description is damaged (restore run.json from a "
                           "backup, or start a new run)") from None
        if not isinstance(meta, dict) or meta.get("tool") != TOOL:
            raise RunError(f"{self.meta} was not written by stagebudget (tool={meta.get('tool')!r})"
                           if isinstance(meta, dict) else f"{self.meta} is not a run description")
        return meta

    def write_record(self, record: TrialRecord) -> None:
        atomic_write_json(self.trial_dir(record.key) / RECORD_FILE, record.to_dict())

    def read_record(self, key: str) -> TrialRecord | None:
        """The record of trial ``key``; None when it is missing, unreadable or corrupted."""
        return _read_record(self.trial_dir(key) / RECORD_FILE)

    def records(self) -> list[TrialRecord]:
        """All readable trial records; corrupted ones are skipped and reported by ``bad_records``."""
        out = []
        for path in sorted(self.trials.glob(f"*/{RECORD_FILE}")):
            record = _read_record(path)
            if record is not None:
                out.append(record)
        return out

    def bad_records(self) -> list[Path]:
        """Record files that cannot be read as a trial record (truncated, not JSON, wrong shape)."""
        return [p for p in sorted(self.trials.glob(f"*/{RECORD_FILE}")) if _read_record(p) is None]

    def curves(self, key: str) -> list[dict[str, Any]]:
        """Curve rows of one trial; a torn last line (killed mid-write) is ignored."""
        path = self.trial_dir(key) / "curves.jsonl"
        rows = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):  # a torn line can still parse, e.g. as a number
                    rows.append(row)
        return rows


def _read_record(path: Path) -> TrialRecord | None:
    """The record in ``path``, or None when it is unreadable or corrupted."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        record = TrialRecord.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(record.key, str) or not isinstance(record.params, dict):
        return None
    return record


def charged_hours(record: TrialRecord) -> float:
    """The device-hours a finished trial charged its search's budget: what it really trained
    (``spent_device_hours``, reused prefixes not counted), else its device-hours; a COMPLETE or
    PRUNED trial without either, its ledger's training so far; anything else nothing.

    >>> charged_hours(TrialRecord(key="a", params={}, schedule={}, status=COMPLETE,
    ...                           objectives={DEVICE_HOURS: 0.02}))
    0.02
    """
    for value in (record.ledger.get(SPENT_DEVICE_HOURS), record.objectives.get(DEVICE_HOURS)):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    value = record.ledger.get(DEVICE_HOURS)
    if record.status in (COMPLETE, PRUNED) and isinstance(value, int | float):
        return float(value)
    return 0.0


def planned_hours(record: TrialRecord) -> float | None:
    """The nominal (planned, load-free) device-hours of a trial's schedule: the record's
    ``planned_device_hours``, else (records written before it existed) the sum of its ledger's
    per-stage ``planned_seconds`` when the ledger covers every stage; else None.

    >>> planned_hours(TrialRecord(key="a", params={}, schedule={"stages": [{}]},
    ...                           ledger={"stages": [{"planned_seconds": 36.0}]}))
    0.01
    """
    value = record.planned_device_hours
    if _is_number(value):
        return float(value)
    stages = record.ledger.get("stages") if isinstance(record.ledger, dict) else None
    planned = [s.get("planned_seconds") for s in stages or () if isinstance(s, dict)]
    seconds = [float(p) for p in planned if _is_number(p)]
    wanted = (record.schedule or {}).get("stages") if isinstance(record.schedule, dict) else None
    if not seconds or len(seconds) != len(planned) or len(seconds) != len(wanted or ()):
        return None
    return sum(seconds) / SECONDS_PER_HOUR


def told_objectives(record: TrialRecord) -> dict[str, float]:
    """The objective values a finished trial tells the study: its objectives, with
    ``device_hours`` its schedule's planned cost (nominal, load-free: the cost model's, which
    the per-trial budget bounds), so a search that minimises it does not depend on machine
    load; the measured device-hours stay in the ledger and the record's objectives.

    >>> told_objectives(TrialRecord(key="a", params={}, schedule={}, planned_device_hours=0.01,
    ...                             objectives={DEVICE_HOURS: 0.013, "id_accuracy": 0.5}))
    {'device_hours': 0.01, 'id_accuracy': 0.5}
    """
    out = {k: float(v) for k, v in record.objectives.items() if _is_number(v)}
    planned = planned_hours(record)
    if DEVICE_HOURS in out and planned is not None:
        out[DEVICE_HOURS] = planned
    return out


def measured_hours(record: TrialRecord) -> float | None:
    """Measured training device-hours of the schedule trained alone (reused prefixes
    included): the objective, else the ledger's; None before anything was measured."""
    for value in (record.objectives.get(DEVICE_HOURS), record.ledger.get(DEVICE_HOURS)):
        if _is_number(value):
            return float(value)
    return None


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def spend_summary(records: list[TrialRecord]) -> dict[str, float]:
    """What a run's COMPLETE trials cost: ``nominal_device_hours`` (planned by the cost model,
    each schedule trained alone: what the per-trial budget limits; a record without a plan
    counts its measured hours), ``measured_device_hours`` (the same schedules timed),
    ``spent_device_hours`` (what was really trained, reused prefixes counted once) and
    ``saved_share`` (1 - spent / measured).

    >>> r = TrialRecord(key="a", params={}, schedule={}, status=COMPLETE, planned_device_hours=0.012,
    ...                 objectives={DEVICE_HOURS: 0.02}, ledger={SPENT_DEVICE_HOURS: 0.005})
    >>> s = spend_summary([r]); (s["nominal_device_hours"], s["saved_share"])
    (0.012, 0.75)
    """
    nominal = measured = spent = 0.0
    for record in records:
        if record.status != COMPLETE:
            continue
        timed = measured_hours(record) or 0.0
        planned = planned_hours(record)
        nominal += timed if planned is None else planned
        measured += timed
        spent += charged_hours(record)
    return {"nominal_device_hours": nominal, "measured_device_hours": measured,
            "spent_device_hours": spent,
            "saved_share": 1.0 - spent / measured if measured > 0 else 0.0}


def describe_spend(spend: dict[str, float]) -> str:
    """One line on a run's cost (:func:`spend_summary`), as status and the report print it.
    A summary saved by an older version (no ``measured_device_hours``) reads as before.

    >>> describe_spend({"nominal_device_hours": 0.1, "measured_device_hours": 0.12,
    ...                 "spent_device_hours": 0.048, "saved_share": 0.6})[-68:]
    '0.1200 measured, 0.0480 spent: 60% saved by reusing trained prefixes'
    """
    measured = spend.get("measured_device_hours")
    timed = f"{measured:.4f} measured, " if measured is not None else ""
    return (f"{spend['nominal_device_hours']:.4f} device-hours nominal (planned by the cost model, "
            f"each schedule trained alone), {timed}{spend['spent_device_hours']:.4f} spent: "
            f"{spend['saved_share']:.0%} saved by reusing trained prefixes")


# Exit statuses of ``stagebudget search`` beyond 0 (every trial that ran completed or was
# early-stopped), 2 (bad input, before any compute) and 130 (interrupted; ``--resume`` goes on).
SOME_TRIALS_FAILED_EXIT = 3  # the front is built from the trials that completed
ALL_TRIALS_FAILED_EXIT = 4  # trials ran and none completed: there is no front


@dataclass(frozen=True)
class SearchOutcome:
    """How a run's trials ended, read from its records: what ``search`` prints last and the
    exit status it ends with.

    >>> SearchOutcome(complete=0, pruned=0, failed=2, first_error="trial a: boom").exit_code
    4
    >>> SearchOutcome(complete=3, pruned=1, failed=1).line()
    'trials: 3 complete, 1 early-stopped, 1 failed (each error is in its trials/<key>/record.json)'
    """

    complete: int
    pruned: int
    failed: int
    first_error: str | None = None
    twins: int = 0  # COMPLETE, told a trained twin schedule's result: no training, no slot

    @classmethod
    def of(cls, records: list[TrialRecord]) -> SearchOutcome:
        failed = [r for r in records if r.status not in (COMPLETE, PRUNED, RUNNING)]
        first = next((f"trial {r.key}: {r.error}" for r in failed if r.error), None)
        twins = sum(r.status == COMPLETE and bool(r.reused_from) for r in records)
        return cls(complete=sum(r.status == COMPLETE for r in records) - twins,
                   pruned=sum(r.status == PRUNED for r in records),
                   failed=len(failed), first_error=first, twins=twins)

    @property
    def exit_code(self) -> int:
        if not self.failed:
            return 0
        return ALL_TRIALS_FAILED_EXIT if not self.complete + self.twins else SOME_TRIALS_FAILED_EXIT

    def line(self) -> str:
        twins = f" (+{self.twins} told a trained twin's result)" if self.twins else ""
        counts = (f"trials: {self.complete} complete{twins}, {self.pruned} early-stopped, "
                  f"{self.failed} failed")
        if not self.failed:
            return counts
        where = " (each error is in its trials/<key>/record.json)"
        if self.complete:
            return counts + where
        return (f"{counts}: every trial failed, no Pareto front{where}; the first: "
                f"{self.first_error or 'no error recorded'}")


def is_twin(trial: Any) -> bool:
    """An Optuna trial told the result of an earlier trial of the same schedule, never run."""
    return TWIN_ATTR in trial.user_attrs


def steps_ran(schedule: dict[str, Any], ledger: dict[str, Any]) -> list[tuple[str, int, int]]:
    """``(kind, steps done, steps planned)`` per stage: done from the ledger when it says,
    else the planned steps (a trial that reused a twin, or a fake)."""
    stages = schedule.get("stages") or [] if isinstance(schedule, dict) else []
    spent = ledger.get("stages") if isinstance(ledger, dict) else None
    spent = spent if isinstance(spent, list) else []
    out = []
    for i, stage in enumerate(stages):
        planned = int(stage.get("steps", 0))
        entry = spent[i] if i < len(spent) and isinstance(spent[i], dict) else {}
        done = entry.get("steps_done")
        out.append((str(stage.get("kind")), int(done) if isinstance(done, int) else planned,
                    planned))
    return out


def steps_text(steps: list[tuple[str, int, int]]) -> str:
    """``sft 40/40, rl 18/20`` (done/planned)."""
    return ", ".join(f"{kind} {done}/{planned}" for kind, done, planned in steps)


# What early stopping compared at a stage boundary, and where (see earlystop.StageGate).
COMPARED = (ID_ACCURACY, OOD_ACCURACY)  # objectives a boundary decision may compare
PLANNED = "planned_seconds"


def describe_pruned(info: dict[str, Any]) -> str:
    """One line for status and the study: ``pruned after stage 0 (sft, step 40): trial X had
    ID 0.810/OOD 0.400 vs 0.620/0.310 at 12.0 planned s (margin 2 SE, 3 compared)``. Fields a
    (hand-edited or older) record lacks are left out."""
    at, by = info.get("at") or {}, info.get("by") or {}
    short = {ID_ACCURACY: "ID", OOD_ACCURACY: "OOD"}
    names = [n for n in COMPARED if is_finite_number(at.get(n)) and is_finite_number(by.get(n))]
    text = (f"pruned after stage {info.get('stage_index', '?')} ({info.get('stage', '?')}, "
            f"step {info.get('step', '?')})")
    if info.get("dominated_by"):
        text += f": trial {info['dominated_by']}"
        if names:
            text += (" had " + "/".join(f"{short[n]} {by[n]:.3f}" for n in names) + " vs "
                     + "/".join(f"{at[n]:.3f}" for n in names))
        else:
            text += " was ahead"
    if is_finite_number(info.get(PLANNED)):
        text += f" at {info[PLANNED]:.1f} planned s"
    if is_finite_number(info.get("margin_se")):
        text += f" (margin {info['margin_se']:g} SE, {info.get('compared_with', '?')} compared)"
    return text


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
