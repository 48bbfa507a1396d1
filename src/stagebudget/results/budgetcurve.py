"""The budget curve: every evaluated checkpoint of a trial is a schedule, so one search also
answers "what would less budget buy?".

Stages train with a constant learning rate and a data order that does not depend on their
length, so the model at step k of a stage is exactly what the shorter schedule trains: the same
earlier stages, this stage cut at k (the prefix cache relies on the same fact). Every curve row
of a trial is therefore a **candidate**: a real, re-trainable schedule with measured ID/OOD (and
their standard errors) and a planned cost, the row's ``planned_seconds`` (the cost model's
budget point, load-free). For a budget fraction the **curve** holds the front of the candidates
that fit, its hypervolume with a standard error, and the best ID at an OOD floor and the best OOD
at an ID floor.

Which rows are candidates: every row after step 0 of every COMPLETE or PRUNED trial (a pruned
trial's rows were measured like any other). Step 0 of the first stage is the base model (no
schedule: a schedule has at least one stage); step 0 of a later stage repeats the previous
stage's end. Candidates with the same schedule (trials share prefixes) are one, the first by
trial number. Light: numpy and the schedule model only.

>>> curve = budget_curve(load_run("runs/demo"))  # doctest: +SKIP
>>> [round(p.hypervolume, 3) for p in curve.points]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from stagebudget.errors import UserError
from stagebudget.names import (
    COMPLETE,
    ID_ACCURACY,
    OOD_ACCURACY,
    PRUNED,
    SECONDS_PER_HOUR,
    STANDARD_ERROR_OF,
)
from stagebudget.pareto import FrontInfo, TrialPoint, compute_front
from stagebudget.prefixcache import NOT_TRAINING
from stagebudget.schedule import Schedule, identity

if TYPE_CHECKING:
    from stagebudget.results.run import Run, TrialView

# The curve's objectives: both accuracies, maximised, against (0, 0) as every accuracy front is.
CURVE_OBJECTIVES = (ID_ACCURACY, OOD_ACCURACY)
CURVE_DIRECTIONS = ("maximize", "maximize")
CURVE_REF = (0.0, 0.0)
DEFAULT_FRACTIONS = tuple(k / 8 for k in range(1, 9))  # 1/8 ... 1 of the per-trial budget
KEEP = 0.95  # "the smallest fraction that keeps 95% of the full-budget hypervolume"
FIT_TOLERANCE = 1e-9  # relative: a candidate planned at exactly the budget fits it


@dataclass(frozen=True)
class Candidate:
    """One evaluated checkpoint as a schedule: trial ``trial``'s stages up to ``stage_index``,
    that stage cut at ``step``. ``number`` is its index among the run's candidates (the front's
    point number); ``final`` marks a trial's own end."""

    number: int
    trial: int
    stage_index: int
    stage: str
    step: int
    final: bool
    schedule: dict[str, Any]
    values: dict[str, float]
    errors: dict[str, float]
    planned_hours: float
    label: str

    def point(self) -> TrialPoint:
        """The candidate as a front point over :data:`CURVE_OBJECTIVES`."""
        return TrialPoint(number=self.number, values=tuple(self.values[n] for n in CURVE_OBJECTIVES),
                          label=self.label, schedule=self.schedule, errors=self.errors,
                          planned_hours=self.planned_hours)


@dataclass(frozen=True)
class BudgetPoint:
    """The candidates that fit ``fraction`` of the per-trial budget (``hours``), and their front.

    ``hypervolume_se`` is the delta-method standard error of the hypervolume from the front
    points' standard errors (treated as independent; the front's membership is held fixed).
    ``best_id`` is the best-ID candidate with OOD at or above the OOD floor, ``best_ood`` the
    best-OOD one with ID at or above the ID floor (None: none fits)."""

    fraction: float
    hours: float
    fitting: int
    front: FrontInfo
    hypervolume_se: float
    best_id: Candidate | None
    best_ood: Candidate | None

    @property
    def hypervolume(self) -> float:
        return self.front.hypervolume


