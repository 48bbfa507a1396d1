"""Resume for real: a search driver is SIGKILLed mid-run, then resumed.

Finished trials are kept and not re-run; trials the dead driver left RUNNING become FAIL in the
study and FAILED ("interrupted") in their records; the study ends with exactly the requested
number of finished trials; references already run are not enqueued again.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import optuna

from runhelpers import demo_space, kill_driver_when
from stagebudget.fakes import fake_trial_fn
from stagebudget.records import RunDir
from stagebudget.search import run_search

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
State = optuna.trial.TrialState
TRIALS = 6

DRIVER = """
import functools, sys
from pathlib import Path
from stagebudget.search import run_search
from stagebudget.fakes import fake_trial_fn
run_search(sys.argv[1], name="res", runs_dir=Path(sys.argv[2]), live=False,
           trial_fn=functools.partial(fake_trial_fn, seconds=2.0))
"""


def _completed(run: RunDir) -> list:
    return [r for r in run.records() if r.status == "COMPLETE"]


def _start_and_kill(space: Path, runs: Path, log: Path) -> None:
    """Run the driver in its own process group; SIGKILL the group once a trial completed."""
    run = RunDir(runs / "res")
    kill_driver_when(DRIVER, [str(space), str(runs)], log,
                     lambda: run.trials.is_dir() and bool(_completed(run)))


def test_killed_search_resumes_without_losing_or_repeating(tmp_path: Path) -> None:
    space = demo_space(tmp_path, trials=TRIALS, concurrency=2)
    runs = tmp_path / "runs"
    _start_and_kill(space, runs, tmp_path / "driver.log")

    run = RunDir(runs / "res")
    before = {r.key: r for r in _completed(run)}
    stale = {r.key for r in run.records() if r.status == "RUNNING"}
    assert before and len(before) < TRIALS

    run_search(space, name="res", runs_dir=runs, resume=True, live=False,
               trial_fn=functools.partial(fake_trial_fn, seconds=0.1))

    meta = run.read_meta()
    assert len(meta["resumed"]) == 1
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])
    states = [t.state for t in study.trials]
    assert len(states) == TRIALS                       # exactly what was asked, no more
    assert all(s in (State.COMPLETE, State.FAIL) for s in states)
    records = {r.key: r for r in run.records()}
    assert not study.get_trials(states=(State.RUNNING, State.WAITING))
    for key, rec in before.items():                    # finished trials kept, not re-run
        assert records[key].status == "COMPLETE" and records[key].started == rec.started
        assert records[key].attempt == 1
    for key in stale:                                  # interrupted ones are marked, not lost
        assert records[key].status == "FAILED" and records[key].error == "interrupted"
    assert all(r.status in ("COMPLETE", "FAILED") for r in records.values())
    by_tune_id = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    for key, rec in records.items():
        assert (by_tune_id[key].state == State.COMPLETE) == (rec.status == "COMPLETE")
    # References are enqueued once (fixed_params), never again on resume; a sampler may still
    # propose the same params itself, which is not a re-enqueue.
    enqueued = [t.system_attrs["fixed_params"] for t in study.trials
                if "fixed_params" in t.system_attrs]
    assert len(enqueued) == 3
    assert len({json.dumps(p, sort_keys=True) for p in enqueued}) == 3
    assert json.loads((run.root / "run.json").read_text())["trials_requested"] == TRIALS


def test_resume_of_a_finished_search_runs_nothing(tmp_path: Path) -> None:
    space = demo_space(tmp_path, trials=1, concurrency=1, references=False)
    fn = functools.partial(fake_trial_fn, seconds=0.05)
    run_dir = run_search(space, name="done", runs_dir=tmp_path / "runs", live=False, trial_fn=fn)
    # A resume with nothing left starts no Ray and no trial.
    run_search(space, name="done", runs_dir=tmp_path / "runs", resume=True, live=False,
               trial_fn="stagebudget.no_such_module:fn")
    assert len(RunDir(run_dir).records()) == 1


def test_mark_interrupted_keeps_finished_work_and_fails_the_rest(tmp_path: Path) -> None:
    from stagebudget.records import TrialRecord
    from stagebudget.search import mark_interrupted

    study = optuna.create_study(directions=["maximize", "maximize"],
                                storage=f"sqlite:///{tmp_path / 's.db'}")
    run = RunDir(tmp_path / "run")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    done_unsaid, cut = study.ask(dist), study.ask(dist)   # both RUNNING when the driver died
    for trial, key in ((done_unsaid, "a"), (cut, "b")):
        trial.set_user_attr("tune_trial_id", key)
    run.write_record(TrialRecord(key="a", params={}, schedule={}, status="COMPLETE",
                                 objectives={"id_accuracy": 0.7, "ood_accuracy": 0.4}))
    run.write_record(TrialRecord(key="b", params={}, schedule={}, status="RUNNING"))
    assert mark_interrupted(study, run, ["id_accuracy", "ood_accuracy"]) == 2
    a, b = study.trials
    assert a.state == State.COMPLETE and a.values == [0.7, 0.4]
    assert a.user_attrs["record"] == "a"  # described for Optuna's tools before it was told
    assert b.state == State.FAIL and b.user_attrs["error"] == "interrupted"
    records = {r.key: r for r in run.records()}
    assert records["b"].status == "FAILED" and records["b"].error == "interrupted"
