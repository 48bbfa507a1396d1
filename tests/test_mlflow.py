"""MLflow as an option, through Ray's own MLflowLoggerCallback: one MLflow run per trial, named
by trial number, metrics against the global step, tagged with the schedule; read back with the
real MLflow client."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from stagebudget.errors import UserError
from stagebudget.rundir import RunDir
from stagebudget.searching.driver import run_search
from stagebudget.testing.fakes import fake_trial_fn

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


@pytest.mark.slow
def test_search_logs_each_trial_to_mlflow(tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data.update(trials=3, concurrency=1, references=False)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    run_dir = run_search(space, name="mlf", runs_dir=tmp_path / "runs", live=False, mlflow=uri,
                         trial_fn=functools.partial(fake_trial_fn, seconds=0.1))
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["mlflow"] == uri
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])
    numbers = {t.user_attrs["tune_trial_id"]: t.number for t in study.trials}
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mlf")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3
    for record in RunDir(run_dir).records():
        (found,) = [r for r in runs if r.data.tags.get("tune_trial_id") == record.key]
        assert found.info.run_name == f"trial{numbers[record.key]:03d}"
        assert found.data.tags["stagebudget.schedule"]
        assert found.info.status == "FINISHED"
        history = client.get_metric_history(found.info.run_id, "id_accuracy")
        curves = RunDir(run_dir).curves(record.key)
        # the curve points, against the global step (the final report adds the last value again)
        logged = {(m.step, round(m.value, 6)) for m in history}
        if record.reused_from:  # a schedule trained earlier in the run reports its result once
            assert {v for _, v in logged} == {round(curves[-1]["id_accuracy"], 6)}
            continue
        assert logged >= {(r["global_step"], round(r["id_accuracy"], 6)) for r in curves}


def test_mlflow_needs_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    real = builtins.__import__

    def no_mlflow(name: str, *args, **kwargs):
        if name == "mlflow":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(UserError, match="needs MLflow: pip install mlflow"):
        run_search(DEMO, name="x", runs_dir=tmp_path, mlflow="file:///nowhere", live=False)
    assert not any(tmp_path.iterdir())


def test_an_unusable_tracking_uri_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="MLflow cannot use this tracking URI"):
        run_search(DEMO, name="x", runs_dir=tmp_path / "runs", live=False,
                   mlflow=(tmp_path / "mlruns").as_uri())  # MLflow 3 refuses file stores
    assert not (tmp_path / "runs").exists()
