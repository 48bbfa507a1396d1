"""Resume for real: a search driver is SIGKILLed mid-trial, then resumed.

Finished trials are kept and not trained again; trials the dead driver left RUNNING become FAIL
("interrupted") in the study and FAILED in their records, and ``--resume`` runs each of them
again with the same params (references included), so the study ends with exactly the requested
number of COMPLETE trials.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import optuna
import pytest
import yaml

from runhelpers import demo_space, kill_driver_when
from stagebudget.rundir import RunDir
from stagebudget.searching.driver import run_search
from stagebudget.testing.fakes import fake_trial_fn

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
State = optuna.trial.TrialState
TRIALS = 6

# The first trial to start finishes; every later one writes its first curve row and then waits
# there to be killed, so the kill lands mid-trial whatever the timing (arguments are bound here:
# the function runs on a Ray worker, whose sys.argv is not the driver's).
DRIVER = """
import functools, os, sys, time
from pathlib import Path
from stagebudget.searching.driver import run_search
from stagebudget.testing.fakes import fake_trial_fn

def first_finishes_the_rest_hold(schedule, out_dir=None, *, report, first, calls, **kw):
    try:
        os.close(os.open(first, os.O_CREAT | os.O_EXCL))
        hold = False
    except FileExistsError:
        hold = True

    def report_and_hold(row):
        report(row)
        if hold:
            time.sleep(600)  # longer than the test waits: only the kill ends this trial

    return fake_trial_fn(schedule, out_dir, report=report_and_hold, seconds=0.4, calls=calls, **kw)

run_search(sys.argv[1], name="res", runs_dir=Path(sys.argv[2]), live=False,
           trial_fn=functools.partial(first_finishes_the_rest_hold, calls=sys.argv[3],
                                      first=sys.argv[4]))
