"""Pareto fronts, hypervolume and the knee: computed once, as plain objects, for plots to draw.

Light on purpose (numpy and the schedule model, no plotly/optuna): ``stagebudget status`` and
``export`` use it.

>>> non_dominated([(0.9, 0.2), (0.5, 0.5), (0.4, 0.4)], ["maximize", "maximize"])
[0, 1]
>>> hypervolume([(0.5, 0.5)], ref=(0.0, 0.0), directions=["maximize", "maximize"])
0.25
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stagebudget.names import ID_ACCURACY, OOD_ACCURACY
from stagebudget.schedule import identity

DIRECTIONS = ("maximize", "minimize")
PointsLike = Sequence[Sequence[float]] | np.ndarray


@dataclass(frozen=True)
class TrialPoint:
    """One completed trial as the front sees it: its objective values plus what labels it.

    ``errors`` maps objective names to standard errors (only those measured); ``steps`` is
    ``(kind, steps done, steps planned)`` per stage; ``params`` are the sampled params.
    """

    number: int
    values: tuple[float, ...]
    reference: str | None = None
    sft_share: float | None = None
    label: str = ""
    schedule: Mapping[str, Any] | None = None
    stage_shares: Mapping[str, float] = field(default_factory=dict)
    errors: Mapping[str, float] = field(default_factory=dict)
    steps: tuple[tuple[str, int, int], ...] = ()
    device_hours: float | None = None  # measured (timed) training of the schedule alone
    planned_hours: float | None = None  # nominal: what the cost model planned (load-free)
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CurveSeries:
    """One trial's ID/OOD curves on a single x axis, with the x of each stage boundary."""

    number: int
    x: list[float]
    x_label: str
    id_accuracy: list[float | None]
    ood_accuracy: list[float | None]
    stages: list[str]
    boundaries: list[tuple[float, str]]


@dataclass(frozen=True)
class FrontInfo:
    """Everything a front plot, table or export needs; nothing is computed after this.

    ``front`` lists non-dominated trial numbers sorted by the first objective; ``hv_history``
    pairs a count of completed trials (in trial-number order) with the hypervolume of those.
    ``twins`` maps a trial that repeats an earlier trial's schedule to that trial: it stays in
    ``points`` (it is a completed trial) but is on neither ``front`` nor ``dominated``, and adds
    no step to ``hv_history``, so each distinct schedule is shown once.
    """

    objective_names: tuple[str, ...]
    directions: tuple[str, ...]
    points: dict[int, TrialPoint]
    front: list[int]
    dominated: list[int]
    references: dict[str, int]
    ref_point: tuple[float, ...]
    hypervolume: float
    hv_history: list[tuple[int, float]]
    knee: int | None
    counts: dict[str, int] = field(default_factory=dict)
    curves: dict[int, CurveSeries] = field(default_factory=dict)
    twins: dict[int, int] = field(default_factory=dict)

    def value(self, number: int, name: str) -> float:
        """Objective ``name`` of trial ``number``."""
        return self.points[number].values[self.objective_names.index(name)]

    @property
    def empty(self) -> bool:
        return not self.points


@dataclass(frozen=True)
class StageCell:
    """One stage of a front row: steps that ran against those planned, LoRA rank (None: full
    fine-tuning), learning rate and budget share (None when unknown)."""

    kind: str
    steps_done: int | None
    steps_planned: int | None
    lora_rank: int | None
    learning_rate: float
    share: float | None


@dataclass(frozen=True)
class FrontRow:
    """One trial of the front as every front table shows it (``status``, the report, the live
    panel); the tables only format these.

    ``objectives`` is ``(name, value, standard error or None)`` per objective, in the front's
    objective order; ``tags`` are ``"knee"`` and the reference name, those that apply.
    """

    number: int
    objectives: tuple[tuple[str, float, float | None], ...]
    tags: tuple[str, ...]
    reference: str | None
    label: str
    sft_share: float | None
    params: Mapping[str, Any]
    stages: tuple[StageCell, ...]
    planned_hours: float | None
    device_hours: float | None


def front_rows(front: FrontInfo) -> list[FrontRow]:
    """The front's trials (in front order) as table rows.

    >>> info = compute_front([TrialPoint(0, (0.5, 0.5), reference="heuristic")], ["a", "b"],
    ...                      ["maximize", "maximize"])
    >>> front_rows(info)[0].tags
    ('knee', 'heuristic')
    """
    rows = []
    for number in front.front:
        p = front.points[number]
        rows.append(FrontRow(
            number=number,
            objectives=tuple((name, value, p.errors.get(name))
                             for name, value in zip(front.objective_names, p.values, strict=True)),
            tags=tuple(t for t in ("knee" if number == front.knee else "", p.reference or "") if t),
            reference=p.reference, label=p.label, sft_share=p.sft_share, params=p.params,
            stages=_stage_cells(p), planned_hours=p.planned_hours, device_hours=p.device_hours,
        ))
    return rows


