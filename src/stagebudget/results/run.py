"""Read a run directory: the Optuna study (objectives, the front) joined with the trial records.

The study is the source of truth for objective values; records add schedules, curves, ledgers
and errors. A record joins its Optuna trial by params (identical params give an identical
schedule), matched in order. Everything here works on a half-finished run. Optuna is imported
only when a run is loaded, so importing this module stays light.

>>> run = load_run("runs/demo")  # doctest: +SKIP
>>> run.front().front  # doctest: +SKIP
[3, 0, 5]
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from stagebudget.errors import ConfigError, RunError, UserError
from stagebudget.fileio import read_yaml
from stagebudget.kinds import IMITATION, get_kind, kinds_with_role
from stagebudget.names import (
    COMPLETE,
    DEVICE_HOURS,
    ERROR_ATTR,
    FAILED,
    ID_ACCURACY,
    OOD_ACCURACY,
    PRUNED,
    PRUNED_ATTR,
    RUNNING,
    SECONDS_PER_HOUR,
    SPENT_DEVICE_HOURS,
    STANDARD_ERROR_OF,
    TUNE_ID_ATTR,
    TWINS,
    WAITING,
)
from stagebudget.pareto import FrontInfo, TrialPoint, compute_front, curve_series
from stagebudget.rundir import RunDir, TrialRecord, describe_pruned, steps_ran
from stagebudget.rundir import planned_hours as record_planned_hours
from stagebudget.schedule import Schedule, label_fields
from stagebudget.space.schema import resolve_rest
from stagebudget.studystore import open_storage, redact, study_storage_url

STATES = (COMPLETE, RUNNING, WAITING, PRUNED, FAILED)


@dataclass(frozen=True)
class TrialView:
    """One trial as stagebudget shows it: Optuna's state and values plus its record (if any).

    ``number`` is the Optuna trial number; it is None only for a record that matches no Optuna
    trial. ``values`` maps objective names to values (complete trials only).
    """

    number: int | None
    state: str
    params: dict[str, Any]
    values: dict[str, float]
    record: TrialRecord | None
    run_dir: RunDir
    attrs: dict[str, Any] = field(default_factory=dict)
    # The settings the label shows beside steps and ranks: those that differ between the run's
    # trials (see stagebudget.schedule.label_fields); set by Run.trials.
    label_fields: frozenset[str] = frozenset()

    def _record_or_attr(self, field_name: str, attr: str) -> str | None:
        """A record field when the record has it, else the Optuna trial's attribute."""
        value = getattr(self.record, field_name, None) if self.record is not None else None
        value = value or self.attrs.get(attr)
        return str(value) if value else None

    @property
    def reference(self) -> str | None:
        """``sft_only``, ``rl_only``, ``heuristic`` or None for a sampled trial."""
        return self._record_or_attr("reference", "reference")

    @cached_property
    def schedule(self) -> Schedule | None:
        """The trained schedule, from the record; None without a (valid) record."""
        if self.record is None or not self.record.schedule:
            return None
        try:
            return Schedule.from_dict(self.record.schedule)
        except ConfigError:
            return None

    @property
    def stage_shares(self) -> dict[str, float]:
        """Budget share per stage kind, from the params; the one stage without a share param
        (``share: rest``) gets what is left (:func:`~stagebudget.space.schema.resolve_rest`). Empty
        when the run allocates steps, not shares."""
        shares: dict[str, Any] = {k.split(".")[0]: float(v) for k, v in self.params.items()
                                  if k.endswith(".share") and isinstance(v, int | float)}
        if not shares:
            return {}
        for kind in (s.kind for s in self.schedule.stages) if self.schedule else ():
            shares.setdefault(kind, None)
        return resolve_rest(shares)

    @property
    def sft_share(self) -> float | None:
        """Share of the budget given to SFT: to the stages whose kind has the imitation role
        (sft's; 0 when the schedule has none)."""
        shares = self.stage_shares
        if shares:
            return sum((shares.get(k, 0.0) for k in kinds_with_role(IMITATION)), 0.0)
        if self.schedule is not None and len(self.schedule.stages) == 1:
            return 1.0 if get_kind(self.schedule.stages[0].kind).role == IMITATION else 0.0
        return None

    @property
    def device_hours(self) -> float | None:
        """Training device-hours measured (timed) for the schedule alone: the record's
        objectives or ledger. (A searched ``device_hours`` objective is the planned cost, see
        :func:`~stagebudget.rundir.told_objectives`; it is the study value only without a
        record.)"""
        if self.record is None:
            return self.values.get(DEVICE_HOURS)
        if isinstance(self.record.objectives.get(DEVICE_HOURS), int | float):
            return float(self.record.objectives[DEVICE_HOURS])
        return ledger_hours(self.record.ledger)

    @property
    def planned_hours(self) -> float | None:
        """The nominal cost: device-hours the cost model planned for the schedule (load-free,
        what the per-trial budget limits); None for a record that never held a plan."""
        return record_planned_hours(self.record) if self.record is not None else None

    @property
    def measured_seconds(self) -> float | None:
        """Measured training device-seconds of the schedule trained alone (``device_hours``,
        timed: a busy machine makes it larger than planned)."""
        hours = self.device_hours
        return None if hours is None else hours * SECONDS_PER_HOUR

    @property
    def spent_hours(self) -> float | None:
        """Device-hours this trial really trained (less than ``device_hours`` when it started
        from a cached prefix or reused a finished twin)."""
        if self.record is None:
            return None
        value = self.record.ledger.get(SPENT_DEVICE_HOURS)
        return float(value) if isinstance(value, int | float) else self.device_hours

    @property
    def error(self) -> str | None:
        """The record's error, else the study's (``error``, as stagebudget sets it; else
        Optuna's ``fail_reason``)."""
        return self._record_or_attr("error", ERROR_ATTR) or self._record_or_attr("error",
                                                                                 "fail_reason")

    @property
    def pruned(self) -> str | None:
        """Where and why early stopping stopped a PRUNED trial (record first, then the study)."""
        if self.record is not None and self.record.pruned:
            return describe_pruned(self.record.pruned)
        value = self.attrs.get(PRUNED_ATTR)
        return str(value) if value else None

    @property
    def note(self) -> str | None:
        """The line ``status`` shows beside a trial: why it stopped (pruned), else its error."""
        text = (self.pruned if self.state == PRUNED else None) or self.error
        return text.strip().splitlines()[0] if text and text.strip() else None

    @property
    def label(self) -> str:
        """Short schedule summary, e.g. ``sft 40@r32 lr=1e-3 -> rl 20@r4``: steps and ranks,
        plus every setting in which the run's trials differ (``label_fields``)."""
        if self.schedule is not None:
            return self.schedule.describe(self.label_fields)
        return ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))

    @property
    def errors(self) -> dict[str, float]:
        """Standard errors of the objectives that have one (record first, then the study's
        trial attributes); empty for runs made before they were measured."""
        out = {}
        objectives = self.record.objectives if self.record is not None else {}
        for name, se_name in STANDARD_ERROR_OF.items():
            value = objectives.get(se_name, self.attrs.get(se_name))
            if isinstance(value, int | float) and math.isfinite(float(value)):
                out[name] = float(value)
        return out

    @property
    def steps_ran(self) -> tuple[tuple[str, int, int], ...]:
        """``(kind, steps done, steps planned)`` per stage (empty without a record)."""
        if self.record is None:
            return ()
        return tuple(steps_ran(self.record.schedule, self.record.ledger))

    def curves(self) -> list[dict[str, Any]]:
        """Curve rows (read now, so a running trial shows its latest)."""
        return self.run_dir.curves(self.record.key) if self.record is not None else []


