"""Real fault injections through real Ray and Optuna, with fast fake trials.

A trial that raises is FAILED (record and study) with its message while the others go on; a trial
process SIGKILLed is retried up to ``max_retries`` and then FAILED; nothing is left RUNNING.
"""

from __future__ import annotations

import functools
from pathlib import Path

import optuna

from runhelpers import demo_space
from stagebudget.rundir import RunDir
from stagebudget.searching.driver import run_search
from stagebudget.testing.fakes import fake_trial_fn

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
State = optuna.trial.TrialState


def _space(tmp_path: Path, **changes: object) -> Path:
    return demo_space(tmp_path, **{"references": False, "concurrency": 2, **changes})


def _study_and_records(run_dir: Path) -> tuple[optuna.Study, dict]:
    run = RunDir(run_dir)
    meta = run.read_meta()
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])
    return study, {r.key: r for r in run.records()}


def test_raising_trial_fails_alone_and_killed_trials_are_retried(tmp_path: Path) -> None:
    # The first trial raises (NaN-like) on every attempt; every other trial's process is
    # SIGKILLed on its first attempt and succeeds on the retry (max_retries 1).
    fn = functools.partial(fake_trial_fn, seconds=0.1, fail="first", kill="once",
                           marker_dir=str(tmp_path / "markers"))
    run_dir = run_search(_space(tmp_path, trials=3, max_retries=1), name="faults",
                         runs_dir=tmp_path / "runs", live=False, trial_fn=fn)
    study, records = _study_and_records(run_dir)
    assert len(study.trials) == 3
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 2 + ["FAIL"]
    failed = [r for r in records.values() if r.status == "FAILED"]
    assert len(failed) == 1
    assert failed[0].error.startswith("FloatingPointError: loss is NaN")
    assert failed[0].attempt == 2                     # a raising trial is retried too
    for t in study.trials:
        rec = records[t.user_attrs["tune_trial_id"]]
        if t.state == State.FAIL:
            assert rec is failed[0] and t.values is None
        else:
            assert rec.status == "COMPLETE" and rec.attempt == 2   # killed once, then ran


def test_trial_killed_every_attempt_is_failed_after_retries(tmp_path: Path) -> None:
    fn = functools.partial(fake_trial_fn, seconds=0.1, kill="first",
                           marker_dir=str(tmp_path / "markers"))
    run_dir = run_search(_space(tmp_path, trials=3, max_retries=1), name="killed",
                         runs_dir=tmp_path / "runs", live=False, trial_fn=fn)
    study, records = _study_and_records(run_dir)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert not study.get_trials(states=(State.RUNNING, State.WAITING))
    failed = [r for r in records.values() if r.status == "FAILED"]
    assert len(failed) == 1 and failed[0].attempt == 2
    assert failed[0].error.startswith("trial process failed")
    assert all(r.status in ("COMPLETE", "FAILED") for r in records.values())