@dataclass(frozen=True)
class BudgetCurve:
    """The curve of a run: candidates, floors and one :class:`BudgetPoint` per fraction."""

    per_trial_hours: float
    candidates: list[Candidate]
    points: list[BudgetPoint]
    id_floor: float
    ood_floor: float
    floors_from: str  # "the base model" or "given"
    trial_hypervolume: float | None = None  # the trials' own front (their ends only)

    @cached_property
    def by_number(self) -> dict[int, Candidate]:
        """The candidates by their number (a front's point numbers)."""
        return {c.number: c for c in self.candidates}

    @property
    def full(self) -> BudgetPoint:
        """The point at the largest fraction (1: the whole per-trial budget, by default)."""
        return max(self.points, key=lambda p: p.fraction)

    def smallest_fraction_keeping(self, share: float = KEEP) -> float | None:
        """The smallest fraction whose hypervolume is at least ``share`` of the full budget's."""
        target = share * self.full.hypervolume
        fitting = [p.fraction for p in self.points if p.hypervolume >= target - 1e-12]
        return min(fitting) if fitting and self.full.hypervolume > 0 else None


def cut_schedule(schedule: Schedule, stage_index: int, step: int) -> Schedule:
    """``schedule``'s stages up to ``stage_index``, that stage trained for ``step`` steps.

    >>> from stagebudget.schedule import StageSpec
    >>> s = Schedule(stages=(StageSpec(kind="sft", steps=40), StageSpec(kind="rl", steps=30)))
    >>> cut_schedule(s, 1, 10).describe()
    'sft 40@r8 -> rl 10@r8'
    """
    stages = schedule.stages
    if not 0 <= stage_index < len(stages) or not 1 <= step <= stages[stage_index].steps:
        raise ValueError(f"no step {step} in stage {stage_index} of {schedule.describe()}")
    cut = stages[stage_index].model_copy(update={"steps": step})
    return schedule.model_copy(update={"stages": (*stages[:stage_index], cut)})


def checkpoint_candidates(views: Iterable[TrialView]) -> list[Candidate]:
    """Every evaluated checkpoint of the COMPLETE and PRUNED trials among ``views`` as a
    :class:`Candidate` (rows without both accuracies or a planned budget point are skipped:
    runs made before rows had ``planned_seconds`` have none)."""
    seen: set[str] = set()
    out: list[Candidate] = []
    for view in sorted((v for v in views if v.state in (COMPLETE, PRUNED)
                        and v.number is not None and v.schedule is not None),
                       key=lambda v: v.number or 0):
        assert view.schedule is not None and view.number is not None
        rows = _checkpoint_rows(view.curves(), view.schedule)
        for i, row in enumerate(rows):
            cut = cut_schedule(view.schedule, int(row["stage_index"]), int(row["step"]))
            final = view.state == COMPLETE and i == len(rows) - 1
            if not final:
                cut = cut.model_copy(update={"name": None})
            data = cut.to_dict()
            key = trained_identity(data)
            if key in seen:
                continue
            seen.add(key)
            out.append(Candidate(
                number=len(out), trial=view.number, stage_index=int(row["stage_index"]),
                stage=str(row["stage"]), step=int(row["step"]), final=final, schedule=data,
                values={n: float(row[n]) for n in CURVE_OBJECTIVES},
                errors={n: float(row[se]) for n, se in STANDARD_ERROR_OF.items()
                        if isinstance(row.get(se), int | float)},
                planned_hours=float(row["planned_seconds"]) / SECONDS_PER_HOUR,
                label=cut.describe(view.label_fields)))
    return out


def trained_identity(schedule: dict[str, Any]) -> str:
    """:func:`~stagebudget.schedule.identity` without the settings that decide only when a
    stage is measured (:data:`~stagebudget.prefixcache.NOT_TRAINING`): two trials that measured
    the same trained model at different intervals give one candidate."""
    stages = [{k: v for k, v in s.items() if k not in NOT_TRAINING} for s in schedule["stages"]]
    return identity({**schedule, "stages": stages})


