"""The one module that builds Ray Tune and Optuna objects: sampler, storage, searcher, Tuner.

Optuna samples (multi-objective), Ray Tune executes. Facts this module relies on (Ray 2.60,
Optuna 5.0, read from the installed sources):

- ``OptunaSearch`` takes the metric/mode *lists*; ``TuneConfig`` gets neither (lists raise there).
- ``OptunaSearch`` creates its study with ``load_if_exists=True``, so a resumed search attaches to
  the same study by name; every ``points_to_evaluate`` entry is ``enqueue_trial``-ed on creation.
- On a trial error Tune calls ``searcher.on_trial_complete(id, error=True)`` with no result, so the
  Optuna trial becomes FAIL (never a score). Trials still running when an experiment is stopped
  get no ``on_trial_complete`` at all, which is why the search budget never *stops* running
  trials: :class:`BudgetLimiter` only refuses to start new ones.
- No Tune scheduler (ASHA, HyperBand) is used: with multi-objective OptunaSearch they record
  stopped trials as COMPLETE with half-trained scores.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from stagebudget.errors import UserError
from stagebudget.records import (
    DETERMINISTIC_FAILURE,
    DEVICE_HOURS,
    ERROR_ATTR,
    FAILED,
    RunDir,
    TrialRecord,
)
from stagebudget.space import SearchSpace, make_sampler

log = logging.getLogger(__name__)

TUNE_DIR_NAME = "tune"
TUNE_ID_ATTR = "tune_trial_id"
REFERENCE_ATTR = "reference"


# --- Optuna -------------------------------------------------------------------------------------
def modes(space: SearchSpace) -> list[str]:
    """Ray's spelling of the objectives' directions: ``["max", "max"]``."""
    return ["max" if o.direction == "maximize" else "min" for o in space.objectives]


def metric_names(space: SearchSpace) -> list[str]:
    """The objectives' metric names, in the study's order."""
    return [o.name for o in space.objectives]


def open_storage(url: str) -> Any:
    """An Optuna storage object from a URL (``sqlite:///...``, ``postgresql://...``) or a
    journal file path (``*.log``, ``*.journal`` or ``journal:PATH``)."""
    import optuna

    if url.startswith("journal:") or url.endswith((".log", ".journal", ".jsonl")):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url.removeprefix("journal:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise UserError(f"--storage {url!r} is neither a database URL (sqlite:///run/study.db, "
                        "postgresql://user@host/db) nor a journal file (*.log or journal:PATH)")
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # a bad URL, an unreachable server or a full disk, before compute
        cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
        why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if "disk is full" in why or "No space left" in why:
            why += " (free some space, then run the same command again)"
        raise UserError(f"cannot open Optuna storage {url!r}: {why}") from None


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that tags each Optuna trial with its Tune trial id (and reference name),
    so the study, Tune and the trial records join on one key."""

    def __init__(self, *args: Any, references: Sequence[tuple[str, dict[str, Any]]] = (),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._references = list(references)

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and config:
            ot_trial.set_user_attr(TUNE_ID_ATTR, trial_id)
            name = reference_name(ot_trial.params, self._references)
            if name:
                ot_trial.set_user_attr(REFERENCE_ATTR, name)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if result and result.get(DETERMINISTIC_FAILURE):  # failed; a retry cannot help
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None:
                ot_trial.set_user_attr(ERROR_ATTR, str(result[DETERMINISTIC_FAILURE]))
            super().on_trial_complete(trial_id, result=None, error=True)
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    @property
    def study(self) -> Any:
        return self._ot_study


def reference_name(params: dict[str, Any],
                   references: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """The name of the reference point ``params`` equals (floats compared with a tolerance)."""
    for name, point in references:
        if point.keys() == params.keys() and all(
                _same(point[k], params[k]) for k in point):
            return name
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


# --- the search-wide budget ---------------------------------------------------------------------
class BudgetLimiter(Searcher):
    """Searcher wrapper that stops *starting* trials once the search budget would be passed.

    Spend = measured device-hours of finished trials (+ ``prior_hours`` from before a resume)
    + planned device-hours of running ones. A new trial starts only if spend plus the per-trial
    budget (the most any trial can plan) fits in ``budget_hours``. Running trials always finish,
    so no Optuna trial is left RUNNING and none is cut short with a half-trained score.
    """

    def __init__(self, searcher: Searcher, *, budget_hours: float | None, per_trial_hours: float,
                 planned_hours: Callable[[dict[str, Any]], float], prior_hours: float = 0.0):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.budget_hours = budget_hours
        self.per_trial_hours = per_trial_hours
        self.planned_hours = planned_hours
        self.spent_hours = prior_hours
        self.running: dict[str, float] = {}
        self.measured: dict[str, float] = {}
        self.stopped_by_budget = False

    @property
    def committed_hours(self) -> float:
        return self.spent_hours + sum(self.running.values())

    def suggest(self, trial_id: str) -> dict | None:  # or Searcher.FINISHED (a str)
        if self.budget_hours is not None and (
                self.committed_hours + self.per_trial_hours > self.budget_hours + 1e-12):
            if not self.stopped_by_budget:
                log.info("search budget reached: %.4f of %.4f device-hours committed",
                         self.committed_hours, self.budget_hours)
            self.stopped_by_budget = True
            return Searcher.FINISHED if not self.running else None  # type: ignore[return-value]
        config = self.searcher.suggest(trial_id)
        if isinstance(config, dict):
            try:
                self.running[trial_id] = self.planned_hours(config)
            except Exception:  # the trial itself will fail and say why; count it at full budget
                self.running[trial_id] = self.per_trial_hours
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if DEVICE_HOURS in result:
            self.measured[trial_id] = float(result[DEVICE_HOURS])
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        planned = self.running.pop(trial_id, 0.0)
        if result and DEVICE_HOURS in result:
            self.spent_hours += float(result[DEVICE_HOURS])
        else:  # failed: charge what it had measured, else what it planned (it ran until killed)
            self.spent_hours += self.measured.get(trial_id, planned)
        self.measured.pop(trial_id, None)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def get_state(self) -> dict[str, Any]:
        # Tune saves each wrapper's state beside the inner searcher; keep it to plain numbers.
        return {"spent_hours": self.spent_hours, "running": dict(self.running),
                "stopped_by_budget": self.stopped_by_budget}

    def set_state(self, state: dict[str, Any]) -> None:
        self.spent_hours = state["spent_hours"]
        self.running = dict(state["running"])
        self.stopped_by_budget = state["stopped_by_budget"]

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


# --- trial records the trainable cannot write itself -------------------------------------------
class RecordKeeper(tune.Callback):
    """Marks a trial's record FAILED when Tune gives up on it.

    A trial whose process was killed (OOM, SIGKILL) never writes its own FAILED record, so the
    driver does it from ``on_trial_error``; an exception raised inside the trainable has already
    written FAILED with its message, which is kept.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run = RunDir(run_dir)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        import time

        record = self.run.read_record(trial.trial_id) or TrialRecord(
            key=trial.trial_id, params=dict(trial.config), schedule={})
        if record.status == FAILED and record.error:
            return
        record.status = FAILED
        record.error = _trial_error_text(trial)
        record.finished = time.time()
        self.run.write_record(record)


def _trial_error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    text = ""
    if path and Path(path).is_file():
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    return f"trial process failed: {text or 'no error message (the process died)'}"


# --- the Tuner ------------------------------------------------------------------------------------
def build_tuner(trainable: Callable[..., Any], space: SearchSpace, *, run_dir: Path,
                study_name: str, storage: Any, num_samples: int, concurrency: int,
                points: Sequence[dict[str, Any]], limiter_kwargs: dict[str, Any],
                callbacks: Sequence[tune.Callback] = ()) -> tuple[tune.Tuner, BudgetLimiter,
                                                                   StudySearch]:
    """Assemble searcher (StudySearch -> ConcurrencyLimiter -> BudgetLimiter) and the Tuner.

    ``trainable`` is already ``tune.with_parameters``-wrapped; resources are added here.
    """
    search = StudySearch(
        space=space.optuna_space(), metric=metric_names(space), mode=modes(space),
        points_to_evaluate=list(points) or None, sampler=make_sampler(space, num_samples),
        storage=storage, study_name=study_name, references=space.reference_points(),
    )
    limited = ConcurrencyLimiter(search, max_concurrent=concurrency)
    budget = BudgetLimiter(limited, **limiter_kwargs)
    res = space.resources_per_trial
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": res.cpu, "gpu": res.gpu}),
        # Concurrency is limited inside (max_concurrent_trials would wrap the budget limiter in a
        # second ConcurrencyLimiter). reuse_actors works with function trainables: one worker
        # process runs trial after trial, saving ~6 s of imports per real trial.
        tune_config=tune.TuneConfig(search_alg=budget, num_samples=num_samples,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=TUNE_DIR_NAME, storage_path=str(Path(run_dir).resolve()),
            failure_config=tune.FailureConfig(max_failures=space.max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0, callbacks=[RecordKeeper(run_dir), *callbacks],
        ),
    )
    return tuner, budget, search
