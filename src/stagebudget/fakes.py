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

from stagebudget.records import DEVICE_HOURS, ID_ACCURACY, OOD_ACCURACY, STANDARD_ERROR_OF


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

    - ``fail="diverge"`` raises :class:`TrainingDiverged` (deterministic: never retried);
      ``fail="always"`` raises ``FloatingPointError`` (like a NaN loss) in every trial;
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
    if fail == "diverge":
        from stagebudget.stages.common import TrainingDiverged

        raise TrainingDiverged(schedule.stages[-1].kind, len(schedule.stages) - 1, 3, math.nan)
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
    errors = {se_name: round(math.sqrt(final[name] * (1 - final[name]) / 200), 4)
              for name, se_name in STANDARD_ERROR_OF.items()} if se else None
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