def _checkpoint_rows(rows: Sequence[dict[str, Any]], schedule: Schedule) -> list[dict[str, Any]]:
    """A trial's curve rows that are checkpoints of ``schedule``: after step 0, inside the
    stage's planned steps, with both accuracies and a planned budget point; one per point."""
    by_point: dict[tuple[int, int], dict[str, Any]] = {}
    for row in rows:
        index, step = row.get("stage_index"), row.get("step")
        if not (isinstance(index, int) and isinstance(step, int) and step > 0
                and index < len(schedule.stages) and step <= schedule.stages[index].steps):
            continue
        if all(_finite(row.get(k)) for k in (*CURVE_OBJECTIVES, "planned_seconds")):
            by_point[(index, step)] = dict(row)
    return [by_point[k] for k in sorted(by_point)]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def hypervolume_se(front: FrontInfo) -> float:
    """Delta-method standard error of a 2-objective (maximised) front's hypervolume.

    With the front sorted by the first objective ascending (so the second descends), the
    hypervolume is ``sum_i (x_i - x_{i-1}) (y_i - r_y)`` (``x_0 = r_x``); its derivatives are
    ``y_i - y_{i+1}`` in ``x_i`` and ``x_i - x_{i-1}`` in ``y_i`` (``y_{m+1} = r_y``). Points
    without a standard error add nothing.
    """
    pts = sorted((front.points[n] for n in front.front), key=lambda p: p.values[0])
    if not pts or len(front.objective_names) != 2:
        return 0.0
    rx, ry = front.ref_point
    xs = [p.values[0] for p in pts]
    ys = [p.values[1] for p in pts]
    var = 0.0
    for i, p in enumerate(pts):
        dx = ys[i] - (ys[i + 1] if i + 1 < len(pts) else ry)
        dy = xs[i] - (xs[i - 1] if i > 0 else rx)
        sx = p.errors.get(front.objective_names[0], 0.0)
        sy = p.errors.get(front.objective_names[1], 0.0)
        var += (dx * sx) ** 2 + (dy * sy) ** 2
    return float(np.sqrt(var))


def fits(candidate: Candidate, hours: float) -> bool:
    """Whether ``candidate``'s planned cost is within ``hours``."""
    return candidate.planned_hours <= hours * (1 + FIT_TOLERANCE)


def budget_point(candidates: Sequence[Candidate], fraction: float, per_trial_hours: float,
                 id_floor: float, ood_floor: float) -> BudgetPoint:
    """The front of the candidates that fit ``fraction`` of ``per_trial_hours``."""
    hours = fraction * per_trial_hours
    fitting = [c for c in candidates if fits(c, hours)]
    front = compute_front([c.point() for c in fitting], CURVE_OBJECTIVES, CURVE_DIRECTIONS,
                          ref_point=CURVE_REF)
    return BudgetPoint(
        fraction=fraction, hours=hours, fitting=len(fitting), front=front,
        hypervolume_se=hypervolume_se(front),
        best_id=_best(fitting, ID_ACCURACY, OOD_ACCURACY, ood_floor),
        best_ood=_best(fitting, OOD_ACCURACY, ID_ACCURACY, id_floor))


def _best(candidates: Sequence[Candidate], name: str, floor_name: str,
          floor: float) -> Candidate | None:
    """Best ``name`` among the candidates whose ``floor_name`` is at least ``floor`` (ties: the
    other objective, then the cheaper, then the earlier)."""
    eligible = [c for c in candidates if c.values[floor_name] >= floor - 1e-12]
    return max(eligible, key=lambda c: (c.values[name], c.values[floor_name], -c.planned_hours,
                                        -c.number), default=None)