@dataclass(frozen=True)
class StatusRow:
    """One line of ``stagebudget status`` (and one trial of ``status --json``).

    ``schedule`` is the label as the table shows it (with ``(reused KEY)``); ``label`` the bare
    label. Costs: ``planned_hours`` is the nominal (cost-model) cost, ``measured_seconds`` the
    timed training of the schedule alone, ``spent_hours`` what this trial really trained.
    """

    number: int | None
    state: str
    reference: str | None
    schedule: str
    sft_share: float | None
    id_accuracy: float | None
    ood_accuracy: float | None
    device_hours: float | None
    on_front: bool
    knee: bool
    error: str | None
    id_se: float | None = None
    ood_se: float | None = None
    spent_hours: float | None = None
    planned_hours: float | None = None
    measured_seconds: float | None = None
    key: str | None = None
    label: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    stages: tuple[dict[str, Any], ...] = ()
    values: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    reused_from: str | None = None


def ledger_hours(ledger: dict[str, Any]) -> float | None:
    """Training device-hours of a ledger (``device_hours``, as ``BudgetClock.ledger`` writes it).

    >>> ledger_hours({"device_hours": 0.5, "stages": []})
    0.5
    """
    value = ledger.get("device_hours") if isinstance(ledger, dict) else None
    return float(value) if isinstance(value, int | float) else None