def _stage_cells(p: TrialPoint) -> tuple[StageCell, ...]:
    """Each stage of ``p``'s schedule: steps that ran (the planned steps when unrecorded),
    rank, learning rate and share."""
    ran = {i: (done, planned) for i, (_, done, planned) in enumerate(p.steps)}
    cells = []
    for i, st in enumerate((p.schedule or {}).get("stages", [])):
        kind = str(st.get("kind"))
        done, planned = ran.get(i, (st.get("steps"), st.get("steps")))
        cells.append(StageCell(kind=kind, steps_done=done, steps_planned=planned,
                               lora_rank=st.get("lora_rank") or None,
                               learning_rate=st.get("learning_rate", 0),
                               share=p.stage_shares.get(kind)))
    return tuple(cells)


def _as_min(points: Any, directions: Sequence[str]) -> np.ndarray:
    """Points as a float matrix in minimisation form (maximised columns negated)."""
    arr = np.asarray(points, dtype=float)
    if arr.ndim != 2:
        arr = arr.reshape(len(arr), -1) if arr.size else np.zeros((0, len(directions)))
    if arr.shape[1] != len(directions):
        raise ValueError(
            f"each point needs one value per direction ({len(directions)}), got {arr.shape[1]}"
        )
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {d!r}")
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return arr * sign


