"""Test doubles for the search: a fast stand-in for ``pipeline.run_schedule``. FOR TESTS ONLY.

They live in the package (not under tests/) so Ray workers, also on other nodes, can import them;
nothing in stagebudget imports this module.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagebudget.kinds import IMITATION, get_kind
from stagebudget.names import ID_ACCURACY, OOD_ACCURACY, SECONDS_PER_HOUR, STANDARD_ERROR_OF
from stagebudget.schedule import Schedule
from stagebudget.trialresult import TrialResult

# What ``fake_trial_fn`` returns: the result every trial function returns (tests only).
FakeResult = TrialResult


def _fake_result(schedule: Schedule, id_accuracy: float, ood_accuracy: float, hours: float,
                 curves: list[dict[str, Any]], se: dict[str, float] | None) -> TrialResult:
    """The fake's result: spent = planned = ``hours``; the ledger says it is a fake, and which
    process ran it."""
    return TrialResult(schedule, id_accuracy, ood_accuracy, device_hours=hours,
                       planned_device_hours=hours, curves=curves,
                       ledger={"device_hours": hours, "fake": True, "pid": os.getpid()},
                       standard_errors=dict(se or {}))


def _imitates(spec: Any) -> bool:
    """Whether a stage is SFT for the fake's scores (its kind has the imitation role)."""
    return get_kind(spec.kind).role == IMITATION


def fake_trial_fn(schedule: Any, out_dir: Path | None = None, *,
                  report: Callable[[dict[str, Any]], None] | None = None,
                  seconds: float = 0.2, fail: str | None = None, kill: str | None = None,
                  marker_dir: str | None = None, se: bool = False,
                  stage_end: Callable[[int, dict[str, Any]], None] | None = None,
                  weak_sft_rank: int | None = None, calls: str | None = None,
                  dense: bool = False, **_: Any) -> TrialResult:
    """A fast stand-in for ``pipeline.run_schedule``. FOR TESTS ONLY.

    Scores are a deterministic function of the schedule: more SFT steps (steps of stages whose
    kind has the imitation role) raise ID and lower OOD, so the front has several points.
    Faults, for fault-injection tests (bind them with ``functools.partial``):

    - ``fail="diverge"`` raises :class:`TrainingDiverged` (deterministic: never retried);
      ``fail="always"`` raises ``FloatingPointError`` (like a NaN loss) in every trial;
      ``fail="first"`` in every attempt of the first trial to start.
    - ``kill="once"`` SIGKILLs its own process on each trial's first attempt (a retry then
      succeeds); ``kill="first"`` on every attempt of the first trial to reach it.

    Which trial is "first" is decided by marker files in ``marker_dir``.
    Spent device-hours = the schedule's ``budget_hours`` (or 0.001). ``se=True`` adds binomial
    standard errors (as if measured on 200 prompts). Every row has ``planned_seconds``.
    ``dense=True`` (or a ``stage_end``, as ``run_schedule`` takes it) draws the whole
    trajectory instead of two rows: a row every eighth of the budget and at every stage's
    end, ID and OOD following the SFT steps done so far; ``stage_end`` gets the row at the end
    of every stage but the last and may raise to stop the trial there (the ledger so far is
    written, as the pipeline does). ``weak_sft_rank``: SFT at that LoRA rank loses .2 on both
    ID and OOD once it has trained (dominated trials, for early stopping). ``calls`` is a file
    that gets one JSON line per training started (key, schedule digest), to count trainings.
    """
    key = Path(out_dir).name if out_dir else "trial"
    if calls is not None:
        with open(calls, "a") as fh:
            fh.write(json.dumps({"key": key, "digest": schedule.digest()}) + "\n")
    if fail == "always" or (fail == "first" and _chosen(marker_dir, "fail", key)):
        raise FloatingPointError(f"loss is NaN at step 3 (fake, trial {key})")
    if fail == "diverge":
        from stagebudget.errors import TrainingDiverged

        raise TrainingDiverged(schedule.stages[-1].kind, len(schedule.stages) - 1, 3, math.nan)
    if (kill == "once" and _chosen(marker_dir, f"kill-{key}", "")) or (
            kill == "first" and _chosen(marker_dir, "kill", key)):
        os.kill(os.getpid(), 9)
    total = max(1, sum(s.steps for s in schedule.stages))
    hours = schedule.budget_hours or 0.001
    weak = any(_imitates(s) and s.steps and s.lora_rank == weak_sft_rank
               for s in schedule.stages) and weak_sft_rank is not None
    emit = _Emitter(out_dir, report, se)
    if dense or stage_end is not None:
        rows = _dense_curve(schedule, emit, stage_end, weak, seconds, out_dir)
        final = rows[-1]
        errors = {n: final[n] for n in STANDARD_ERROR_OF.values()} if se else None
        return _fake_result(schedule, final[ID_ACCURACY], final[OOD_ACCURACY], hours, rows, errors)
    frac = sum(s.steps for s in schedule.stages if _imitates(s)) / total
    rows = []
    for i in range(1, 3):
        time.sleep(seconds / 2)
        rows.append(emit(_fake_row(schedule.stages[-1].kind, len(schedule.stages) - 1, i, i,
                                   hours * SECONDS_PER_HOUR * i / 2, frac * i / 2, 0.2 if weak else 0.0)))
    final = rows[-1]
    errors = {se_name: final[se_name] for se_name in STANDARD_ERROR_OF.values()} if se else None
    return _fake_result(schedule, final[ID_ACCURACY], final[OOD_ACCURACY], hours, rows, errors)