class Run:
    """A loaded run: its directory, run.json, and the open Optuna study."""

    def __init__(self, root: Path, meta: dict[str, Any], study: Any):
        self.dir = RunDir(Path(root))
        self.meta = meta
        self.study = study
        self.objectives = _objectives(meta, self.dir.meta)
        if len(study.directions) != len(self.objectives):
            raise RunError(
                f"{self.dir.meta} lists {len(self.objectives)} objectives but the study "
                f"{study.study_name!r} has {len(study.directions)}; the run description and the "
                "study do not belong together"
            )

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.dir.root.name)

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.objectives)

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(d for _, d in self.objectives)

    @property
    def budget_hours(self) -> float | None:
        """:attr:`per_trial_hours` by its earlier name."""
        return self.per_trial_hours

    @property
    def per_trial_hours(self) -> float | None:
        """Per-trial budget in device-hours: run.json, else (older runs) the run's space.yaml."""
        value = self.meta.get("per_trial_hours")
        if isinstance(value, int | float):
            return float(value)
        try:
            value = read_yaml(self.dir.space)["budget"]["per_trial_hours"]
        except (ConfigError, KeyError, TypeError):
            return None
        return float(value) if isinstance(value, int | float) else None

    def trials(self) -> list[TrialView]:
        """All Optuna trials (by number) joined with their records, then unmatched records."""
        trials = sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number)
        records = _ordered_records(self.dir.records())
        pool: dict[str, deque[TrialRecord]] = defaultdict(deque)
        for rec in records:
            pool[params_key(rec.params)].append(rec)
        # The Ray trial id joins a trial to its record; params join only records no trial
        # names (a trial cut before it started and its retry share params, not a record).
        by_key = {rec.key: rec for rec in records}
        claimed = {str(t.user_attrs.get(TUNE_ID_ATTR)) for t in trials} & by_key.keys()
        taken: set[str] = set()
        names = self.objective_names
        views = []
        for t in trials:
            tune_id = str(t.user_attrs.get(TUNE_ID_ATTR))
            record = by_key.get(tune_id)
            if record is None:
                queue = pool.get(params_key(t.params)) or deque()
                record = next((r for r in queue
                               if r.key not in claimed and r.key not in taken), None)
            if record is not None:
                taken.add(record.key)
            values = dict(zip(names, t.values, strict=True)) if t.values is not None else {}
            attrs = {**t.system_attrs, **t.user_attrs}
            state = FAILED if t.state.name == "FAIL" else t.state.name  # as records spell it
            views.append(TrialView(t.number, state, dict(t.params), values, record,
                                   self.dir, attrs))
        for queue in pool.values():
            views.extend(TrialView(None, rec.status, dict(rec.params), {}, rec, self.dir)
                         for rec in queue if rec.key not in taken)
        fields = label_fields((v.schedule for v in views),
                              searched={k for v in views for k in v.params})
        return [replace(v, label_fields=fields) for v in views]

    def front(self, ref_point: tuple[float, ...] | None = None, curves: bool = True,
              views: list[TrialView] | None = None) -> FrontInfo:
        """The Pareto front of the completed trials (see :func:`stagebudget.pareto.compute_front`),
        with the front trials' curves when ``curves`` is true. ``views``: the run's
        :meth:`trials`, when the caller has already joined them (one snapshot of the run)."""
        views = self.trials() if views is None else views
        points = [_point(v, self.objective_names) for v in views]
        counts = {s: sum(v.state == s for v in views) for s in STATES}
        counts["total"] = len(views)
        # COMPLETE trials that took no trial slot: told the result of a trained twin schedule
        counts[TWINS] = sum(v.state == COMPLETE and v.record is not None
                            and bool(v.record.reused_from) for v in views)
        info = compute_front([p for p in points if p is not None], self.objective_names,
                             self.directions, ref_point=ref_point, counts=counts)
        if curves:  # the front's and the reference schedules'
            by_number = {v.number: v for v in views if v.number is not None}
            for number in dict.fromkeys([*info.front, *info.references.values()]):
                info.curves[number] = curve_series(number, by_number[number].curves())
        return info

    def status_rows(self, front: FrontInfo | None = None) -> list[StatusRow]:
        """One row per trial (Optuna order, then records without a trial) for ``status``."""
        front = front or self.front(curves=False)
        on_front = set(front.front)
        return [
            StatusRow(
                number=v.number, state=v.state, reference=v.reference,
                schedule=v.label + (f" (reused {v.record.reused_from})"
                                    if v.record is not None and v.record.reused_from else ""),
                sft_share=v.sft_share, id_accuracy=v.values.get(ID_ACCURACY),
                ood_accuracy=v.values.get(OOD_ACCURACY), device_hours=v.device_hours,
                on_front=v.number in on_front, knee=v.number is not None and v.number == front.knee,
                error=v.note,
                id_se=_se(v, ID_ACCURACY), ood_se=_se(v, OOD_ACCURACY),
                spent_hours=v.spent_hours, planned_hours=v.planned_hours,
                measured_seconds=v.measured_seconds,
                key=v.record.key if v.record is not None else None, label=v.label,
                params=dict(v.params),
                stages=tuple(v.schedule.to_dict()["stages"]) if v.schedule is not None else (),
                values=dict(v.values), errors=v.errors,
                reused_from=v.record.reused_from if v.record is not None else None,
            )
            for v in self.trials()
        ]


