"""Driver faults (issue 14), through real Ray and Optuna with fast fake trials: a copied run
resumes into its own study; one driver per run; Ctrl-C exits non-zero and leaves a resumable run
with nothing RUNNING; deterministic failures are not retried; our exceptions survive pickling."""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from runhelpers import demo_space
from stagebudget.errors import BudgetError, ConfigError, RunError, UserError
from stagebudget.rundir import RunDir, is_twin
from stagebudget.searching.driver import run_search
from stagebudget.searching.raysession import DriverLock
from stagebudget.searching.resume import finished_trials
from stagebudget.testing.fakes import fake_trial_fn

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
State = optuna.trial.TrialState
FAST = functools.partial(fake_trial_fn, seconds=0.05)


def _space(tmp_path: Path, **changes: object) -> Path:
    return demo_space(tmp_path, **{"references": False, "concurrency": 1, **changes})


def _study(run: RunDir) -> optuna.Study:
    meta = run.read_meta()
    return optuna.load_study(study_name=meta["study_name"], storage=run.storage_url(meta["storage"]))


def _slots(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that took a trial slot: not twins told an earlier trial's known result."""
    from stagebudget.rundir import is_twin

    return [t for t in study.trials if not is_twin(t)]


def test_copied_run_resumes_into_its_own_study(tmp_path: Path) -> None:
    space = _space(tmp_path, trials=1)
    original = RunDir(run_search(space, name="orig", runs_dir=tmp_path / "runs", live=False,
                                 trial_fn=FAST))
    shutil.copytree(original.root, tmp_path / "runs" / "copy")
    copy = RunDir(tmp_path / "runs" / "copy")
    # run.json still names the original's absolute study path
    assert str(original.study_db.resolve()) in (copy.meta.read_text())
    run_search(space, name="copy", runs_dir=tmp_path / "runs", trials=2, resume=True,
               live=False, trial_fn=FAST)
    assert len(_study(original).trials) == 1          # the original is untouched
    assert len(_slots(_study(copy))) == 2


def test_second_driver_on_a_live_run_is_refused(tmp_path: Path) -> None:
    space = _space(tmp_path, trials=1)
    run = RunDir(run_search(space, name="one", runs_dir=tmp_path / "runs", live=False,
                            trial_fn=FAST))
    before = run.meta.read_text()
    lock = DriverLock(run)  # a driver that is running right now
    try:
        with pytest.raises(UserError, match=f"being driven right now by stagebudget pid "
                                            f"{os.getpid()}"):
            run_search(space, name="one", runs_dir=tmp_path / "runs", trials=2, resume=True,
                       live=False, trial_fn=FAST)
        assert run.meta.read_text() == before        # nothing settled, nothing written
    finally:
        lock.release()
    run_search(space, name="one", runs_dir=tmp_path / "runs", trials=2, resume=True,
               live=False, trial_fn=FAST)            # once it is gone, resume works
    assert len(_slots(_study(run))) == 2


# The driver takes Ctrl-C as a terminal's foreground job does, even when the tests themselves
# run as a background job (which starts every child with SIGINT ignored).
DRIVER = """
import functools, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import stagebudget.searching.driver as search
from stagebudget.testing.fakes import fake_trial_fn
from stagebudget.cli import main
real = search.run_search
search.run_search = functools.partial(
    real, trial_fn=functools.partial(fake_trial_fn, seconds=float(sys.argv[3])))
main(["search", sys.argv[1], "--name", "ctrlc", "--runs-dir", sys.argv[2], "--no-live"])
"""


def test_ctrl_c_exits_nonzero_says_how_to_resume_and_leaves_nothing_running(tmp_path: Path):
    space = _space(tmp_path, trials=4)
    runs = tmp_path / "runs"
    run = RunDir(runs / "ctrlc")
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(space), str(runs), "3.0"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not any(r.status == "COMPLETE" for r in run.records()) if run.trials.is_dir() \
                else True:
            assert proc.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no trial completed:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "--resume" in text and "Tuner.restore" not in text and "next: stagebudget" not in text
    meta = run.read_meta()
    assert "finished" not in meta and meta["interrupted"]
    study = _study(run)
    assert not study.get_trials(states=(State.RUNNING, State.WAITING))
    assert all(r.status in ("COMPLETE", "FAILED") for r in run.records())
    done = len([t for t in study.get_trials(states=(State.COMPLETE,)) if not is_twin(t)])
    run_search(space, name="ctrlc", runs_dir=runs, resume=True, live=False, trial_fn=FAST)
    # the trials Ctrl-C cut short ran again: exactly 4 COMPLETE that took a slot, as asked (a
    # twin the sampler proposed is told its known result and is an extra COMPLETE trial)
    complete = _study(run).get_trials(states=(State.COMPLETE,))
    assert len([t for t in complete if not is_twin(t)]) == 4 >= done


# The KeyboardInterrupt this test provokes inside __del__ is printed by Python and reported by
# pytest as unraisable: expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_python_drops_inside_a_finaliser_still_stops_the_search(tmp_path: Path,
                                                                         monkeypatch) -> None:
    """Ctrl-C landing in a ``__del__`` or weakref callback of the driver (SQLAlchemy's, during
    garbage collection: seen in CI) raises ``KeyboardInterrupt`` there, and Python only prints
    "Exception ignored": the search ran on to its end and exited 0. It must stop as an
    interrupted search instead."""
    import stagebudget.searching.driver as driver

    class Finaliser:
        def __del__(self) -> None:  # the signal's handler runs here, in the main thread
            signal.raise_signal(signal.SIGINT)

    real_stats = driver._stats
    fired: list[bool] = []

    def stats_then_ctrl_c(plan, holder, running):  # the driver's own loop, after a trial
        out = real_stats(plan, holder, running)
        if not fired and any(r.status == "COMPLETE" for r in plan.run.records()):
            fired.append(True)
            Finaliser()  # dropped at once: KeyboardInterrupt inside __del__, swallowed
        return out

    monkeypatch.setattr(driver, "_stats", stats_then_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(KeyboardInterrupt, match="search interrupted"):
            run_search(_space(tmp_path, trials=6), name="dropped", runs_dir=tmp_path / "runs",
                       live=False, trial_fn=FAST)
    finally:
        signal.signal(signal.SIGINT, previous)
    run = RunDir(tmp_path / "runs" / "dropped")
    assert fired and run.read_meta()["interrupted"] and "finished" not in run.read_meta()
    assert len([r for r in run.records() if r.status == "COMPLETE"]) < 6


def test_a_study_write_ctrl_c_cut_does_not_lock_out_the_settling(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Ctrl-C that lands inside a study write leaves an SQLite connection with its transaction
    open, held by the frames of the KeyboardInterrupt's traceback: settling inside the
    exception handler kept them alive, was refused five times in a row and left the trial
    RUNNING (CI). Here the cut write is a connection holding SQLite's write lock."""
    import sqlite3

    import stagebudget.searching.driver as driver

    def cut_inside_a_write(plan, **_: object) -> bool:
        plan.run.trials.mkdir(parents=True, exist_ok=True)
        optuna.create_study(study_name=plan.meta["study_name"], storage=plan.storage,
                            directions=["maximize", "maximize"]).ask()
        held = sqlite3.connect(plan.storage.engine.url.database)
        held.execute("BEGIN IMMEDIATE")  # the write Ctrl-C cut, its lock still held
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "_execute", cut_inside_a_write)
    with pytest.raises(KeyboardInterrupt, match="search interrupted: 0 of 2"):
        run_search(_space(tmp_path, trials=2), name="cut", runs_dir=tmp_path / "runs",
                   live=False, trial_fn=FAST)
    study = _study(RunDir(tmp_path / "runs" / "cut"))
    assert [(t.state, t.user_attrs.get("error")) for t in study.trials] == [
        (State.FAIL, "interrupted")]


CRASH_AFTER_SEARCH = """
import ctypes, functools, sys
from pathlib import Path
from stagebudget.searching.driver import run_search
from stagebudget.testing.fakes import fake_trial_fn
run_search(Path(sys.argv[1]), name="crash", runs_dir=Path(sys.argv[2]), live=False,
           trial_fn=functools.partial(fake_trial_fn, seconds=0.05))
print("search done", flush=True)
ctypes.string_at(0)  # a crash after the search, as at interpreter exit
"""


def test_a_crash_after_the_search_says_where_it_was(tmp_path: Path) -> None:
    """Ray removes the crash handlers it put in place of faulthandler's when it shuts down: a
    driver that crashed at exit after a search on a cluster ended with signal 11 and an empty
    stderr (CI). After the search, a crash prints Python's report with the line it was at."""
    space = _space(tmp_path, trials=1)
    res = subprocess.run([sys.executable, "-c", CRASH_AFTER_SEARCH, str(space),
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGSEGV and "search done" in res.stdout, res.stderr[-3000:]
    assert "Fatal Python error: Segmentation fault" in res.stderr, res.stderr[-3000:]
    assert 'File "<string>", line 9' in res.stderr, res.stderr[-3000:]


def test_deterministic_failures_are_not_retried(tmp_path: Path) -> None:
    fn = functools.partial(fake_trial_fn, seconds=0.05, fail="diverge")
    run = RunDir(run_search(_space(tmp_path, trials=2, max_retries=2), name="nan",
                            runs_dir=tmp_path / "runs", live=False, trial_fn=fn))
    study = _study(run)
    assert [t.state for t in study.trials] == [State.FAIL, State.FAIL]
    records = run.records()
    assert len(records) == 2
    for rec in records:
        assert rec.status == "FAILED" and rec.attempt == 1          # never retried
        assert rec.error.startswith("TrainingDiverged: training diverged") and not rec.objectives


@pytest.mark.parametrize("fail, code, counts", [
    ("diverge", 4, "trials: 0 complete, 0 early-stopped, 2 failed: every trial failed"),
    ("first", 3, "trials: 1 complete, 0 early-stopped, 1 failed (each error")])
def test_search_with_failed_trials_says_how_many_last_and_exits_non_zero(
        tmp_path: Path, monkeypatch, capsys, fail: str, code: int, counts: str) -> None:
    """Every trial failed: exit 4, no front, the first error in the last line; some failed:
    exit 3 and the count. The CLI exits 0 only when no trial failed."""
    from stagebudget.cli import main

    fn = functools.partial(fake_trial_fn, seconds=0.05, fail=fail,
                           marker_dir=str(tmp_path / "markers"))
    calls: list[object] = []

    def failing_search(*args, **kwargs):
        calls.append(args)
        return run_search(*args, trial_fn=fn, **kwargs)

    monkeypatch.setattr("stagebudget.searching.driver.run_search", failing_search)
    space = _space(tmp_path, trials=2, max_retries=0, concurrency=1)
    with pytest.raises(SystemExit) as exit_:
        main(["search", str(space), "--runs-dir", str(tmp_path / "runs"), "--no-live"])
    assert len(calls) == 1 and exit_.value.code == code
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(counts), last
    if code == 4:
        assert "TrainingDiverged: training diverged" in last


def test_our_exceptions_survive_pickling() -> None:
    from stagebudget.modelref import ModelRefError
    from stagebudget.tasks import TaskFileError
    from stagebudget.training.stages.common import TrainingDiverged

    errors = [TrainingDiverged("sft", 0, 3, float("nan")), UserError("x"), RunError("r"),
              BudgetError("b"), ConfigError("bad", source="s.yaml", field="f"),
              ModelRefError("m"), TaskFileError("t")]
    for exc in errors:
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    back = pickle.loads(pickle.dumps(ConfigError("bad", source="s.yaml", field="f")))
    assert (back.source, back.field) == ("s.yaml", "f")


def test_disk_full_before_start_leaves_nothing_and_says_so(tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    """A full disk when run.json is written: one paragraph naming the path, no run directory
    (and no 0-byte study) left to block the name. fsync is where a full disk shows."""
    import errno

    import stagebudget.fileio as fileio
    from stagebudget.cli import main

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    space = _space(tmp_path, trials=1)
    with pytest.raises(OSError) as err:
        run_search(space, name="full", runs_dir=tmp_path / "runs", live=False, trial_fn=FAST)
    assert err.value.errno == errno.ENOSPC and err.value.filename.endswith("run.json")
    assert not (tmp_path / "runs" / "full").exists()
    calls: list[object] = []

    def fast_search(*args, **kwargs):
        calls.append(args)
        return run_search(*args, trial_fn=FAST, **kwargs)

    monkeypatch.setattr("stagebudget.searching.driver.run_search", fast_search)
    with pytest.raises(SystemExit) as exit_:
        main(["search", str(space), "--runs-dir", str(tmp_path / "runs"), "--no-live"])
    assert exit_.value.code == 2
    assert len(calls) == 1  # the CLI ran the patched search
    text = capsys.readouterr().err
    assert "No space left on device" in text and "run.json" in text and "Traceback" not in text


FILL_DRIVER = """
import functools, subprocess, sys, threading, time
from pathlib import Path
from stagebudget.testing.fakes import fake_trial_fn
import stagebudget.searching.driver as search
from stagebudget.cli import main
runs = Path(sys.argv[2])
def fill():  # the disk fills up while the first trial runs
    while not any(runs.glob("*/trials/*/record.json")):
        time.sleep(0.1)
    subprocess.run(["dd", "if=/dev/zero", f"of={runs.parent}/fill", "bs=64k"],
                   stderr=subprocess.DEVNULL)
threading.Thread(target=fill, daemon=True).start()
search.run_search = functools.partial(
    search.run_search, trial_fn=functools.partial(fake_trial_fn, seconds=2.0))
main(["search", sys.argv[1], "--name", "full", "--runs-dir", str(runs), "--no-live"])
"""


def test_disk_full_mid_run_is_one_paragraph_and_resumes(tmp_path: Path) -> None:
    """A real full disk (a 4 MB tmpfs) mid-run. Needs permission to mount; where there is none
    (unprivileged CI) the test says so and skips: it cannot be faked in a Ray worker."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root)")
    try:
        space = _space(tmp_path, trials=4)
        runs = mnt / "runs"
        done = subprocess.run([sys.executable, "-c", FILL_DRIVER, str(space), str(runs)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: the disk holding") and "--resume" in last
        (mnt / "fill").unlink()
        run_search(space, name="full", runs_dir=runs, resume=True, live=False, trial_fn=FAST)
        run = RunDir(runs / "full")
        assert finished_trials(_study(run)) == 4  # interrupted trials ran again
        assert not _study(run).get_trials(states=(State.RUNNING, State.WAITING))
        assert all(r.status in ("COMPLETE", "FAILED") for r in run.records())
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_resume_ends_the_ray_processes_a_killed_driver_left(tmp_path: Path) -> None:
    """`kill -9` of the driver alone leaves Ray's DashboardAgent/RuntimeEnvAgent running; the
    next driver of the run (holding its lock, so the old one is gone) ends them."""
    from stagebudget.searching.raysession import _alive, _uses_session

    space = _space(tmp_path, trials=2)
    runs = tmp_path / "runs"
    run = RunDir(runs / "ctrlc")
    with open(tmp_path / "driver.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(space), str(runs), "3.0"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not (run.trials.is_dir() and any(run.trials.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as `kill -9 PID` does
        proc.wait()
        time.sleep(3)
        session = run.read_meta()["ray_session_dir"]

        def left() -> list[int]:
            return [int(p.name) for p in Path("/proc").iterdir()
                    if p.name.isdigit() and _uses_session(p, session) and _alive(int(p.name))]

        before = left()
        run_search(space, name="ctrlc", runs_dir=runs, resume=True, live=False, trial_fn=FAST)
        assert not [p for p in before if _alive(p)], f"still running: {before}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
