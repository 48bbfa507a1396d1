"""Per-trial curves as TensorBoard events in ``RUN/tensorboard/``, one run per trial.

Each trial's run is named by its Optuna trial number and schedule (``trial007 sft 40@r32 -> rl
20@r4``, plus the reference label). Each curve row (an evaluation point) becomes scalars
``id_accuracy``, ``ood_accuracy``, ``train_loss`` / ``reward`` at step = the schedule's global
step, with the event's wall time set to the device-seconds spent training so far, so
TensorBoard's "Relative" horizontal axis reads device-seconds (its "Step" axis, global steps).
``device_seconds`` is also a scalar of its own.

The driver writes the events as rows arrive (watch a running search with ``tensorboard --logdir
RUN/tensorboard``); :func:`write_trial_events` writes a finished trial from its ``curves.jsonl``.
tensorboardX (a Ray Tune dependency) is imported only when events are written.

>>> run_label(7, "sft 40@r32 -> rl 20@r4", "heuristic")
'trial007 sft 40@r32 -> rl 20@r4 (heuristic)'
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from stagebudget.kinds import signal_columns
from stagebudget.names import ID_ACCURACY, OOD_ACCURACY

TENSORBOARD_DIR = "tensorboard"


def scalar_tags() -> tuple[str, ...]:
    """The curve columns written as scalars: the objectives, every registered kind's training
    signal (``train_loss``, ``reward``) and the device-seconds."""
    return (ID_ACCURACY, OOD_ACCURACY, *signal_columns(), "device_seconds")


def run_label(number: int | None, schedule: str, reference: str | None = None) -> str:
    """The TensorBoard run name of a trial."""
    head = f"trial{number:03d}" if number is not None else "trial"
    return f"{head} {schedule}" + (f" ({reference})" if reference else "")


def run_folder(label: str) -> str:
    """A file-system-safe folder name for ``label`` (TensorBoard shows the folder name).

    >>> run_folder("trial007 sft 40@r32 -> rl 20@r4")
    'trial007 sft 40@r32 → rl 20@r4'
    """
    return re.sub(r"[^\w @.,()+=→-]", "_", label.replace("->", "→"))


class CurveWriter:
    """One trial's event file; ``add(row)`` writes one evaluation point."""

    def __init__(self, run_root: Path, label: str) -> None:
        from tensorboardX import SummaryWriter

        self.path = Path(run_root) / TENSORBOARD_DIR / run_folder(label)
        self.writer = SummaryWriter(logdir=str(self.path), flush_secs=5)
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        """Write the scalars of one curve row (rows without ``global_step`` are ignored)."""
        step = row.get("global_step")
        if not isinstance(step, int | float):
            return
        seconds = row.get("device_seconds")
        walltime = float(seconds) if isinstance(seconds, int | float) else None
        for tag in scalar_tags():
            value = row.get(tag)
            if isinstance(value, int | float) and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), int(step), walltime=walltime)
        self.rows += 1
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def write_trial_events(run_root: Path, label: str, rows: list[dict[str, Any]]) -> Path:
    """Write all of a trial's curve rows at once; return its event folder."""
    writer = CurveWriter(run_root, label)
    try:
        for row in rows:
            writer.add(row)
    finally:
        writer.close()
    return writer.path
