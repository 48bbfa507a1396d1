"""Curves reach TensorBoard: per-trial event files in RUN/tensorboard/, named by trial number and
schedule, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import optuna
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stagebudget.results.run import load_run
from stagebudget.rundir import RunDir
from stagebudget.searching.driver import run_search
from stagebudget.searching.tbcurves import run_folder, run_label, write_trial_events
from stagebudget.testing.fakes import fake_trial_fn

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def _scalars(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def test_rows_become_scalars_against_step_and_device_seconds(tmp_path: Path) -> None:
    rows = [{"global_step": 0, "device_seconds": 0.0, "id_accuracy": 0.1, "ood_accuracy": 0.5},
            {"global_step": 40, "device_seconds": 12.5, "id_accuracy": 0.7, "ood_accuracy": 0.4,
             "train_loss": 0.3},
            {"global_step": 60, "device_seconds": 30.0, "id_accuracy": 0.8, "ood_accuracy": 0.45,
             "reward": 0.6},
            {"stage": "no step: ignored", "id_accuracy": 0.99}]
    folder = write_trial_events(tmp_path, run_label(3, "sft 40@r32 -> rl 20@r4", "heuristic"), rows)
    assert folder.name == "trial003 sft 40@r32 → rl 20@r4 (heuristic)"
    scalars = _scalars(folder)
    assert scalars["id_accuracy"] == [(0, 0.0, pytest.approx(0.1)), (40, 12.5, pytest.approx(0.7)),
                                      (60, 30.0, pytest.approx(0.8))]
    assert [s for s, _, _ in scalars["train_loss"]] == [40]
    assert [(s, w) for s, w, _ in scalars["reward"]] == [(60, 30.0)]
    assert [v for _, _, v in scalars["device_seconds"]] == [0.0, 12.5, 30.0]


def test_run_folder_is_a_plain_name() -> None:
    assert "/" not in run_folder("trial001 a/b -> c")


@pytest.mark.slow
def test_search_writes_one_event_run_per_trial(tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data.update(trials=4, concurrency=2)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    run_dir = run_search(space, name="tb", runs_dir=tmp_path / "runs", live=False,
                         trial_fn=functools.partial(fake_trial_fn, seconds=0.1))
    meta = json.loads((run_dir / "run.json").read_text())
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])
    by_key = {t.user_attrs["tune_trial_id"]: t.number for t in study.trials}
    labels = {v.record.key: v.label for v in load_run(run_dir).trials() if v.record is not None}
    assert all("lr=" in label for label in labels.values() if label.startswith("sft"))
    folders = sorted(p for p in (run_dir / "tensorboard").iterdir() if p.is_dir())
    assert len(folders) == 4
    for record in RunDir(run_dir).records():
        # named as `status` labels the trial (the searched SFT learning rate included)
        label = run_label(by_key[record.key], labels[record.key], record.reference)
        folder = run_dir / "tensorboard" / run_folder(label)
        assert folder in folders, (folder, folders)
        scalars = _scalars(folder)
        curves = RunDir(run_dir).curves(record.key)
        assert [(s, w) for s, w, _ in scalars["id_accuracy"]] == [
            (r["global_step"], pytest.approx(r["device_seconds"])) for r in curves]
        assert [v for _, _, v in scalars["ood_accuracy"]] == pytest.approx(
            [r["ood_accuracy"] for r in curves])
        assert scalars["train_loss"]
