"""Early stopping at stage boundaries: a trial that completed trials dominate there stops PRUNED.

``pipeline.run_schedule`` calls ``stage_end(index, row)`` after every stage but the last, with the
curve row measured at that stage's end. :class:`StageGate` compares the row's accuracies with
each completed trial's value at the same budget point: that trial's latest curve row at or before
the row's ``planned_seconds``. Planned seconds are the cost model's budget point, the same on any
load, so a decision never depends on how busy the machine was (measured seconds would).

A completed trial dominates by ``margin_se`` standard errors when it is better on every compared
objective by at least ``margin_se`` standard errors of the difference, ``sqrt(se_a² + se_b²)``
(rows carry ``id_accuracy_se`` / ``ood_accuracy_se``); with a margin of 0 it is plain Pareto
dominance. The compared objectives are the space's accuracy objectives; the budget point is the
same for both, so device-hours are not compared. The trial then raises :class:`StagePruned`; the
trainable records it PRUNED (the Optuna trial too), never COMPLETE with partial scores.

Which trials are "completed" is a snapshot taken when the trial starts (the records COMPLETE in
the run then), not re-read at each boundary. With one trial at a time the snapshot is every
earlier trial, so a search stays reproducible. With ``concurrency > 1`` which trials have
finished when a trial starts depends on timing, exactly as what the sampler saw when it proposed
the trial does; the snapshot adds no dependence on the relative speed of the trials running
beside it. The decision names the trial that dominated and how many were compared, so it can be
checked afterwards.

>>> dominates({"id_accuracy": .8, "ood_accuracy": .6}, {"id_accuracy": .7, "ood_accuracy": .6},
...           {"id_accuracy": "maximize", "ood_accuracy": "maximize"}, margin_se=0)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from stagebudget.errors import StagePruned
from stagebudget.names import COMPLETE, STANDARD_ERROR_OF
from stagebudget.rundir import COMPARED, PLANNED, RunDir, describe_pruned, is_finite_number


def dominates(a: dict[str, Any], b: dict[str, Any], directions: dict[str, str],
              margin_se: float) -> bool:
    """Whether row ``a`` beats row ``b`` on every objective in ``directions`` by at least
    ``margin_se`` standard errors of the difference (and strictly on one). A missing value
    never dominates; a missing standard error counts as 0."""
    strict = False
    for name, direction in directions.items():
        if not is_finite_number(a.get(name)) or not is_finite_number(b.get(name)):
            return False
        diff = float(a[name]) - float(b[name])
        if direction == "minimize":
            diff = -diff
        se_name = STANDARD_ERROR_OF.get(name, "")
        se = math.hypot(_se(a.get(se_name)), _se(b.get(se_name)))
        if diff < margin_se * se - 1e-12:
            return False
        strict = strict or diff > 0
    return strict


def value_at(rows: list[dict[str, Any]], planned_seconds: float) -> dict[str, Any] | None:
    """A trial's curve row at budget point ``planned_seconds``: its latest row at or before it
    (the last of equals: a stage's end row and the next stage's first are the same point)."""
    best: dict[str, Any] | None = None
    for row in rows:
        p = row.get(PLANNED)
        if not is_finite_number(p) or float(p) > planned_seconds + 1e-9:  # type: ignore[arg-type]
            continue
        if best is None or float(p) >= best[PLANNED]:  # type: ignore[arg-type]
            best = row
    return best


@dataclass
class StageGate:
    """``stage_end`` for ``run_schedule``: stop the trial when a completed trial dominates it at
    the stage boundary's budget point (see the module docstring)."""

    directions: dict[str, str]
    margin_se: float
    completed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def snapshot(cls, run: RunDir, objectives: dict[str, str], margin_se: float,
                 exclude: str) -> StageGate:
        """The gate of trial ``exclude``: compared with the trials COMPLETE in ``run`` now
        (twins that reused another's measurements once, through the one they reused)."""
        completed = {r.key: run.curves(r.key) for r in run.records()
                     if r.status == COMPLETE and r.key != exclude and r.reused_from is None}
        directions = {k: v for k, v in objectives.items() if k in COMPARED}
        return cls(directions, margin_se, completed)

    def __call__(self, index: int, row: dict[str, Any]) -> None:
        planned = row.get(PLANNED)
        if not self.directions or not isinstance(planned, int | float) or not is_finite_number(planned):
            return
        for key, rows in self.completed.items():
            other = value_at(rows, float(planned))
            if other is not None and dominates(other, row, self.directions, self.margin_se):
                info = {
                    "stage_index": index, "stage": row.get("stage"), "step": row.get("step"),
                    PLANNED: planned, "margin_se": self.margin_se,
                    "dominated_by": key, "compared_with": len(self.completed),
                    "at": _values(row), "by": _values(other),
                }
                raise StagePruned(describe_pruned(info), info)


def _values(row: dict[str, Any]) -> dict[str, float]:
    keys = (*COMPARED, *STANDARD_ERROR_OF.values(), PLANNED)
    return {k: float(row[k]) for k in keys if is_finite_number(row.get(k))}


def _se(value: Any) -> float:
    return float(value) if is_finite_number(value) and value > 0 else 0.0
