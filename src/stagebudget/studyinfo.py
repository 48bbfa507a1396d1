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

from stagebudget import __version__
from stagebudget.records import (
    DEVICE_HOURS,
    ID_ACCURACY_SE,
    OOD_ACCURACY_SE,
    PLANNED_DEVICE_HOURS,
    TrialRecord,
    planned_hours,
)

if TYPE_CHECKING:
    from stagebudget.space import SearchSpace

# Attribute names (study user attrs and trial user attrs), written once.
SCHEDULE_ATTR = "schedule"
STEPS_ATTR = "steps_ran"
LR_ATTR = "learning_rates"
RECORD_ATTR = "record"
REFERENCE_ATTR = "reference"
VERSION_ATTR = "stagebudget_version"
RUN_DIR_ATTR = "run_dir"
SPACE_ATTR = "space"
SPACE_FILE_ATTR = "space_file"
PRUNED_ATTR = "pruned"
REUSED_ATTR = "reused_from"  # the record key of the trial whose measurements this one reused
# On a trial told its twin's result without a Tune trial (the Optuna number of the trial that
# trained the schedule): it cost nothing, so it is no trial slot (see tune_adapter.StudySearch).
TWIN_ATTR = "twin_of"


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
        from stagebudget.earlystop import describe

        attrs[PRUNED_ATTR] = describe(record.pruned)
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
