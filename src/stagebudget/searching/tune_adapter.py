"""The one module that builds Ray Tune and Optuna objects: sampler, searcher, Tuner (storage:
:mod:`stagebudget.studystore`).

Optuna samples (multi-objective), Ray Tune executes. Facts this module relies on (Ray 2.60,
Optuna 5.1, read from the installed sources):

- ``OptunaSearch`` takes the metric/mode *lists*; ``TuneConfig`` gets neither (lists raise there).
- ``OptunaSearch`` creates its study with ``load_if_exists=True``, so a resumed search attaches to
  the same study by name; every ``points_to_evaluate`` entry is ``enqueue_trial``-ed on creation.
- On a trial error Tune calls ``searcher.on_trial_complete(id, error=True)`` with no result, so the
  Optuna trial becomes FAIL (never a score). Trials still running when an experiment is stopped
  get no ``on_trial_complete`` at all, which is why the search budget never *stops* running
  trials: :class:`~stagebudget.searching.limiter.BudgetLimiter` only refuses to start new ones.
- Tune pickles the search algorithm, sampler included: into ``tuner.pkl`` when the Tuner is
  built, and (``OptunaSearch.save``) into the searcher checkpoint at every experiment save. Every
  sampler :func:`make_sampler` builds must pickle (:mod:`stagebudget.space.nsga2`).
- No Tune scheduler (ASHA, HyperBand) is used: with multi-objective OptunaSearch they record
  stopped trials as COMPLETE with half-trained scores.
- Different params can plan one schedule (an RL rank when RL gets no budget, a rank at a share
  of 0; samplers also re-propose points). :class:`StudySearch` never hands such a twin to Tune:
  it tells the Optuna trial the result already measured (``study.tell``), or holds it until the
  trial training that schedule ends, and asks the sampler again for the same Tune trial.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from stagebudget.names import (
    DETERMINISTIC_FAILURE,
    ERROR_ATTR,
    FAILED,
    PRUNED,
    PRUNED_FLAG,
    REFERENCE_ATTR,
    TUNE_ID_ATTR,
    TWIN_ATTR,
)
from stagebudget.rundir import RunDir, TrialRecord, told_objectives
from stagebudget.schedule import identity
from stagebudget.searching.limiter import BudgetLimiter
from stagebudget.searching.study_attrs import annotate_trial, trial_attrs
from stagebudget.searching.tbcurves import CurveWriter, run_label, write_trial_events
from stagebudget.space.points import reference_name
from stagebudget.space.sampler import make_sampler
from stagebudget.space.schema import SearchSpace

log = logging.getLogger(__name__)

TUNE_DIR_NAME = "tune"


# --- Optuna -------------------------------------------------------------------------------------
def modes(space: SearchSpace) -> list[str]:
    """Ray's spelling of the objectives' directions: ``["max", "max"]``."""
    return ["max" if o.direction == "maximize" else "min" for o in space.objectives]


def metric_names(space: SearchSpace) -> list[str]:
    """The objectives' metric names, in the study's order."""
    return [o.name for o in space.objectives]


def planned_schedule(space: SearchSpace, cost: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The dict of the schedule ``params`` plan (module level: Tune pickles the searcher)."""
    return space.schedule_from_params(params, cost).to_dict()


# Ray's OptunaSearch keeps its Optuna trials by Tune trial id (``self._ot_trials``) and its study
# (``self._ot_study``) in attributes it offers no accessor for (Ray 2.60,
# ray/tune/search/optuna/optuna_search.py). Only tune_optuna_trials and StudySearch.study read
# them; a Ray that renames them breaks those two (and tests/test_tune_adapter.py) and nothing else.
def tune_optuna_trials(search: Any) -> dict[str, Any]:
    """Ray's own map of Tune trial id to Optuna trial in ``search`` (an :class:`OptunaSearch`),
    not a copy: deleting an entry makes ``OptunaSearch.suggest`` ask the study again."""
    return search._ot_trials