def _se(view: Any, objective: str) -> float | None:
    """The standard error a trial's record holds for ``objective`` (None for older runs)."""
    objectives = view.record.objectives if view.record is not None else {}
    value = objectives.get(STANDARD_ERROR_OF[objective])
    return float(value) if isinstance(value, int | float) else None


def load_run(path: str | Path) -> Run:
    """Open a run directory: validate run.json, then load its Optuna study (read only)."""
    run_dir = RunDir(Path(path))
    meta = run_dir.read_meta()
    study_name = meta.get("study_name")
    if not isinstance(study_name, str) or not study_name:
        raise RunError(f"{run_dir.meta} has no `study_name`; the run description is incomplete")
    url = study_storage_url(meta.get("storage"), run_dir)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = open_storage(url, create=False)  # the code that wrote the study reads it
    except UserError as exc:
        raise RunError(f"{exc} (the study of {run_dir.meta})") from None
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise RunError(
            f"study {study_name!r} (from {run_dir.meta}) is not in {redact(url)}; studies there: "
            f"{', '.join(map(repr, names)) or 'none'}"
        ) from None
    except Exception as exc:  # storage back-ends raise many types; say which storage failed
        raise RunError(f"cannot open the study storage {redact(url)}: {exc}") from None
    return Run(run_dir.root, meta, study)


def params_key(params: dict[str, Any]) -> str:
    """Canonical text of params, so 32 and 32.0, or float noise, still join."""
    def canon(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return v
        return round(float(v), 10)

    return json.dumps({k: canon(v) for k, v in params.items()}, sort_keys=True, default=str)


def _ordered_records(records: list[TrialRecord]) -> list[TrialRecord]:
    return sorted(records, key=lambda r: (r.started is None, r.started or 0.0, r.key))


def _objectives(meta: dict[str, Any], source: Path) -> list[tuple[str, str]]:
    objs = meta.get("objectives")
    if not isinstance(objs, list) or not objs:
        raise RunError(f"{source} has no `objectives` list (name and direction of each)")
    out = []
    for o in objs:
        if not isinstance(o, dict) or o.get("direction") not in ("maximize", "minimize"):
            raise RunError(f"{source}: each objective needs a name and a direction "
                           f"('maximize' or 'minimize'), got {o!r}")
        out.append((str(o.get("name")), str(o["direction"])))
    return out


def _point(view: TrialView, names: tuple[str, ...]) -> TrialPoint | None:
    """A completed trial with finite values for every objective, as a front point."""
    if view.state != COMPLETE or view.number is None:
        return None
    values = tuple(view.values.get(n, math.nan) for n in names)
    if not all(math.isfinite(v) for v in values):
        return None
    return TrialPoint(
        number=view.number, values=values, reference=view.reference, sft_share=view.sft_share,
        label=view.label, schedule=view.record.schedule if view.record else None,
        stage_shares=view.stage_shares, errors=view.errors, steps=view.steps_ran,
        device_hours=view.device_hours, planned_hours=view.planned_hours,
        params=dict(view.params),
    )
