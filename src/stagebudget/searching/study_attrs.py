"""What the Optuna study tells a user of Optuna's own tools (optuna-dashboard, ``optuna.
visualization``): objective names, and per trial the schedule in words, the steps that ran,
device-hours, standard errors and the reference label; on the study the space, the stagebudget
version and the run directory.

Trial attributes are built from the trial record (the run's source of truth) by the driver when
Tune reports the trial finished, and before the study is told, since Optuna refuses to change a
finished trial. Curves stay in the run directory (``curves.jsonl``, TensorBoard events): a
multi-objective study has no intermediate values.

>>> steps_ran({"stages": [{"kind": "sft", "steps": 40}]}, {"stages": [{"steps_done": 38}]})
[('sft', 38, 40)]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagebudget.names import (
    DEVICE_HOURS,
    ID_ACCURACY_SE,
    LR_ATTR,
    OOD_ACCURACY_SE,
    PLANNED_DEVICE_HOURS,
    PRUNED_ATTR,
    RECORD_ATTR,
    REFERENCE_ATTR,
    REUSED_ATTR,
    RUN_DIR_ATTR,
    SCHEDULE_ATTR,
    SPACE_ATTR,
    SPACE_FILE_ATTR,
    STEPS_ATTR,
    VERSION_ATTR,
)
from stagebudget.rundir import TrialRecord, describe_pruned, planned_hours, steps_ran, steps_text
from stagebudget.version import __version__

if TYPE_CHECKING:
    from stagebudget.space.schema import SearchSpace

def trial_attrs(record: TrialRecord) -> dict[str, Any]:
    """The Optuna user attributes of one trial, from its record (missing fields left out)."""
    from stagebudget.schedule import Schedule

    attrs: dict[str, Any] = {RECORD_ATTR: record.key}
    if record.schedule:
        try:
            schedule = Schedule.from_dict(record.schedule)
        except ValueError:
            schedule = None
        if schedule is not None:
            attrs[SCHEDULE_ATTR] = schedule.describe()
            attrs[LR_ATTR] = ", ".join(f"{s.kind} {s.learning_rate:g}" for s in schedule.stages)
        attrs[STEPS_ATTR] = steps_text(steps_ran(record.schedule, record.ledger))
    for key in (DEVICE_HOURS, ID_ACCURACY_SE, OOD_ACCURACY_SE):
        value = record.objectives.get(key)
        if isinstance(value, int | float):
            attrs[key] = float(value)
    planned = planned_hours(record)  # the nominal cost, beside the measured device_hours
    if planned is not None:
        attrs[PLANNED_DEVICE_HOURS] = planned
    if record.reference:
        attrs[REFERENCE_ATTR] = record.reference
    if record.reused_from:
        attrs[REUSED_ATTR] = record.reused_from
    if record.pruned:
        attrs[PRUNED_ATTR] = describe_pruned(record.pruned)
    return attrs


def annotate_trial(set_attr: Callable[[str, Any], None], record: TrialRecord | None) -> None:
    """Write ``trial_attrs(record)`` with ``set_attr(key, value)`` (an unfinished Optuna trial's
    ``set_user_attr``); nothing without a record."""
    if record is None:
        return
    for key, value in trial_attrs(record).items():
        set_attr(key, value)


def annotate_study(study: Any, space: SearchSpace, run_dir: Path, meta: dict[str, Any]) -> None:
    """Name the objectives and describe the run on the study (idempotent; done on every start,
    so a resumed run of an older version gains them too)."""
    import optuna

    names = [o.name for o in space.objectives]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if study.metric_names != names:
            study.set_metric_names(names)
    dims = {name: dist.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
            for name, dist in space.dimensions().items()}
    attrs = {
        VERSION_ATTR: __version__, RUN_DIR_ATTR: str(Path(run_dir).resolve()),
        SPACE_FILE_ATTR: str(meta.get("space_file", "")), SPACE_ATTR: space.name,
        "searched": dims, "budget_per_trial_hours": space.budget.per_trial_hours,
        "objectives": names,
    }
    if meta.get("command"):
        attrs["command"] = meta["command"]
    current = study.user_attrs
    for key, value in attrs.items():
        if current.get(key) != value:
            study.set_user_attr(key, value)