def budget_curve(run: Run, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 id_floor: float | None = None, ood_floor: float | None = None,
                 views: list[TrialView] | None = None) -> BudgetCurve | None:
    """The budget curve of ``run`` (None when it has no per-trial budget or no candidate yet).

    Floors default to the scores of the knee of the full budget's candidate front: "with this
    fraction, the best ID that keeps the OOD of the schedule the full budget recommends", and
    the other way round. (The base model's scores were tried first and dropped: on the demo no
    candidate keeps the base's OOD, so the column said nothing.)
    """
    check_fractions(fractions)
    budget = run.per_trial_hours
    views = run.trials() if views is None else views
    candidates = checkpoint_candidates(views)
    if budget is None or not candidates:
        return None
    knee = _knee(candidates, budget)
    given = id_floor is not None or ood_floor is not None
    knee_values = knee.values if knee is not None else dict.fromkeys(CURVE_OBJECTIVES, 0.0)
    floors = (knee_values[ID_ACCURACY] if id_floor is None else id_floor,
              knee_values[OOD_ACCURACY] if ood_floor is None else ood_floor)
    points = [budget_point(candidates, f, budget, *floors) for f in sorted(fractions)]
    ends = [c.point() for c in candidates if c.final]
    trial_hv = compute_front(ends, CURVE_OBJECTIVES, CURVE_DIRECTIONS,
                             ref_point=CURVE_REF).hypervolume if ends else None
    return BudgetCurve(per_trial_hours=budget, candidates=candidates, points=points,
                       id_floor=floors[0], ood_floor=floors[1],
                       floors_from="given" if given else (f"the full budget's knee ({knee.label})"
                                                          if knee is not None else "none"),
                       trial_hypervolume=trial_hv)


def _knee(candidates: Sequence[Candidate], per_trial_hours: float) -> Candidate | None:
    """The knee of the front of every candidate within the whole per-trial budget."""
    front = budget_point(candidates, 1.0, per_trial_hours, 0.0, 0.0).front
    by_number = {c.number: c for c in candidates}
    return by_number[front.knee] if front.knee is not None else None


def fraction_text(fraction: float) -> str:
    """``1/4`` for eighths, else the number (``0.3``).

    >>> fraction_text(0.25), fraction_text(1.0), fraction_text(0.3)
    ('1/4', '1', '0.3')
    """
    eighths = fraction * 8
    if abs(eighths - round(eighths)) > 1e-9:
        return f"{fraction:g}"
    from fractions import Fraction

    return str(Fraction(round(eighths), 8)) if eighths < 8 - 1e-9 else "1"


def check_fractions(fractions: Sequence[float]) -> None:
    """Budget fractions must be in (0, 1]: a :class:`UserError` naming the bad one otherwise."""
    if not fractions:
        raise UserError("give at least one budget fraction, e.g. 0.25 0.5 1")
    for f in fractions:
        if not (_finite(f) and 0 < f <= 1):
            raise UserError(f"budget fraction {f!r} is not in (0, 1]; fractions are of the "
                            "per-trial budget, e.g. 0.25 for a quarter")


def parse_budget(text: str, per_trial_hours: float | None) -> float:
    """Device-hours that ``--max-budget TEXT`` allows: a fraction of the per-trial budget
    (``0.5``, ``1/4``, ``50%``) or device-hours with an ``h`` suffix (``0.006h``)."""
    raw = text.strip().lower()
    allowed = ("a fraction of the per-trial budget in (0, 1] (0.5, 1/4 or 50%) or device-hours "
               "with an h suffix (0.006h)")
    try:
        if raw.endswith("h"):
            hours = float(raw[:-1])
            if not (math.isfinite(hours) and hours > 0):
                raise ValueError
            return hours
        if raw.endswith("%"):
            fraction = float(raw[:-1]) / 100
        elif "/" in raw:
            num, _, den = raw.partition("/")
            fraction = float(num) / float(den)
        else:
            fraction = float(raw)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--max-budget {text!r} is not a budget; give {allowed}") from None
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise UserError(f"--max-budget {text!r} is not in (0, 1] of the per-trial budget; give "
                        f"{allowed}")
    if per_trial_hours is None:
        raise UserError(f"--max-budget {text!r} is a fraction, but this run records no per-trial "
                        "budget; give device-hours instead (e.g. 0.006h)")
    return fraction * per_trial_hours