"""


def _completed(run: RunDir) -> list:
    return [r for r in run.records() if r.status == "COMPLETE"]


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _start_and_kill(space: Path, runs: Path, log: Path, calls: Path) -> None:
    """Run the driver in its own process group; SIGKILL the group once the first trial completed
    and a reference trial has written its first curve row: every trial after the first holds
    there until killed (DRIVER), so a reference is interrupted mid-trial, by construction."""
    run = RunDir(runs / "res")

    def mid_reference() -> bool:
        if not run.trials.is_dir():
            return False
        records = run.records()
        return any(r.status == "COMPLETE" for r in records) and any(
            r.status == "RUNNING" and r.reference and run.curves(r.key) for r in records)

    kill_driver_when(DRIVER, [str(space), str(runs), str(calls), str(log.with_name("first"))],
                     log, mid_reference)


def test_killed_search_resumes_the_interrupted_trials_and_repeats_nothing(tmp_path: Path) -> None:
    space = demo_space(tmp_path, trials=TRIALS, concurrency=2)
    runs, calls = tmp_path / "runs", tmp_path / "calls.jsonl"
    _start_and_kill(space, runs, tmp_path / "driver.log", calls)

    run = RunDir(runs / "res")
    before = {r.key: r for r in _completed(run)}
    stale = {r.key: r for r in run.records() if r.status == "RUNNING"}
    assert before and stale and len(before) < TRIALS
    trained_before = len(_calls(calls))

    run_search(space, name="res", runs_dir=runs, resume=True, live=False,
               trial_fn=functools.partial(fake_trial_fn, seconds=0.1, calls=str(calls)))

    meta = run.read_meta()
    assert len(meta["resumed"]) == 1
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])
    complete = study.get_trials(states=(State.COMPLETE,))
    # exactly what was asked; twins (told an earlier trial's result, see test_search) take no
    # trial and trained nothing
    slots = [t for t in complete if "twin_of" not in t.user_attrs]
    assert len(slots) == TRIALS
    assert not study.get_trials(states=(State.RUNNING, State.WAITING, State.PRUNED))
    failed = study.get_trials(states=(State.FAIL,))
    by_tune_id = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    # every trial the kill cut short (also one asked but not yet started) is FAIL "interrupted"
    # and ran again once: same params, same reference, completed, no error carried over
    assert {by_tune_id[key].number for key in stale} <= {t.number for t in failed}
    for cut in failed:
        assert cut.user_attrs["error"] == "interrupted"
        retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == cut.number]
        assert len(retries) == 1 and retries[0].state == State.COMPLETE
        # same params; a trial asked but cut before all its params were sampled (a reference
        # fixes only some) gets the rest sampled when it runs again
        assert cut.params.items() <= retries[0].params.items()
        assert retries[0].user_attrs["retry_of"] == cut.number
        if "tune_trial_id" in cut.user_attrs:  # it had started, and was labelled then
            assert retries[0].user_attrs.get("reference") == cut.user_attrs.get("reference")
        # (one the kill cut between Optuna's ask and the searcher's labelling carries no label;
        # its retry is labelled from the same params when it starts: CI saw a cut "heuristic")
        # a reference's retry keeps the reference's fixed params (not a second enqueue)
        assert retries[0].system_attrs.get("fixed_params") == cut.system_attrs.get("fixed_params")
        assert "error" not in retries[0].user_attrs
    assert any(rec.reference for rec in stale.values())
    # the interrupted reference ran: every reference has a COMPLETE trial
    assert {t.user_attrs.get("reference") for t in complete} >= {"sft_only", "rl_only", "heuristic"}
    records = {r.key: r for r in run.records()}
    for key, rec in before.items():                    # finished trials kept, not trained again
        assert records[key].status == "COMPLETE" and records[key].started == rec.started
        assert records[key].attempt == 1
    after = _calls(calls)[trained_before:]
    finished_digests = {c["digest"] for c in _calls(calls) if c["key"] in before}
    assert not [c for c in after if c["digest"] in finished_digests]
    assert not [c for c in after if c["key"] in before]
    for key in stale:                                  # interrupted ones are marked, not lost
        assert records[key].status == "FAILED" and records[key].error == "interrupted"
    for key, rec in records.items():
        assert (by_tune_id[key].state == State.COMPLETE) == (rec.status == "COMPLETE"), rec
    # References are enqueued once (fixed_params), never again on resume; a sampler may still
    # propose the same params itself, which is not a re-enqueue.
    enqueued = [t.system_attrs["fixed_params"] for t in study.trials
                if "fixed_params" in t.system_attrs and "failed_trial" not in t.system_attrs]
    assert len(enqueued) == 3
    assert len({json.dumps(p, sort_keys=True) for p in enqueued}) == 3
    assert json.loads((run.root / "run.json").read_text())["trials_requested"] == TRIALS


def test_retries_are_enqueued_once_and_only_real_outcomes_count(tmp_path: Path) -> None:
    from stagebudget.searching.resume import finished_trials, retry_interrupted

    study = optuna.create_study(directions=["maximize", "maximize"],
                                storage=f"sqlite:///{tmp_path / 's.db'}")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    ok = study.ask(dist)
    study.tell(ok, [0.5, 0.5])
    for error in ("interrupted", "RuntimeError: boom"):
        t = study.ask(dist)
        t.set_user_attr("error", error)
        study.tell(t, state=State.FAIL)
    pruned = study.ask(dist)
    study.tell(pruned, state=State.PRUNED)
    assert finished_trials(study) == 3                 # complete, genuinely failed, pruned
    cut = study.trials[1]
    assert retry_interrupted(study) == [cut.number]
    assert retry_interrupted(study) == []              # idempotent: a second resume adds none
    waiting = study.get_trials(states=(State.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == cut.params
    assert waiting[0].system_attrs["retry_history"] == [cut.number]
    # the retry is what the next ask runs, with the interrupted trial's params
    again = study.ask(dist)
    assert again.params == cut.params
    again.set_user_attr("error", "interrupted")        # interrupted a second time
    study.tell(again, state=State.FAIL)
    assert finished_trials(study) == 3
    assert retry_interrupted(study) == [again.number]
    assert study.get_trials(states=(State.WAITING,))[0].system_attrs["retry_history"] == [
        cut.number, again.number]


def test_a_reference_cut_before_all_its_params_were_sampled_runs_again_as_that_reference(
        tmp_path: Path) -> None:
    """An enqueued trial (a reference) killed after its first params were sampled: its retry
    takes the rest from the reference too, not from the sampler (CI: the "heuristic" reference
    never completed after a resume)."""
    from stagebudget.searching.resume import retry_interrupted

    study = optuna.create_study(directions=["maximize", "maximize"],
                                storage=f"sqlite:///{tmp_path / 's.db'}",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1),
            "y": optuna.distributions.FloatDistribution(0, 1)}
    study.enqueue_trial({"x": 0.25, "y": 0.75})
    cut = study.ask()
    cut.suggest_float("x", 0, 1)                       # the kill lands before y is sampled
    cut.set_user_attr("error", "interrupted")
    study.tell(cut, state=State.FAIL)
    assert retry_interrupted(study) == [cut.number]
    again = study.ask(dist)
    assert again.params == {"x": 0.25, "y": 0.75}


def test_resume_of_a_finished_search_runs_nothing(tmp_path: Path) -> None:
    space = demo_space(tmp_path, trials=1, concurrency=1, references=False)
    fn = functools.partial(fake_trial_fn, seconds=0.05)
    run_dir = run_search(space, name="done", runs_dir=tmp_path / "runs", live=False, trial_fn=fn)
    # A resume with nothing left starts no Ray and no trial.
    run_search(space, name="done", runs_dir=tmp_path / "runs", resume=True, live=False,
               trial_fn="stagebudget.no_such_module:fn")
    assert len(RunDir(run_dir).records()) == 1


def test_mark_interrupted_keeps_finished_work_and_fails_the_rest(tmp_path: Path) -> None:
    from stagebudget.rundir import TrialRecord
    from stagebudget.searching.resume import mark_interrupted

    study = optuna.create_study(directions=["maximize", "maximize"],
                                storage=f"sqlite:///{tmp_path / 's.db'}")
    run = RunDir(tmp_path / "run")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    # all RUNNING when the driver died
    done_unsaid, cut, pruned_unsaid = study.ask(dist), study.ask(dist), study.ask(dist)
    for trial, key in ((done_unsaid, "a"), (cut, "b"), (pruned_unsaid, "c")):
        trial.set_user_attr("tune_trial_id", key)
    run.write_record(TrialRecord(key="a", params={}, schedule={}, status="COMPLETE",
                                 objectives={"id_accuracy": 0.7, "ood_accuracy": 0.4}))
    run.write_record(TrialRecord(key="b", params={}, schedule={}, status="RUNNING"))
    run.write_record(TrialRecord(key="c", params={}, schedule={}, status="PRUNED",
                                 pruned={"stage_index": 0, "dominated_by": "a"}))
    # two finished (told now); the interrupted one is not finished: --resume runs it again
    assert mark_interrupted(study, run, ["id_accuracy", "ood_accuracy"]) == 2
    a, b, c = study.trials
    assert a.state == State.COMPLETE and a.values == [0.7, 0.4]
    assert a.user_attrs["record"] == "a"  # described for Optuna's tools before it was told
    assert b.state == State.FAIL and b.user_attrs["error"] == "interrupted"
    assert c.state == State.PRUNED and c.values is None and c.user_attrs["pruned"].startswith(
        "pruned after stage 0")
    records = {r.key: r for r in run.records()}
    assert records["b"].status == "FAILED" and records["b"].error == "interrupted"


REAL_DRIVER = """
import sys
from pathlib import Path
from stagebudget.searching.driver import run_search
run_search(sys.argv[1], name="real", runs_dir=Path(sys.argv[2]), live=False)
"""


@pytest.mark.slow
def test_real_trial_killed_mid_training_runs_again_on_resume(tmp_path: Path) -> None:
    """The real pipeline (builtin:test, tiny steps): the driver is killed while a reference
    trains; the resume runs that same schedule again, from its last cached checkpoint, and
    trains nothing that finished."""
    data = yaml.safe_load(DEMO.read_text())
    data.update(base_model="builtin:test", trials=3, concurrency=1,
                tasks={"source": "builtin", "n_train": 200, "n_id_test": 20, "n_ood_test": 20},
                budget={"per_trial_hours": 0.002})
    for stage in ("sft", "rl"):
        data["stages"][stage]["eval_interval"] = 5
    data["reuse"] = {**data.get("reuse", {}), "recovery_minutes": 0}  # at every eval point
    space = tmp_path / "real.yaml"
    space.write_text(yaml.safe_dump(data))
    runs = tmp_path / "runs"
    run = RunDir(runs / "real")

    def mid_trial() -> bool:  # one trial finished; the next measured its second eval point
        records = run.records() if run.trials.is_dir() else []  # (its first checkpoint is kept)
        return any(r.status == "COMPLETE" for r in records) and any(
            r.status == "RUNNING" and any(row.get("global_step", 0) >= 10 for row in
                                          run.curves(r.key)) for r in records)

    kill_driver_when(REAL_DRIVER, [str(space), str(runs)], tmp_path / "driver.log", mid_trial,
                     timeout=400)
    before = {r.key: r for r in _completed(run)}
    cut = {r.key: r for r in run.records() if r.status == "RUNNING"}
    assert len(cut) == 1 and next(iter(cut.values())).reference

    run_search(space, name="real", runs_dir=runs, resume=True, live=False)

    study = optuna.load_study(study_name=run.read_meta()["study_name"],
                              storage=run.read_meta()["storage"])
    assert len(study.get_trials(states=(State.COMPLETE,))) == 3
    assert {t.user_attrs.get("reference") for t in study.get_trials(states=(State.COMPLETE,))} \
        == {"sft_only", "rl_only", "heuristic"}
    records = {r.key: r for r in run.records()}
    assert len(records) == len(before) + 1 + (3 - len(before))   # finished ones not run again
    for key, rec in before.items():
        assert records[key].started == rec.started and records[key].objectives == rec.objectives
    (key, old), = cut.items()
    assert records[key].status == "FAILED" and records[key].error == "interrupted"
    again = [r for r in records.values() if r.key not in before and r.key != key
             and r.reference == old.reference]
    assert len(again) == 1 and again[0].status == "COMPLETE", again
    assert again[0].schedule == old.schedule and again[0].params == old.params  # the same schedule
    assert again[0].ledger["stages"] and 0 <= again[0].objectives["id_accuracy"] <= 1
    # ...and it went on from the interrupted trial's last published checkpoint (prefix cache)
    assert sum(stage.get("reused_steps", 0) for stage in again[0].ledger["stages"]) > 0, \
        again[0].ledger
