"""The study reads well in Optuna's own tools: metric names, trial and study attributes, checked
through Optuna's API and through a real optuna-dashboard served on loopback."""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from stagebudget import __version__
from stagebudget.rundir import TrialRecord, steps_ran, steps_text
from stagebudget.searching.driver import run_search
from stagebudget.searching.study_attrs import trial_attrs
from stagebudget.testing.fakes import fake_trial_fn

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
NAMES = ["id_accuracy", "ood_accuracy"]
TRIAL_KEYS = {"schedule", "steps_ran", "learning_rates", "device_hours", "id_accuracy_se",
              "ood_accuracy_se", "record"}


def test_trial_attrs_from_a_record() -> None:
    schedule = {"stages": [{"kind": "sft", "steps": 40, "lora_rank": 32},
                           {"kind": "rl", "steps": 20, "lora_rank": 4}], "budget_hours": 0.01}
    record = TrialRecord(key="t1", params={}, schedule=schedule, status="COMPLETE",
                         reference="heuristic",
                         objectives={"id_accuracy": 0.8, "ood_accuracy": 0.5,
                                     "device_hours": 0.01, "id_accuracy_se": 0.028},
                         ledger={"stages": [{"steps_done": 40}, {"steps_done": 18}]})
    attrs = trial_attrs(record)
    assert attrs["schedule"] == "sft 40@r32 -> rl 20@r4"
    assert attrs["steps_ran"] == "sft 40/40, rl 18/20"
    assert attrs["reference"] == "heuristic" and attrs["id_accuracy_se"] == 0.028
    assert "ood_accuracy_se" not in attrs  # absent in the record: left out, not invented
    assert "planned_device_hours" not in attrs  # a ledger without plans: none invented
    record.planned_device_hours = 0.0095
    assert trial_attrs(record)["planned_device_hours"] == 0.0095  # the nominal cost
    assert steps_text(steps_ran(schedule, {})) == "sft 40/40, rl 20/20"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _serve(storage: str, port: int, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("optuna-dashboard")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), storage, "--host", "127.0.0.1", "--port", str(port),
                                 "--server", "wsgiref", "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(f"http://127.0.0.1:{port}/api/meta")
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"optuna-dashboard did not start:\n{log.read_text()}") from None
            time.sleep(0.3)


def _attrs(items: list[dict[str, str]]) -> dict[str, str]:
    return {a["key"]: a["value"] for a in items}


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("studyinfo")
    data = yaml.safe_load(DEMO.read_text())
    data.update(trials=4, concurrency=2)
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    run_dir = run_search(space, name="dash", runs_dir=tmp / "runs", live=False,
                         trial_fn=functools.partial(fake_trial_fn, seconds=0.1, se=True))
    return run_dir, json.loads((run_dir / "run.json").read_text())


def test_study_carries_names_and_attributes(searched: tuple[Path, dict[str, Any]]) -> None:
    run_dir, meta = searched
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])
    assert study.metric_names[:2] == NAMES
    assert study.user_attrs["stagebudget_version"] == __version__
    assert study.user_attrs["run_dir"] == str(run_dir.resolve())
    assert study.user_attrs["space"] == "demo" and study.user_attrs["searched"]
    assert meta["command"]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    for t in complete:
        assert t.user_attrs.keys() >= TRIAL_KEYS, t.user_attrs
        assert "->" in t.user_attrs["schedule"] or "@r" in t.user_attrs["schedule"]
    assert {t.user_attrs.get("reference") for t in complete} >= {"sft_only", "rl_only", "heuristic"}


def test_optuna_dashboard_shows_names_and_attributes(searched: tuple[Path, dict[str, Any]],
                                                     tmp_path: Path) -> None:
    run_dir, meta = searched
    port = _free_port()
    proc = _serve(meta["storage"], port, tmp_path / "dashboard.log")
    try:
        studies = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == meta["study_name"]]
        assert _attrs(summary["user_attrs"])["stagebudget_version"] == __version__
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert detail["objective_names"][:2] == NAMES
    assert _attrs(detail["user_attrs"])["run_dir"] == str(run_dir.resolve())
    assert {a["key"] for a in detail["union_user_attrs"]} >= TRIAL_KEYS
    for trial in detail["trials"]:
        attrs = _attrs(trial["user_attrs"])
        assert attrs.keys() >= TRIAL_KEYS, attrs
        assert float(attrs["id_accuracy_se"]) > 0
    assert detail["best_trials"]  # the Pareto front, as the dashboard computes it
