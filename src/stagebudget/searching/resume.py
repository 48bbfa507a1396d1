"""Repairing a study on ``--resume``: trials a killed driver left running are marked
interrupted, retried with the same params, and counted; changed numerics are named.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from stagebudget.errors import UserError
from stagebudget.names import COMPLETE, ERROR_ATTR, FAILED, INTERRUPTED, PRUNED, RUNNING
from stagebudget.rundir import RunDir, is_interrupted
from stagebudget.studystore import finish_trial
from stagebudget.version import numerics, numerics_changes

log = logging.getLogger(__name__)


def warn_numerics_changed(meta: dict[str, Any]) -> list[str]:
    """Warn when this machine's numerics differ from those run.json recorded at the start: the
    trials run from here may then not match the earlier ones exactly. Returns the changes."""
    changes = numerics_changes(meta["numerics"], numerics()) if meta.get("numerics") else []
    if changes:
        log.warning("resuming %s on other numerics than it started with (%s): trials run from "
                    "here may differ from the earlier ones even for the same schedule",
                    meta.get("name"), "; ".join(changes))
    return changes


def load_study(storage: Any, study_name: str) -> Any:
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise UserError(f"study {study_name!r} not found in its storage; the run directory's "
                        "run.json and study storage do not match") from None


def same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    from stagebudget.space.points import reference_name

    return reference_name(b, [("x", a)]) is not None


def mark_interrupted(study: Any, run: RunDir, objectives: list[str]) -> int:
    """Settle what a killed driver left RUNNING; return the finished trials afterwards (see
    :func:`finished_trials`: interrupted ones are not finished).

    A trial whose record is COMPLETE finished before the driver died but was never told to the
    study: it is told now with the record's objectives (kept, not re-run); one whose record is
    PRUNED is told PRUNED. Any other RUNNING study trial becomes FAIL with error "interrupted"
    (``--resume`` runs it again, see :func:`retry_interrupted`), and RUNNING records become
    FAILED with that error.
    """
    from optuna.trial import TrialState

    from stagebudget.names import TUNE_ID_ATTR
    from stagebudget.searching.study_attrs import trial_attrs

    records = {r.key: r for r in run.records()}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        rec = records.get(t.user_attrs.get(TUNE_ID_ATTR, ""))
        attrs = trial_attrs(rec) if rec and rec.status in (COMPLETE, PRUNED) else {}
        if rec and rec.status == COMPLETE and all(o in rec.objectives for o in objectives):
            values = [float(rec.objectives[o]) for o in objectives]
            finish_trial(study, t, TrialState.COMPLETE, values, attrs)
            continue
        if rec and rec.status == PRUNED:
            finish_trial(study, t, TrialState.PRUNED, attrs=attrs)
            continue
        # the error attribute before the state: a FAIL trial is final
        finish_trial(study, t, TrialState.FAIL, attrs={**attrs, ERROR_ATTR: INTERRUPTED})
    for record in records.values():
        if record.status == RUNNING:
            record.status, record.error, record.finished = FAILED, INTERRUPTED, time.time()
            run.write_record(record)
    return finished_trials(study)


def finished_trials(study: Any) -> int:
    """Trials that count toward ``trials``: COMPLETE, PRUNED, and FAIL other than interrupted
    (an interrupted trial is run again on ``--resume``, so its retry is what counts) and other
    than twins (told an earlier trial's result, they took no trial slot)."""
    from optuna.trial import TrialState

    from stagebudget.rundir import is_twin

    done = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return sum(not is_interrupted(t) and not is_twin(t)
               for t in study.get_trials(deepcopy=False, states=done))


RETRY_OF_ATTR = "retry_of"


def retry_interrupted(study: Any) -> list[int]:
    """Enqueue every interrupted trial not yet retried, with the same params (so the same
    schedule); return the numbers of the trials retried.

    The retry is a WAITING trial that the searcher asks first, marked the way Optuna's own
    ``RetryHeartbeatStaleTrialCallback`` marks one (system attrs ``failed_trial`` and
    ``retry_history``), plus a ``retry_of`` user attribute for the dashboard. An enqueued
    trial's ``fixed_params`` go with it, as Optuna's callback carries them: a reference cut
    before all its params were sampled then runs again as that reference, not with the rest
    sampled afresh. Idempotent: a driver killed again before it asked the retry leaves it
    WAITING, and nothing is added twice.
    """
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    out = []
    for t in trials:
        if not is_interrupted(t) or t.number in retried:
            continue
        history = [*t.system_attrs.get("retry_history", []), t.number]
        carried = {k: t.system_attrs[k] for k in ("fixed_params",) if k in t.system_attrs}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions,
            user_attrs={RETRY_OF_ATTR: t.number},
            system_attrs={**carried, "failed_trial": history[0], "retry_history": history}))
        out.append(t.number)
    if out:
        log.info("running again the %d trials the last driver left unfinished: %s", len(out),
                 ", ".join(map(str, out)))
    return out