MAX_TWIN_ASKS = 32  # a sampler that keeps proposing known schedules gets a trial after this


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that tags each Optuna trial with its Tune trial id (and reference name),
    so the study, Tune and the trial records join on one key, and that spends no Tune trial on
    a schedule this search has already trained or is training.

    ``schedule_of`` plans params into a schedule's dict (``None``: twins are not looked for).
    A proposed twin of a COMPLETE trial is told that trial's objectives at once, with a record
    that reused them (:func:`~stagebudget.searching.trainable.reuse_twin`); a twin of a running trial
    waits, RUNNING, and is told the same when that trial ends (FAIL or PRUNED if it did).
    Either way the sampler learns the result, the twin is marked :data:`TWIN_ATTR` (it takes
    no trial slot) and the sampler is asked again for this Tune trial.
    """

    def __init__(self, *args: Any, references: Sequence[tuple[str, dict[str, Any]]] = (),
                 run_dir: Path | None = None,
                 schedule_of: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._references = list(references)
        self._run = RunDir(Path(run_dir)) if run_dir is not None else None
        self._schedule_of = schedule_of
        self._training: dict[str, str] = {}  # schedule identity -> Tune trial training it
        self._waiting: dict[str, list[tuple[Any, dict[str, Any]]]] = {}  # Tune id -> twins

    def suggest(self, trial_id: str) -> dict | None:
        for attempt in range(1, MAX_TWIN_ASKS + 1):
            config = super().suggest(trial_id)
            ot_trial = tune_optuna_trials(self).get(trial_id)
            if ot_trial is None or not config:
                return config
            schedule = self._planned(ot_trial.params)
            if schedule is None or attempt == MAX_TWIN_ASKS or not self._settle_twin(
                    ot_trial, schedule):
                if attempt == MAX_TWIN_ASKS and schedule is not None:
                    log.warning("the sampler proposed %d known schedules in a row; trial %d "
                                "runs the next one as it is", attempt - 1, ot_trial.number)
                self._start(trial_id, ot_trial, schedule)
                return config
            del tune_optuna_trials(self)[trial_id]  # told or waiting: ask again for this Tune trial
        return None  # not reached: the last attempt always starts its trial

    def _start(self, trial_id: str, ot_trial: Any, schedule: dict[str, Any] | None) -> None:
        # The labels first, the Tune id last: a driver killed between the two writes leaves a
        # trial whose id says it started with its labels already there (resume relies on it).
        name = reference_name(ot_trial.params, self._references)
        if name:
            ot_trial.set_user_attr(REFERENCE_ATTR, name)
        ot_trial.set_user_attr(TUNE_ID_ATTR, trial_id)
        if schedule is not None:
            self._training.setdefault(identity(schedule), trial_id)

    def _planned(self, params: dict[str, Any]) -> dict[str, Any] | None:
        if self._schedule_of is None or self._run is None:
            return None
        try:
            return self._schedule_of(params)
        except Exception:  # the trial itself fails and says why
            return None

    def _settle_twin(self, ot_trial: Any, schedule: dict[str, Any]) -> bool:
        """Tell (or hold) ``ot_trial`` when its schedule is trained or training; else False."""
        running = self._training.get(identity(schedule))
        if running is not None:
            ot_trial.set_user_attr(TWIN_ATTR, tune_optuna_trials(self)[running].number)
            self._waiting.setdefault(running, []).append((ot_trial, schedule))
            return True
        return self._tell_twin(ot_trial, schedule)

    def _tell_twin(self, ot_trial: Any, schedule: dict[str, Any]) -> bool:
        """Complete ``ot_trial`` with the measurements of a finished trial of ``schedule``, if
        any: a record that reused them, then Optuna's own record of a known result (``tell``
        with the values). False when no trial of the run finished this schedule."""
        from stagebudget.searching.trainable import finished_twin, reuse_twin

        twin = finished_twin(self._run, schedule, exclude="") if self._run else None
        if self._run is None or twin is None:
            return False
        key = f"twin{ot_trial.number:05d}"
        params = dict(ot_trial.params)
        record = TrialRecord(key=key, params=params, schedule={**schedule, "name": key},
                             reference=reference_name(params, self._references),
                             started=time.time())
        reuse_twin(self._run, record, twin)
        number = self._number_of(twin.key)
        ot_trial.set_user_attr(TWIN_ATTR, number)
        ot_trial.set_user_attr(TUNE_ID_ATTR, key)  # the record's key, as for Tune's trials
        annotate_trial(ot_trial.set_user_attr, record)
        told = told_objectives(twin)
        self.study.tell(ot_trial, [told[m] for m in self.metric])
        log.info("trial %d plans the schedule of trial %s: told its result, nothing trained",
                 ot_trial.number, number)
        return True

    def _number_of(self, key: str) -> int | None:
        trials = tune_optuna_trials(self)
        if key in trials:
            return int(trials[key].number)
        return next((t.number for t in self.study.get_trials(deepcopy=False)
                     if t.user_attrs.get(TUNE_ID_ATTR) == key), None)

    def _release(self, trial_id: str) -> None:
        """``trial_id`` ended: settle the twins that waited for it, as it ended."""
        from optuna.trial import TrialState

        self._training = {k: v for k, v in self._training.items() if v != trial_id}
        for ot_trial, schedule in self._waiting.pop(trial_id, []):
            if self._tell_twin(ot_trial, schedule):
                continue
            record = self._run.read_record(trial_id) if self._run else None
            if record is not None and record.status == PRUNED:
                self.study.tell(ot_trial, state=TrialState.PRUNED)
            else:
                ot_trial.set_user_attr(ERROR_ATTR, f"the trial of its schedule ({trial_id}) "
                                                   "did not complete")
                self.study.tell(ot_trial, state=TrialState.FAIL)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """Describe the Optuna trial from its record (schedule, steps, SEs...), then tell it; a
        deterministic failure is told as an error (Ray does not retry it), a trial stopped by
        early stopping as PRUNED (no values: its scores so far are not its result)."""
        ot_trial = tune_optuna_trials(self).get(trial_id)
        if result and result.get(DETERMINISTIC_FAILURE):  # failed; a retry cannot help
            if ot_trial is not None:
                ot_trial.set_user_attr(ERROR_ATTR, str(result[DETERMINISTIC_FAILURE]))
            super().on_trial_complete(trial_id, result=None, error=True)
            self._release(trial_id)
            return
        if ot_trial is not None and self._run is not None:
            try:
                annotate_trial(ot_trial.set_user_attr, self._run.read_record(trial_id))
            except Exception as exc:  # a description must never lose the trial's result
                log.warning("could not describe Optuna trial of %s: %s", trial_id, exc)
        if result and result.get(PRUNED_FLAG) and not error:
            super().on_trial_complete(trial_id, result=None, error=False)  # Ray tells PRUNED
        else:
            super().on_trial_complete(trial_id, result=result, error=error)
        self._release(trial_id)

    @property
    def study(self) -> Any:
        """The Optuna study this searcher asks and tells (Ray's private ``_ot_study``, above)."""
        return self._ot_study


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


class CtrlCCheck(tune.Callback):
    """Raises ``KeyboardInterrupt`` at the start of Tune's next loop step once ``seen`` is set:
    a Ctrl-C that Python dropped (:func:`~stagebudget.searching.raysession.ctrl_c_latch`)
    still stops the search there."""

    def __init__(self, seen: threading.Event) -> None:
        self.seen = seen

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment state; an Event (a lock) cannot be,
        # and a copy has no Ctrl-C of this process to see.
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.seen = threading.Event()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.seen.is_set():
            raise KeyboardInterrupt


class TensorBoardCurves(tune.Callback):
    """Writes each trial's curve rows as TensorBoard events in ``RUN/tensorboard/`` as they
    arrive, named by Optuna trial number and schedule (see :mod:`stagebudget.searching.tbcurves`).

    A trial that reused a twin's measurements reports no rows; its curves are written from its
    ``curves.jsonl`` when it completes.
    """

    def __init__(self, run_dir: Path, search: StudySearch) -> None:
        self.run = RunDir(Path(run_dir))
        self.search = search
        self.writers: dict[str, Any] = {}

    def _label(self, trial_id: str) -> str:
        ot_trial = tune_optuna_trials(self.search).get(trial_id)
        record = self.run.read_record(trial_id)
        schedule = trial_id
        if record is not None and record.schedule:
            from stagebudget.schedule import Schedule, label_fields

            with contextlib.suppress(ValueError):
                trained = Schedule.from_dict(record.schedule)
                # the searched settings, as `status` labels the trial (stagebudget.results.run)
                fields = label_fields([trained], searched=getattr(ot_trial, "params", {}) or {})
                schedule = trained.describe(fields)
        return run_label(getattr(ot_trial, "number", None), schedule,
                         record.reference if record is not None else None)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if result.get("final"):
            return
        try:
            if trial.trial_id not in self.writers:
                self.writers[trial.trial_id] = CurveWriter(self.run.root, self._label(trial.trial_id))
            self.writers[trial.trial_id].add(result)
        except Exception as exc:  # curves for TensorBoard must never stop a search
            log.warning("TensorBoard events of %s not written: %s", trial.trial_id, exc)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()
            return
        rows = self.run.curves(trial.trial_id)
        if rows:
            try:
                write_trial_events(self.run.root, self._label(trial.trial_id), rows)
            except Exception as exc:
                log.warning("TensorBoard events of %s not written: %s", trial.trial_id, exc)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()


def mlflow_callback(tracking_uri: str, run_dir: Path, search: StudySearch) -> tune.Callback:
    """Ray's own ``MLflowLoggerCallback``: one MLflow run per trial in the experiment named after
    the run directory, named by Optuna trial number, metrics against the global step (the
    trainable reports it as ``timesteps_total``), tagged with the schedule when it ends."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    run = RunDir(Path(run_dir))

    # Ray's callback keeps the MLflow run id of each trial in ``self._trial_runs`` (Ray 2.60,
    # ray/air/integrations/mlflow.py) with no accessor; naming the run means creating it there
    # first. A Ray that renames it breaks these two methods (tests/test_mlflow.py).
    class TrialNamedMLflow(MLflowLoggerCallback):  # type: ignore[misc]
        def log_trial_start(self, trial: Any) -> None:
            if trial not in self._trial_runs:
                number = getattr(tune_optuna_trials(search).get(trial.trial_id), "number", None)
                name = f"trial{number:03d}" if number is not None else str(trial)
                tags = {**(self.tags or {}), "trial_name": str(trial), TUNE_ID_ATTR: trial.trial_id}
                started = self.mlflow_util.start_run(tags=tags, run_name=name)
                self._trial_runs[trial] = started.info.run_id
            super().log_trial_start(trial)

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            record = run.read_record(trial.trial_id)
            if record is not None and trial in self._trial_runs:
                client = _mlflow_client()
                for key, value in trial_attrs(record).items():
                    client.set_tag(self._trial_runs[trial], f"stagebudget.{key}", str(value))
            super().log_trial_end(trial, failed=failed)

    return TrialNamedMLflow(tracking_uri=tracking_uri, experiment_name=run.root.name,
                            tags={"stagebudget.run_dir": str(run.root.resolve())})


def _mlflow_client() -> Any:
    """An MLflow client of the tracking (and registry) URI that Ray's callback set up: what
    Ray's private ``_MLflowLoggerUtil._get_client`` builds, from MLflow's public calls."""
    import mlflow
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow.get_tracking_uri(),
                        registry_uri=mlflow.get_registry_uri())


def _trial_error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    text = ""
    if path and Path(path).is_file():
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    return f"trial process failed: {text or 'no error message (the process died)'}"


# --- the Tuner ------------------------------------------------------------------------------------
def build_searcher(space: SearchSpace, *, run_dir: Path, study_name: str, storage: Any,
                   num_samples: int, concurrency: int, points: Sequence[dict[str, Any]],
                   limiter_kwargs: dict[str, Any],
                   cost: Any = None) -> tuple[BudgetLimiter, StudySearch]:
    """The search algorithm Tune is handed (and pickles): StudySearch -> ConcurrencyLimiter ->
    BudgetLimiter; returned with the StudySearch inside it. With ``cost`` (the run's cost model)
    and reuse on, twins of trained schedules take no trial."""
    twins = cost is not None and space.reuse.enabled
    search = StudySearch(
        space=space.optuna_space(), metric=metric_names(space), mode=modes(space),
        points_to_evaluate=list(points) or None, sampler=make_sampler(space, num_samples),
        storage=storage, study_name=study_name, references=space.reference_points(),
        run_dir=Path(run_dir),
        schedule_of=functools.partial(planned_schedule, space, cost) if twins else None,
    )
    limited = ConcurrencyLimiter(search, max_concurrent=concurrency)
    return BudgetLimiter(limited, **limiter_kwargs), search


def trial_resources(space: SearchSpace) -> dict[str, float]:
    """What a trial's Tune actor holds. With several workers it only waits for its Ray Train
    workers, which hold ``cpu``/``gpu`` each themselves (Train V2 schedules them apart from the
    trial): the actor asks for no CPU, and a token byte of memory because Tune refuses an empty
    request."""
    res = space.resources_per_trial
    if res.workers > 1:
        return {"cpu": 0, "gpu": 0, "memory": 1}
    return {"cpu": res.cpu, "gpu": res.gpu}


def build_tuner(trainable: Callable[..., Any], space: SearchSpace, *, run_dir: Path,
                study_name: str, storage: Any, num_samples: int, concurrency: int,
                points: Sequence[dict[str, Any]], limiter_kwargs: dict[str, Any],
                callbacks: Sequence[tune.Callback] = (),
                mlflow_uri: str | None = None,
                cost: Any = None) -> tuple[tune.Tuner, BudgetLimiter, StudySearch]:
    """Assemble the searcher (:func:`build_searcher`) and the Tuner.

    ``trainable`` is already ``tune.with_parameters``-wrapped; resources are added here.
    ``mlflow_uri`` also logs every trial to that MLflow tracking server (or store); ``cost``
    lets twins of trained schedules take no trial (:func:`build_searcher`).
    """
    budget, search = build_searcher(
        space, run_dir=run_dir, study_name=study_name, storage=storage, num_samples=num_samples,
        concurrency=concurrency, points=points, limiter_kwargs=limiter_kwargs, cost=cost)
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources(space)),
        # Concurrency is limited inside (max_concurrent_trials would wrap the budget limiter in a
        # second ConcurrencyLimiter). reuse_actors works with function trainables: one worker
        # process runs trial after trial, saving ~6 s of imports per real trial.
        tune_config=tune.TuneConfig(search_alg=budget, num_samples=num_samples,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=TUNE_DIR_NAME, storage_path=str(Path(run_dir).resolve()),
            failure_config=tune.FailureConfig(max_failures=space.max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # Tune's own CSV/JSON loggers, not its TensorBoard one (see search.TUNE_ENV)
            verbose=0, callbacks=[CSVLoggerCallback(), JsonLoggerCallback(),
                                  RecordKeeper(run_dir), TensorBoardCurves(run_dir, search),
                                  *([mlflow_callback(mlflow_uri, run_dir, search)]
                                    if mlflow_uri else []), *callbacks],
        ),
    )
    return tuner, budget, search
