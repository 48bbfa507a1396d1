"""A search trial re-trained from its export reproduces bit for bit: the trial's torch thread
count (CPU float sums depend on it) is recorded, exported, and used by `stagebudget train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stagebudget.names import ID_ACCURACY, OOD_ACCURACY
from stagebudget.results.export import export, exported_threads
from stagebudget.results.run import load_run
from stagebudget.rundir import RunDir
from stagebudget.searching.driver import run_search

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def _one_trial_space(tmp_path: Path) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data.update(base_model="builtin:test", trials=1, concurrency=1, references=False,
                tasks={"source": "builtin", "n_train": 200, "n_id_test": 40, "n_ood_test": 40},
                budget={"per_trial_hours": 0.002})
    data["stages"]["sft"].update(eval_interval=10, batch_size=16)
    data["stages"]["rl"].update(eval_interval=10, batch_size=4, num_generations=4)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    return space


@pytest.mark.slow
def test_train_on_an_export_reproduces_the_search_trial(tiny_base: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGEBUDGET_CACHE", str(tiny_base.parent))  # Ray workers inherit it
    run_dir = run_search(_one_trial_space(tmp_path), name="one", runs_dir=tmp_path / "runs",
                         live=False)
    [record] = RunDir(run_dir).records()
    assert record.status == "COMPLETE", record.error
    assert record.torch_threads == 1  # resources_per_trial.cpu = 1
    out = export(load_run(run_dir), "max-id", tmp_path / "best.yaml")
    assert exported_threads(out) == 1
    assert "TORCH_THREADS = 1" in out.with_suffix(".py").read_text()
    # `train` in a fresh process with torch's default thread count (every core here)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    res = subprocess.run([sys.executable, "-m", "stagebudget.cli", "train", str(out), "-o",
                          str(tmp_path / "trained"), "--device", "cpu", "--no-save"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "torch threads: 1" in res.stdout
    got = json.loads((tmp_path / "trained" / "metrics.json").read_text())["objectives"]
    for key in (ID_ACCURACY, OOD_ACCURACY):
        assert got[key] == record.objectives[key], (key, got, record.objectives)
    # builtin:test scores near 0, so the losses and rewards at every point are compared too
    trial_curve = _curve(RunDir(run_dir).curves(record.key))
    assert any(row[2] for row in trial_curve)  # a training loss was measured
    trained = (tmp_path / "trained" / "curves.jsonl").read_text().splitlines()
    assert _curve([json.loads(line) for line in trained]) == trial_curve


def _curve(rows: list[dict]) -> list[tuple]:
    keys = ("stage", "step", "train_loss", "reward", ID_ACCURACY, OOD_ACCURACY)
    return [tuple(row.get(k) for k in keys) for row in rows]


def test_exported_threads_must_be_a_positive_integer(tmp_path: Path) -> None:
    from stagebudget.errors import UserError

    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump({"schedule": {"stages": []}}))
    assert exported_threads(path) is None
    for bad in (0, "two", True, 1.5):
        path.write_text(yaml.safe_dump({"schedule": {"stages": []}, "torch_threads": bad}))
        with pytest.raises(UserError, match="torch_threads"):
            exported_threads(path)
