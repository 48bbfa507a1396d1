"""Reading a run (study joined with records) and the ``status`` tables, mid-run included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from fake_run import FRONT, FakeTrial, make_fake_run, standard_error
from stagebudget.errors import RunError
from stagebudget.results.run import Run, ledger_hours, load_run, params_key
from stagebudget.results.status import front_table, render_status
from stagebudget.rundir import RunDir


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return load_run(make_fake_run(tmp_path_factory.mktemp("runs") / "fake", orphan=True))


def rendered(run: Run, width: int = 200) -> str:
    console = Console(record=True, width=width, color_system=None)
    render_status(run, console)
    return console.export_text()


def test_trials_join_records_by_params_in_order(run: Run) -> None:
    views = run.trials()
    numbered = [v for v in views if v.number is not None]
    assert [v.number for v in numbered] == list(range(11))
    assert [v.record.key for v in numbered] == [f"fake_{i:05d}" for i in range(11)]
    by = {v.number: v for v in numbered}
    assert by[6].state == "FAILED" and by[6].error.startswith("RuntimeError")
    assert by[7].state == "RUNNING" and by[7].values == {}
    assert by[2].reference == "heuristic" and by[2].sft_share == 0.25
    assert by[0].sft_share == 1.0 and by[1].sft_share == 0.0
    assert by[3].stage_shares == {"sft": 0.5, "rl": 0.5}
    assert by[3].label == "sft 40@r8 -> rl 20@r16"
    assert by[8].values == {"id_accuracy": 0.92, "ood_accuracy": 0.40}
    assert len(by[7].curves()) == 3  # a running trial shows what it has measured so far
    orphan = [v for v in views if v.number is None]
    assert [v.record.key for v in orphan] == ["orphan"]


def test_front_of_a_half_finished_run(run: Run) -> None:
    front = run.front()
    assert front.front == FRONT and front.knee == 3
    assert front.references == {"sft_only": 0, "rl_only": 1, "heuristic": 2}
    assert front.hypervolume == pytest.approx(0.53)
    assert front.counts["COMPLETE"] == 9 and front.counts["FAILED"] == 1
    assert set(front.curves) == set(FRONT) | set(front.references.values())  # + references
    assert front.curves[3].boundaries[0][1] == "sft → rl"


def test_params_key_and_ledger() -> None:
    assert params_key({"a": 32, "b": 0.1 + 0.2}) == params_key({"b": 0.3, "a": 32.0})
    assert ledger_hours({"device_hours": 2.0, "train_seconds": 7200}) == 2.0
    assert ledger_hours({"train_seconds": 7200}) is None  # only what BudgetClock.ledger writes
    assert ledger_hours({}) is None


def test_status_table(run: Run) -> None:
    text = rendered(run)
    assert "9 complete, 2 running, 1 failed" in text
    assert "budget 0.012 device-hours per trial" in text
    assert "sft 40@r8 -> rl 20@r16" in text and "✓ knee" in text
    assert "RuntimeError: CUDA out of memory" in text and "Traceback" not in text
    assert "Pareto front (4 of 9 completed)" in text
    assert "hypervolume 0.5300 (reference point 0, 0); knee: trial 3" in text
    assert "heuristic" in text
    assert rendered(run, width=90)  # narrow terminals still render


def test_front_table_three_objectives(tmp_path: Path) -> None:
    run = load_run(make_fake_run(tmp_path / "r3", device_hours=True))
    console = Console(record=True, width=160, color_system=None)
    console.print(front_table(run.front(curves=False)))
    text = console.export_text()
    assert "device_hours ↓" in text and "id_accuracy ↑" in text


def test_status_before_any_trial_completes(tmp_path: Path) -> None:
    run = load_run(make_fake_run(tmp_path / "r", trials=(FakeTrial(0.5, 8, 4, state="RUNNING"),)))
    text = rendered(run)
    assert "0 complete, 1 running" in text and "no completed trial yet" in text


def test_moved_run_directory_finds_its_study(tmp_path: Path) -> None:
    make_fake_run(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert load_run(tmp_path / "b").front(curves=False).front == FRONT


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunError, match="not a stagebudget run directory"):
        load_run(tmp_path / "plain")
    root = make_fake_run(tmp_path / "r")
    meta = json.loads((root / "run.json").read_text())
    (root / "run.json").write_text(json.dumps({**meta, "study_name": "other"}))
    with pytest.raises(RunError, match=r"study 'other' .* studies there: 'fake-study'"):
        load_run(root)
    (root / "run.json").write_text(json.dumps({**meta, "objectives": meta["objectives"][:1]}))
    with pytest.raises(RunError, match="lists 1 objectives but the study"):
        load_run(root)
    (root / "study.db").unlink()
    (root / "run.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match="does not exist"):
        load_run(root)
    assert not (root / "study.db").exists()  # never created empty


def test_a_trial_cut_before_it_started_does_not_take_its_retrys_record(tmp_path: Path) -> None:
    """A trial asked but killed before it wrote a record and its retry share params: the Ray
    trial id, not the params, joins the retry to its record (export of the knee failed)."""
    import optuna

    from stagebudget.names import COMPLETE, TUNE_ID_ATTR
    from stagebudget.rundir import RunDir, TrialRecord

    dist = {"sft.share": optuna.distributions.FloatDistribution(0, 1)}
    study = optuna.create_study(directions=["maximize", "maximize"])
    cut = study.ask(dist)
    cut.set_user_attr(TUNE_ID_ATTR, "cut")
    study.tell(cut, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({"sft.share": cut.params["sft.share"]})
    retry = study.ask(dist)
    retry.set_user_attr(TUNE_ID_ATTR, "retry")
    study.tell(retry, [0.5, 0.5])
    run_dir = RunDir(tmp_path)
    run_dir.write_record(TrialRecord(key="retry", params=dict(retry.params), schedule={},
                                     status=COMPLETE))
    meta = json.loads(json.dumps({"objectives": [{"name": "id_accuracy", "direction": "maximize"},
                                                 {"name": "ood_accuracy", "direction": "maximize"}]}))
    views = Run(tmp_path, meta, study).trials()
    assert [(v.number, v.record.key if v.record else None) for v in views] == [
        (0, None), (1, "retry")]


# --- issue 21: labels that tell trials apart, the planned nominal cost, status --json ---------
LR_TRIALS = (FakeTrial(1.0, 32, 4, values=(0.838, 0.348), sft_lr=1e-3),
             FakeTrial(1.0, 32, 4, values=(0.828, 0.256), sft_lr=3e-3),
             FakeTrial(0.5, 32, 4, state="RUNNING", sft_lr=1e-3))


def test_status_labels_trials_that_differ_only_in_learning_rate_apart(tmp_path: Path) -> None:
    run = load_run(make_fake_run(tmp_path / "lr", trials=LR_TRIALS))
    labels = [r.schedule for r in run.status_rows()]
    assert labels == ["sft 80@r32 lr=1e-3", "sft 80@r32 lr=3e-3",
                      "sft 40@r32 lr=1e-3 -> rl 20@r4"]
    text = rendered(run)
    assert "sft 80@r32 lr=1e-3" in text and "sft 80@r32 lr=3e-3" in text
    assert "bs=" not in text  # the same for every trial: left out
    front = run.front(curves=False)
    assert [p.label for p in front.points.values()] == labels[:2]  # the report's labels


def test_tensorboard_run_names_label_trials_as_status_does(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from stagebudget.searching.tune_adapter import TensorBoardCurves

    root = make_fake_run(tmp_path / "lr", trials=LR_TRIALS)
    views = load_run(root).trials()
    search = SimpleNamespace(_ot_trials={v.record.key: SimpleNamespace(
        number=v.number, params=v.params) for v in views})
    curves = TensorBoardCurves(root, search)  # type: ignore[arg-type]
    assert [curves._label(v.record.key) for v in views] == [
        f"trial{v.number:03d} {v.label}" for v in views]


def _planned_but_slow(root: Path) -> Path:
    """Records as a loaded machine writes them: planned within the budget, measured over it."""
    run_dir = RunDir(root)
    for rec in run_dir.records():
        if rec.status == "COMPLETE":
            rec.planned_device_hours = 0.0115
            rec.ledger = {**rec.ledger, "device_hours": 0.02, "train_seconds": 72.0,
                          "spent_device_hours": 0.02}
            run_dir.write_record(rec)
    return root


def test_nominal_cost_is_the_planned_cost_with_measured_seconds_beside(tmp_path: Path) -> None:
    run = load_run(_planned_but_slow(make_fake_run(tmp_path / "slow")))
    row = next(r for r in run.status_rows() if r.number == 3)
    assert row.planned_hours == 0.0115 and row.planned_hours <= run.per_trial_hours
    assert row.measured_seconds == pytest.approx(72.0)
    text = rendered(run, width=240)
    assert "nominal dev-h" in text and "(planned)" in text and "measured" in text
    assert "0.0115" in text and "72.0" in text
    assert "0.1035 device-hours nominal (planned by the cost model" in text  # 9 x 0.0115
    assert "0.1800 measured" in text


def test_planned_cost_of_older_records_comes_from_their_ledger() -> None:
    from stagebudget.rundir import TrialRecord, planned_hours

    old = TrialRecord.from_dict({"key": "a", "params": {}, "status": "COMPLETE",
                                 "schedule": {"stages": [{"kind": "sft"}, {"kind": "rl"}]},
                                 "ledger": {"device_hours": 0.02, "stages": [
                                     {"planned_seconds": 30.0}, {"planned_seconds": 12.0}]}})
    assert old.planned_device_hours is None and planned_hours(old) == pytest.approx(42 / 3600)
    cut = TrialRecord(key="b", params={}, schedule=old.schedule,
                      ledger={"stages": [{"planned_seconds": 30.0}]})  # pruned after one stage
    assert planned_hours(cut) is None
    assert planned_hours(TrialRecord(key="c", params={}, schedule={})) is None


# `stagebudget status RUN --json` in its own process; then, on stderr, the heavy modules loaded
STATUS_JSON = ("import sys; from stagebudget.cli import app; app(sys.argv[1:], "
               "standalone_mode=False); sys.stderr.write('heavy=' + ','.join(m for m in "
               "('torch', 'ray', 'trl', 'plotly') if m in sys.modules))")


def _status_json(root: Path) -> tuple[dict, str]:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", STATUS_JSON, "status", str(root), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.rstrip().endswith("heavy=")  # the read side stays light
    return json.loads(result.stdout), result.stderr


def test_status_json_on_a_half_finished_run(tmp_path: Path) -> None:
    root = _planned_but_slow(make_fake_run(tmp_path / "fake", orphan=True,
                                           standard_errors=True))
    (root / "trials" / "broken").mkdir()
    (root / "trials" / "broken" / "record.json").write_text("{trunc")
    doc, stderr = _status_json(root)  # stdout parses as JSON: nothing else is printed there
    assert "corrupted trial record" in stderr
    assert doc["name"] == "fake" and doc["counts"]["COMPLETE"] == 9
    assert doc["front"]["trials"] == FRONT and doc["front"]["knee"] == 3
    trials = {t["number"]: t for t in doc["trials"]}
    knee = trials[3]
    assert knee["label"] == "sft 40@r8 -> rl 20@r16" and knee["state"] == "COMPLETE"
    assert knee["params"] == {"sft.share": 0.5, "sft.lora_rank": 8, "rl.lora_rank": 16}
    assert [s["kind"] for s in knee["stages"]] == ["sft", "rl"]
    assert knee["stages"][0]["steps"] == 40 and knee["stages"][0]["learning_rate"] == 5e-4
    assert knee["objectives"]["id_accuracy"] == {"value": 0.85, "se": standard_error(0.85)}
    assert knee["nominal_device_hours"] == 0.0115
    assert knee["measured_device_seconds"] == pytest.approx(72.0)
    assert knee["spent_device_hours"] == 0.02 and knee["on_front"] and knee["knee"]
    assert trials[6]["state"] == "FAILED" and trials[6]["note"].startswith("RuntimeError")
    assert trials[7]["state"] == "RUNNING" and trials[7]["objectives"]["id_accuracy"] == {
        "value": None, "se": None}
    assert trials[None]["key"] == "orphan"
    assert doc["cost"]["nominal_device_hours"] == pytest.approx(9 * 0.0115)


def test_status_json_before_any_trial_completes(tmp_path: Path) -> None:
    root = make_fake_run(tmp_path / "r", trials=(FakeTrial(0.5, 8, 4, state="RUNNING"),))
    doc, _ = _status_json(root)
    assert doc["front"] is None and [t["state"] for t in doc["trials"]] == ["RUNNING"]


def test_a_twin_told_a_trained_result_is_counted_apart(tmp_path: Path) -> None:
    """A twin (a COMPLETE trial told an earlier trial's result) took no trial slot: status and
    the search's last line count it apart, so 12 requested never reads "13 complete"."""
    from stagebudget.rundir import RunDir, SearchOutcome

    root = make_fake_run(tmp_path / "r")
    dir_ = RunDir(root)
    twin = next(r for r in dir_.records() if r.status == "COMPLETE")
    twin.reused_from = "someone"
    dir_.write_record(twin)
    text = rendered(load_run(root))
    assert "8 complete (+1 told a trained twin's result), 1 running, 1 failed" in text
    outcome = SearchOutcome.of(dir_.records())
    assert (outcome.complete, outcome.twins) == (8, 1)
    assert outcome.line().startswith("trials: 8 complete (+1 told a trained twin's result), ")
