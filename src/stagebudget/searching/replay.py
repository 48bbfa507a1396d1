"""Replay trials: look a schedule's result up in a benchmark table instead of training it.

A table (JSON lines, one row per schedule and training seed, as ``bench/grid_table.py`` writes
it) records what each schedule of a space scored when it was really trained: ``schedule``,
``seed``, ``id_accuracy``, ``ood_accuracy``, their standard errors, ``nominal_device_hours`` and
``spent_device_hours``. :func:`replay_trial` stands in for :func:`stagebudget.training.pipeline.run_schedule`
(pass it as the search's ``trial_fn``, with the table bound by ``functools.partial`` or named in
``$STAGEBUDGET_REPLAY_TABLE``), so the whole machinery (sampler, Ray Tune, storage, front) runs
unchanged, in seconds, on measured results. Each lookup draws one of the schedule's seeds, so a
search sees the noise a real one would; the draw depends on the run's name and the schedule, so
a search is reproducible.

A row may also hold the trial's ``curves`` (every curve row it measured, with ``planned_seconds``).
The replayed trial then writes them, and passes each stage's end row to ``stage_end`` as
``run_schedule`` does, so early stopping (:class:`stagebudget.searching.earlystop.StageGate`) prunes a
replayed trial where it would have pruned the real one, charging the nominal spend up to there.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from stagebudget.errors import ReplayMiss
from stagebudget.names import (
    ID_ACCURACY,
    ID_ACCURACY_SE,
    OOD_ACCURACY,
    OOD_ACCURACY_SE,
    SECONDS_PER_HOUR,
    SPENT_DEVICE_HOURS,
)
from stagebudget.schedule import Schedule, identity
from stagebudget.trialresult import TrialResult

TABLE_ENV = "STAGEBUDGET_REPLAY_TABLE"
NOMINAL = "nominal_device_hours"
ROW_FIELDS = ("schedule", "seed", ID_ACCURACY, OOD_ACCURACY, NOMINAL)


def replay_key(schedule: Mapping[str, Any]) -> str:
    """What a table row is looked up by: the schedule without its display name and seed (the
    table holds one row per training seed)."""
    return identity({k: v for k, v in schedule.items() if k != "seed"})


@lru_cache(maxsize=4)
def load_table(path: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of a replay table by :func:`replay_key`; a malformed row names its line."""
    table: dict[str, list[dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [f for f in ROW_FIELDS if f not in row]
            if missing:
                raise ValueError(f"{path}:{number}: a replay row needs {', '.join(ROW_FIELDS)}; "
                                 f"missing {', '.join(missing)}")
            table.setdefault(replay_key(row["schedule"]), []).append(row)
    for rows in table.values():
        rows.sort(key=lambda r: r["seed"])
    return table


def mean_values(table: Mapping[str, list[dict[str, Any]]]) -> dict[str, tuple[float, float]]:
    """(ID, OOD) of each schedule averaged over its seeds: the table's true values."""
    return {key: (sum(r[ID_ACCURACY] for r in rows) / len(rows),
                  sum(r[OOD_ACCURACY] for r in rows) / len(rows))
            for key, rows in table.items()}


# The result type a replayed trial returns (the one every trial function returns).
ReplayResult = TrialResult


def replay_trial(schedule: Any, out_dir: Path | None = None, *,
                 report: Callable[[dict[str, Any]], None] | None = None,
                 table: str | None = None,
                 stage_end: Callable[[int, dict[str, Any]], None] | None = None,
                 **_: Any) -> TrialResult:
    """A trial that trains nothing: ``schedule``'s result drawn from the replay ``table``.

    With ``stage_end`` and a row that holds curves, each stage's last curve row is passed to it
    in order; when it raises (early stopping), ``ledger.json`` charges the nominal seconds
    measured up to that row and the exception propagates, as from a real trial.
    """
    path = table or os.environ.get(TABLE_ENV)
    if not path:
        raise ReplayMiss(f"no replay table: pass table= or set ${TABLE_ENV}")
    rows = load_table(str(path))
    key = replay_key(schedule.to_dict())
    if key not in rows:
        raise ReplayMiss(f"schedule {schedule.describe()} is not in the replay table {path} "
                         f"({len(rows)} schedules): replay a search of the space the table was "
                         "made from")
    run_name = Path(out_dir).parent.parent.name if out_dir is not None else ""
    row = random.Random(f"{run_name}|{key}").choice(rows[key])
    result = _result(row, schedule)
    final = {"stage": schedule.stages[-1].kind, "stage_index": len(schedule.stages) - 1,
             "step": schedule.stages[-1].steps,
             "global_step": sum(s.steps for s in schedule.stages),
             "device_seconds": result.device_hours * SECONDS_PER_HOUR, **result.standard_errors,
             ID_ACCURACY: result.id_accuracy, OOD_ACCURACY: result.ood_accuracy}
    result.curves = [dict(r) for r in row.get("curves") or [final]]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "curves.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in result.curves))
    if stage_end is not None:
        for index in range(len(schedule.stages) - 1):
            ends = [r for r in result.curves if r.get("stage_index") == index]
            if ends:
                _gate(stage_end, index, ends[-1], out_dir)
    if report is not None:
        report(dict(result.curves[-1]))
    return result


def _gate(stage_end: Callable[[int, dict[str, Any]], None], index: int, row: dict[str, Any],
          out_dir: Path | None) -> None:
    """``stage_end(index, row)``; if it stops the trial, charge the nominal spend up to ``row``
    in ``ledger.json`` (what a pruned trial's record reads) before letting it propagate."""
    try:
        stage_end(index, dict(row))
    except Exception:
        if out_dir is not None:
            hours = float(row.get("device_seconds", 0.0)) / SECONDS_PER_HOUR
            (Path(out_dir) / "ledger.json").write_text(json.dumps(
                {"device_hours": hours, SPENT_DEVICE_HOURS: hours, "replayed": True}))
        raise


def _result(row: dict[str, Any], schedule: Schedule) -> TrialResult:
    errors = {k: float(row[k]) for k in (ID_ACCURACY_SE, OOD_ACCURACY_SE) if k in row}
    nominal = float(row[NOMINAL])
    # charged as if trained alone, so a search budget behaves as in a real search
    ledger = {"device_hours": nominal, SPENT_DEVICE_HOURS: nominal, "replayed_seed": row["seed"],
              "replayed": True}
    return TrialResult(schedule, float(row[ID_ACCURACY]), float(row[OOD_ACCURACY]),
                       device_hours=nominal, planned_device_hours=nominal, ledger=ledger,
                       standard_errors=errors)


__all__ = ["TABLE_ENV", "ReplayMiss", "ReplayResult", "load_table", "mean_values",
           "replay_key", "replay_trial"]
