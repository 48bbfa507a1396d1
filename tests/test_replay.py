"""The replay backend: a search whose trials look their results up in a table made by really
training every schedule of a grid (bench/grid_table.py)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stagebudget.schedule import Schedule, StageSpec
from stagebudget.searching.replay import ReplayMiss, load_table, mean_values, replay_key, replay_trial

ROOT = Path(__file__).resolve().parents[1]


def _row(schedule: Schedule, seed: int, id_acc: float, ood: float) -> dict:
    return {"schedule": schedule.model_copy(update={"seed": seed}).to_dict(), "seed": seed,
            "id_accuracy": id_acc, "ood_accuracy": ood, "id_accuracy_se": 0.01,
            "ood_accuracy_se": 0.02, "nominal_device_hours": 0.004,
            "spent_device_hours": 0.001}


def test_a_lookup_draws_a_seed_reproducibly_and_a_miss_is_named(tmp_path):
    sft = Schedule(stages=(StageSpec(kind="sft", steps=10),))
    table = tmp_path / "table.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in (
        _row(sft, 0, 0.5, 0.4), _row(sft, 1, 0.7, 0.2))) + "\n")
    draws = {replay_trial(sft, tmp_path / f"run{i}" / "trials" / "t", table=str(table)).id_accuracy
             for i in range(20)}
    assert draws == {0.5, 0.7}  # both seeds are drawn, over runs
    again = replay_trial(sft, tmp_path / "run3" / "trials" / "t", table=str(table))
    assert again.id_accuracy == replay_trial(sft, tmp_path / "run3" / "trials" / "u",
                                             table=str(table)).id_accuracy
    assert again.objectives()["ood_accuracy_se"] == 0.02
    assert again.ledger["spent_device_hours"] == 0.004  # charged as if trained alone
    assert mean_values(load_table(str(table)))[replay_key(sft.to_dict())] == pytest.approx(
        (0.6, 0.3))
    other = Schedule(stages=(StageSpec(kind="sft", steps=11),))
    with pytest.raises(ReplayMiss, match="not in the replay table"):
        replay_trial(other, table=str(table))


def _curve(index: int, kind: str, step: int, planned: float, id_acc: float, ood: float) -> dict:
    return {"stage": kind, "stage_index": index, "step": step, "planned_seconds": planned,
            "device_seconds": planned * 0.9, "id_accuracy": id_acc, "ood_accuracy": ood,
            "id_accuracy_se": 0.01, "ood_accuracy_se": 0.01}


def test_early_stopping_prunes_a_replayed_trial_at_its_stage_end_and_charges_the_spend(tmp_path):
    """A row with curves replays them: each stage's end row goes to ``stage_end``, so the
    early-stopping gate decides as in a real trial, and a pruned trial is charged the nominal
    seconds up to the boundary."""
    from stagebudget.searching.earlystop import StageGate
    from stagebudget.searching.earlystop import StagePruned as TrialPruned

    weak = Schedule(stages=(StageSpec(kind="sft", steps=10), StageSpec(kind="rl", steps=5)))
    table = tmp_path / "table.jsonl"
    row = {**_row(weak, 0, 0.6, 0.5), "curves": [
        _curve(0, "sft", 0, 0.0, 0.4, 0.4), _curve(0, "sft", 10, 20.0, 0.45, 0.35),
        _curve(1, "rl", 5, 36.0, 0.6, 0.5)]}
    table.write_text(json.dumps(row) + "\n")
    directions = {"id_accuracy": "maximize", "ood_accuracy": "maximize"}
    out = tmp_path / "run" / "trials" / "t1"
    result = replay_trial(weak, out, table=str(table), stage_end=StageGate(directions, 2.0))
    assert [json.loads(line)["planned_seconds"] for line in
            (out / "curves.jsonl").read_text().splitlines()] == [0.0, 20.0, 36.0]
    assert result.id_accuracy == 0.6
    strong = {"done": [_curve(0, "sft", 12, 18.0, 0.6, 0.5)]}  # far ahead at 18 s <= 20 s
    out = tmp_path / "run" / "trials" / "t2"
    with pytest.raises(TrialPruned, match="trial done"):
        replay_trial(weak, out, table=str(table),
                     stage_end=StageGate(directions, 2.0, completed=strong))
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["spent_device_hours"] == pytest.approx(18.0 / 3600)  # 0.9 x 20 planned s


@pytest.mark.slow
def test_a_grid_table_replays_through_the_real_search(tmp_path, tiny_base):
    """Train a 2 x 2 grid for real (grid_table.py), then run a search whose trials are looked
    up in it: every trial completes with a table row's values, in seconds per trial."""
    from stagebudget.names import COMPLETE
    from stagebudget.rundir import RunDir
    from stagebudget.searching.driver import run_search

    space = tmp_path / "grid.yaml"
    space.write_text(yaml.safe_dump({
        "name": "grid", "base_model": str(tiny_base),
        "tasks": {"source": "builtin", "n_train": 100, "n_id_test": 10, "n_ood_test": 10},
        "budget": {"per_trial_hours": 0.0015}, "references": False,
        "stages": {"sft": {"share": {"type": "categorical", "choices": [0.25, 0.75]},
                           "lora_rank": 8, "batch_size": 8, "eval_interval": 10},
                   "rl": {"share": "rest", "lora_rank": {"type": "categorical", "choices": [2, 4]},
                          "batch_size": 4, "num_generations": 4, "eval_interval": 10}},
        "sampler": {"name": "grid", "seed": 0}, "trials": 4, "concurrency": 1}))
    table = tmp_path / "table.jsonl"
    subprocess.run([sys.executable, str(ROOT / "bench" / "grid_table.py"), "--space", str(space),
                    "--seeds", "0", "1", "--out", str(table)], check=True, cwd=tmp_path)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert len(rows) == 8 and {r["seed"] for r in rows} == {0, 1}
    # the second seed's RL stages start from nothing shared, but each seed's schedules share SFT
    assert sum(r["spent_device_hours"] for r in rows) < sum(r["nominal_device_hours"]
                                                            for r in rows)
    run = run_search(space, name="replayed", runs_dir=tmp_path / "runs", live=False,
                     trial_fn=functools.partial(replay_trial, table=str(table)))
    by_key: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        by_key.setdefault(replay_key(r["schedule"]), []).append(
            (r["id_accuracy"], r["ood_accuracy"]))
    records = RunDir(run).records()
    assert len(records) == 4
    for record in records:
        assert record.status == COMPLETE, record.error
        got = (record.objectives["id_accuracy"], record.objectives["ood_accuracy"])
        assert got in by_key[replay_key(record.schedule)]
    # every row carries its trial's curve, with the planned budget point of each measurement
    assert all(r["curves"] and all("planned_seconds" in c for c in r["curves"]) for r in rows)
