"""Study storage both ways: a search written to SQLite, a journal file or a real PostgreSQL server
is killed, resumed, and read back by ``status``, ``pareto`` and ``export`` (the real CLI).

The PostgreSQL case starts a throw-away server on loopback (see ``pgserver.py``); without the
binaries it skips with the reason, unless ``STAGEBUDGET_REQUIRE_POSTGRES=1`` (set in CI), where
it fails.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

import pgserver
from runhelpers import demo_space, kill_driver_when
from stagebudget.cli import app
from stagebudget.errors import RunError, UserError
from stagebudget.results.run import load_run
from stagebudget.rundir import RunDir
from stagebudget.searching.driver import run_search
from stagebudget.studystore import normalize_url, open_storage, redact
from stagebudget.testing.fakes import fake_trial_fn

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
TRIALS = 5
DRIVER = """
import functools, sys
from pathlib import Path
from stagebudget.searching.driver import run_search
from stagebudget.testing.fakes import fake_trial_fn
run_search(sys.argv[1], name="st", runs_dir=Path(sys.argv[2]), storage=sys.argv[3] or None,
           live=False, trial_fn=functools.partial(fake_trial_fn, seconds=2.0))
"""


@contextlib.contextmanager
def _storage(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield ""  # the default: SQLite in the run directory
    elif kind == "journal":
        yield str(tmp_path / "shared" / "study.journal")
    else:
        reason = pgserver.missing_reason()
        if reason is not None:
            if os.environ.get(pgserver.REQUIRE_ENV) == "1":
                pytest.fail(f"{pgserver.REQUIRE_ENV}=1 but no PostgreSQL server can start: {reason}")
            pytest.skip(reason)
        with pgserver.postgres_server() as url:
            yield url


def _kill_after_first_completion(space: Path, runs: Path, storage: str, log: Path) -> None:
    run = RunDir(runs / "st")
    kill_driver_when(DRIVER, [str(space), str(runs), storage], log, lambda: run.trials.is_dir()
                     and any(r.status == "COMPLETE" for r in run.records()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_search_kill_resume_and_read_back(kind: str, tmp_path: Path) -> None:
    space = demo_space(tmp_path, trials=TRIALS, concurrency=2)
    runs = tmp_path / "runs"
    with _storage(kind, tmp_path) as storage:
        _kill_after_first_completion(space, runs, storage, tmp_path / "driver.log")
        run_search(space, name="st", runs_dir=runs, resume=True, live=False,
                   trial_fn=functools.partial(fake_trial_fn, seconds=0.1))
        meta = RunDir(runs / "st").read_meta()
        if kind == "journal":
            assert meta["storage"] == "journal:" + storage
        elif kind == "postgresql":
            assert meta["storage"] == storage
        run = load_run(runs / "st")
        assert sum(t.state == "COMPLETE" for t in run.trials()) == TRIALS  # cut ones ran again
        assert {t.state for t in run.trials()} <= {"COMPLETE", "FAILED"}
        assert run.front(curves=False).front
        assert run.study.metric_names == ["id_accuracy", "ood_accuracy", "device_hours"][
            :len(run.study.directions)]
        for t in run.study.trials:  # described for Optuna's tools, before and after the kill
            if t.state == optuna.trial.TrialState.COMPLETE:
                assert {"schedule", "steps_ran", "device_hours"} <= t.user_attrs.keys()
        _read_back_with_cli(runs / "st", tmp_path)


def _read_back_with_cli(run_dir: Path, tmp_path: Path) -> None:
    cli = CliRunner()
    status = cli.invoke(app, ["status", str(run_dir)])
    assert status.exit_code == 0, status.output
    # every trial finished (a trial the kill cut short is FAILED "interrupted"; one that had
    # finished but was not yet told to the study is kept as COMPLETE)
    assert f"of {TRIALS} requested" in status.output and "0 running" in status.output
    report = tmp_path / "report.html"
    pareto = cli.invoke(app, ["pareto", str(run_dir), "-o", str(report)])
    assert pareto.exit_code == 0, pareto.output
    assert report.stat().st_size > 10_000
    out = tmp_path / "knee.yaml"
    exported = cli.invoke(app, ["export", str(run_dir), "--pick", "knee", "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    doc = yaml.safe_load(out.read_text())
    assert doc["schedule"]["stages"] and doc["source"]["study"] == load_run(run_dir).study.study_name


def test_journal_reader_refuses_a_missing_journal(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"study journal .*missing.journal does not exist"):
        open_storage(f"journal:{tmp_path / 'missing.journal'}", create=False)
    assert not (tmp_path / "missing.journal").exists()


def test_run_with_a_moved_journal_is_found_in_the_run_directory(tmp_path: Path) -> None:
    """A journal kept inside the run directory still opens after the directory moved."""
    old = tmp_path / "old"
    journal = normalize_url(str(old / "study.journal"))
    storage = open_storage(journal)
    optuna.create_study(storage=storage, study_name="s", directions=["maximize", "maximize"])
    RunDir(old).write_meta({"name": "x", "study_name": "s", "storage": journal,
                            "objectives": [{"name": "id_accuracy", "direction": "maximize"},
                                           {"name": "ood_accuracy", "direction": "maximize"}]})
    old.rename(tmp_path / "new")
    assert load_run(tmp_path / "new").study.study_name == "s"
    (tmp_path / "new" / "study.journal").unlink()
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "new")


def test_bad_storage_urls_are_user_errors_that_hide_passwords(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither a database URL"):
        normalize_url("not-a-url")
    with pytest.raises(UserError, match=r"postgresql\+psycopg2://me:\*\*\*@127.0.0.1:1/db") as err:
        open_storage("postgresql+psycopg2://me:secret@127.0.0.1:1/db")
    assert "secret" not in str(err.value)
    assert redact("sqlite:///a/b.db") == "sqlite:///a/b.db"


def test_a_search_with_an_unreachable_server_leaves_nothing(tmp_path: Path) -> None:
    space = demo_space(tmp_path, trials=1, concurrency=1, references=False)
    with pytest.raises(UserError, match="cannot open Optuna storage"):
        run_search(space, name="x", runs_dir=tmp_path / "runs", live=False,
                   storage="postgresql+psycopg2://postgres@127.0.0.1:1/postgres",
                   trial_fn=fake_trial_fn)
    assert not (tmp_path / "runs" / "x").exists()


def test_finish_trial_writes_attrs_then_state_of_a_trial_no_process_asked() -> None:
    from optuna.trial import TrialState

    from stagebudget.studystore import finish_trial

    study = optuna.create_study(directions=["maximize", "maximize"])
    done, pruned, failed = study.ask(), study.ask(), study.ask()
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    finish_trial(study, frozen[done.number], TrialState.COMPLETE, [0.5, 0.25], {"k": "v"})
    finish_trial(study, frozen[pruned.number], TrialState.PRUNED)
    finish_trial(study, frozen[failed.number], TrialState.FAIL, attrs={"error": "interrupted"})
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[done.number].state == TrialState.COMPLETE
    assert by_number[done.number].values == [0.5, 0.25]
    assert by_number[done.number].user_attrs == {"k": "v"}
    assert by_number[pruned.number].state == TrialState.PRUNED
    assert by_number[failed.number].state == TrialState.FAIL
    assert by_number[failed.number].user_attrs == {"error": "interrupted"}