def non_dominated(points: PointsLike, directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (ties kept: equal points are both kept).

    A point dominates another when it is at least as good in every objective and strictly
    better in one.
    """
    arr = _as_min(points, directions)
    keep = []
    for i in range(len(arr)):
        better_eq = np.all(arr <= arr[i], axis=1)
        strictly = np.any(arr < arr[i], axis=1)
        if not np.any(better_eq & strictly):
            keep.append(i)
    return keep


def _hv_min(arr: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of minimisation points (all strictly better than ``ref``) by slicing."""
    if len(arr) == 0:
        return 0.0
    if arr.shape[1] == 1:
        return float(ref[0] - arr[:, 0].min())
    if arr.shape[1] == 2:
        order = np.lexsort((arr[:, 1], arr[:, 0]))
        total, best_y = 0.0, ref[1]
        for x, y in arr[order]:
            if y < best_y:
                total += (ref[0] - x) * (best_y - y)
                best_y = y
        return float(total)
    # Sweep the last axis: between consecutive levels the dominated slab is the (d-1)-volume of
    # the points at or below that level.
    last = arr[:, -1]
    levels = np.unique(last)
    total = 0.0
    for k, z in enumerate(levels):
        upper = levels[k + 1] if k + 1 < len(levels) else ref[-1]
        below = arr[last <= z][:, :-1]
        total += _hv_min(below, ref[:-1]) * (upper - z)
    return float(total)


def hypervolume(points: PointsLike, ref: Sequence[float] | np.ndarray,
                directions: Sequence[str]) -> float:
    """Volume dominated by ``points`` and bounded by the reference point ``ref``.

    Points not strictly better than ``ref`` in every objective add nothing. Exact for any number
    of objectives (slicing), fast enough for the 2-3 objectives stagebudget uses.
    """
    arr = _as_min(points, directions)
    r = _as_min([list(ref)], directions)[0]
    if len(arr) == 0:
        return 0.0
    arr = arr[np.all(arr < r, axis=1)]
    if len(arr) == 0:
        return 0.0
    arr = arr[non_dominated(arr, ["minimize"] * arr.shape[1])]
    return _hv_min(arr, r)


def default_ref_point(values: Sequence[Sequence[float]], directions: Sequence[str]) -> tuple[float, ...]:
    """The worst possible point: 0 for maximised scores (accuracies), max seen x 1.1 for costs.

    A maximised objective with negative values seen uses its minimum instead of 0; a minimised
    objective whose max is not positive uses max + 1.
    """
    arr = np.asarray(values, dtype=float).reshape(-1, len(directions))
    ref = []
    for j, d in enumerate(directions):
        col = arr[:, j] if len(arr) else np.zeros(1)
        if d == "maximize":
            ref.append(float(min(0.0, col.min())))
        else:
            top = float(col.max())
            ref.append(top * 1.1 if top > 0 else top + 1.0)
    return tuple(ref)


def knee_point(
    front: Sequence[Sequence[float]], ref: Sequence[float], directions: Sequence[str]
) -> int | None:
    """Index (into ``front``) of the knee of a non-dominated set.

    Each objective is normalised to [0, 1] between the reference point (0) and the best value on
    the front (1). With two objectives and three or more points the knee is the point farthest
    from the line through the two extremes, on the side of the ideal point (1, 1); otherwise (1-2
    points, 3 objectives, or a straight front) it is the point nearest the ideal point. Ties go to
    the earlier index.
    """
    if len(front) == 0:
        return None
    arr = _as_min(front, directions)
    r = _as_min([list(ref)], directions)[0]
    best = arr.min(axis=0)
    span = np.where(r - best > 0, r - best, 1.0)
    norm = (r - arr) / span  # 1 = best on the front, 0 = reference point
    if norm.shape[1] == 2 and len(norm) >= 3:
        a = norm[int(np.lexsort((-norm[:, 1], -norm[:, 0]))[0])]
        b = norm[int(np.lexsort((-norm[:, 0], -norm[:, 1]))[0])]
        d = b - a
        normal = np.array([d[1], -d[0]])
        length = float(np.hypot(*normal))
        if length > 0:
            if normal @ (np.ones(2) - a) < 0:
                normal = -normal
            dist = (norm - a) @ normal / length
            if dist.max() > 1e-12:
                return int(np.argmax(dist))
    return int(np.argmin(np.linalg.norm(1.0 - norm, axis=1)))


def compute_front(
    points: Sequence[TrialPoint],
    objective_names: Sequence[str],
    directions: Sequence[str],
    ref_point: Sequence[float] | None = None,
    counts: Mapping[str, int] | None = None,
) -> FrontInfo:
    """Front, dominated set, references, hypervolume (and its history) and knee of ``points``.

    ``points`` are completed trials; the history adds them in trial-number order. Points with
    the same schedule (:func:`~stagebudget.schedule.identity`) are one point, the first by
    trial number; the later ones are listed in ``twins``.
    """
    if len(objective_names) != len(directions):
        raise ValueError("objective_names and directions must have the same length")
    ordered = sorted(points, key=lambda p: p.number)
    twins = twins_of(ordered)
    distinct = [p for p in ordered if p.number not in twins]
    values = [p.values for p in distinct]
    ref = tuple(ref_point) if ref_point is not None else default_ref_point(values, directions)
    idx = non_dominated(values, directions) if values else []
    front_pts = [distinct[i] for i in idx]
    front_pts.sort(key=lambda p: (p.values[0], p.number))
    front = [p.number for p in front_pts]
    history = [
        (k, hypervolume(values[:k], ref, directions)) for k in range(1, len(values) + 1)
    ]
    knee = knee_point([p.values for p in front_pts], ref, directions)
    front_set = set(front)
    return FrontInfo(
        objective_names=tuple(objective_names),
        directions=tuple(directions),
        points={p.number: p for p in ordered},
        front=front,
        dominated=[p.number for p in distinct if p.number not in front_set],
        # a reference that repeats an earlier trial's schedule is read off that trial
        references={p.reference: twins.get(p.number, p.number) for p in ordered if p.reference},
        ref_point=ref,
        hypervolume=history[-1][1] if history else 0.0,
        hv_history=history,
        knee=front[knee] if knee is not None else None,
        counts=dict(counts or {}),
        twins=twins,
    )


def twins_of(points: Sequence[TrialPoint]) -> dict[int, int]:
    """``{later trial: first trial}`` for points whose schedules are the same trained model
    (different params can plan one schedule: an RL rank when RL gets no budget). Points
    without a schedule are never twins.

    >>> a = {"stages": [{"kind": "sft", "steps": 5}], "name": "a"}
    >>> twins_of([TrialPoint(0, (1.0,), schedule=a), TrialPoint(3, (1.0,), schedule={**a, "name": "b"})])
    {3: 0}
    """
    first: dict[str, int] = {}
    out: dict[int, int] = {}
    for p in sorted(points, key=lambda p: p.number):
        if not p.schedule:
            continue
        key = identity(p.schedule)
        if key in first:
            out[p.number] = first[key]
        else:
            first[key] = p.number
    return out


def curve_series(number: int, rows: Sequence[Mapping[str, Any]]) -> CurveSeries:
    """Put one trial's curve rows on one x axis across stages.

    x is cumulative device-seconds when every row has them (a stage whose clock restarts is
    shifted to start where the previous one ended), else the global step. A boundary is drawn
    where one stage ends, at that stage's last x.
    """
    rows = sorted(rows, key=lambda r: (r.get("stage_index", 0), r.get("global_step", 0),
                                       r.get("step", 0)))
    use_time = bool(rows) and all(r.get("device_seconds") is not None for r in rows)
    key = "device_seconds" if use_time else "global_step"
    xs: list[float] = []
    boundaries: list[tuple[float, str]] = []
    offset, prev_stage, prev_x = 0.0, None, 0.0
    for r in rows:
        stage = (r.get("stage_index", 0), str(r.get("stage", "")))
        raw = float(r.get(key, r.get("step", 0)) or 0)
        if prev_stage is not None and stage != prev_stage:
            boundaries.append((prev_x, f"{prev_stage[1]} → {stage[1]}"))
            if raw + offset < prev_x:  # this stage's clock restarted at 0
                offset = prev_x
        x = raw + offset
        xs.append(x)
        prev_stage, prev_x = stage, x
    return CurveSeries(
        number=number,
        x=xs,
        x_label="cumulative device-seconds" if use_time else "global step",
        id_accuracy=[_num(r.get(ID_ACCURACY)) for r in rows],
        ood_accuracy=[_num(r.get(OOD_ACCURACY)) for r in rows],
        stages=[str(r.get("stage", "")) for r in rows],
        boundaries=boundaries,
    )


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