def _dense_curve(schedule: Any, emit: _Emitter, stage_end: Callable[..., None] | None,
                 weak: bool, seconds: float, out_dir: Path | None) -> list[dict[str, Any]]:
    """The fake trajectory of ``dense=True`` (see :func:`fake_trial_fn`)."""
    steps = [s.steps for s in schedule.stages]
    total, hours = max(1, sum(steps)), schedule.budget_hours or 0.001
    ends = [sum(steps[:i + 1]) for i in range(len(steps))]
    points = sorted({round(total * k / 8) for k in range(9)} | set(ends))

    def sft_done(g: int) -> int:
        return sum(max(0, min(g, end) - (end - s.steps))
                   for s, end in zip(schedule.stages, ends, strict=True) if _imitates(s))

    rows, g = [], 0
    try:
        for g in points:
            index = next(i for i, end in enumerate(ends) if g <= end)
            spec = schedule.stages[index]
            time.sleep(seconds / len(points))
            done = sft_done(g)
            rows.append(emit(_fake_row(spec.kind, index, g - (ends[index] - spec.steps), g,
                                       hours * SECONDS_PER_HOUR * g / total, done / total,
                                       0.2 if weak and done else 0.0)))
            if stage_end is not None and g == ends[index] and index < len(steps) - 1:
                stage_end(index, dict(rows[-1]))
    except BaseException:
        if out_dir is not None:
            spent = hours * g / total
            (Path(out_dir) / "ledger.json").write_text(json.dumps(
                {"device_hours": spent, "spent_device_hours": spent, "fake": True}))
        raise
    return rows


def _fake_row(stage: str, index: int, step: int, global_step: int, planned: float,
              sft_frac: float, penalty: float) -> dict[str, Any]:
    """A fake curve row: ID rises and OOD falls with the SFT fraction; ``penalty`` lowers both."""
    return {"stage": stage, "stage_index": index, "step": step, "global_step": global_step,
            "device_seconds": planned, "planned_seconds": planned,
            ID_ACCURACY: round(0.3 + 0.6 * sft_frac - penalty, 4),
            OOD_ACCURACY: round(0.8 - 0.5 * sft_frac - penalty, 4),
            "train_loss": 1.0 / max(1, step)}


class _Emitter:
    """Appends fake rows to ``curves.jsonl`` and reports them, as the pipeline does."""

    def __init__(self, out_dir: Path | None, report: Callable[[dict[str, Any]], None] | None,
                 se: bool) -> None:
        self.out_dir, self.report, self.se = out_dir, report, se

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.se:
            row.update({se_name: round(math.sqrt(row[name] * (1 - row[name]) / 200), 4)
                        for name, se_name in STANDARD_ERROR_OF.items()})
        if self.out_dir is not None:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.out_dir) / "curves.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if self.report is not None:
            self.report(row)
        return row


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
