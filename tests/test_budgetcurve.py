"""The budget curve (issue 26): every evaluated checkpoint of a trial is a re-trainable schedule
with a planned cost; per budget fraction, the front of those that fit.

Unit tests read a run written by a real `run_search` (real Ray, Optuna and records, fake
trials); the slow test beside them trains a real search and re-trains a checkpoint cut inside
its RL stage (after SFT) from `export --max-budget`, in a fresh `stagebudget train`."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from runhelpers import demo_space
from stagebudget.cli import app
from stagebudget.errors import UserError
from stagebudget.names import ID_ACCURACY, OOD_ACCURACY
from stagebudget.results.budgetcurve import (
    budget_curve,
    checkpoint_candidates,
    cut_schedule,
    hypervolume_se,
    parse_budget,
)
from stagebudget.results.export import export
from stagebudget.results.report import write_report
from stagebudget.results.run import load_run
from stagebudget.results.status import render_status, status_document
from stagebudget.rundir import RunDir
from stagebudget.schedule import Schedule
from stagebudget.searching.driver import run_search
from stagebudget.testing.fakes import fake_trial_fn

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("budget_run")
    return run_search(demo_space(tmp, trials=5, concurrency=1), name="bc", runs_dir=tmp / "runs",
                      live=False, trial_fn=functools.partial(fake_trial_fn, seconds=0.05))


def test_every_checkpoint_is_a_cut_schedule_with_its_curve_point(real_run: Path) -> None:
    run = load_run(real_run)
    views = run.trials()
    candidates = checkpoint_candidates(views)
    by_number = {v.number: v for v in views}
    assert len(candidates) > len(views)  # intermediate points, not only the trials' ends
    for c in candidates:
        view = by_number[c.trial]
        assert view.schedule is not None
        cut = Schedule.from_dict(c.schedule)
        assert cut.stages[:-1] == view.schedule.stages[:c.stage_index]
        assert cut.stages[-1].steps == c.step and cut.stages[-1].kind == c.stage
        row = next(r for r in view.curves()
                   if r["stage_index"] == c.stage_index and r["step"] == c.step)
        assert c.values == {ID_ACCURACY: row[ID_ACCURACY], OOD_ACCURACY: row[OOD_ACCURACY]}
        assert c.planned_hours == pytest.approx(row["planned_seconds"] / 3600)
    ends = [c for c in candidates if c.final]
    assert {c.trial for c in ends} == {v.number for v in views}  # every trial's own end
    for c in ends:
        assert c.values[ID_ACCURACY] == by_number[c.trial].values[ID_ACCURACY]


def test_the_curve_grows_with_budget_and_reaches_the_trials_front(real_run: Path) -> None:
    run = load_run(real_run)
    curve = budget_curve(run)
    assert curve is not None
    hvs = [p.hypervolume for p in curve.points]
    assert hvs == sorted(hvs)  # more budget never buys less
    assert [p.fitting for p in curve.points] == sorted(p.fitting for p in curve.points)
    full = curve.full
    assert full.fraction == 1.0 and full.fitting == len(curve.candidates)
    assert full.hypervolume >= run.front(curves=False).hypervolume - 1e-12
    assert curve.trial_hypervolume == pytest.approx(run.front(curves=False).hypervolume)
    for p in curve.points:
        assert all(c.planned_hours <= p.hours * (1 + 1e-9)
                   for c in curve.candidates if c.number in p.front.points)
        if p.best_id is not None:
            assert p.best_id.values[OOD_ACCURACY] >= curve.ood_floor - 1e-12
    keep = curve.smallest_fraction_keeping()
    assert keep is not None and curve.points[[p.fraction for p in curve.points].index(keep)] \
        .hypervolume >= 0.95 * full.hypervolume


def test_status_report_and_json_show_the_curve(real_run: Path, tmp_path: Path) -> None:
    run = load_run(real_run)
    console = Console(record=True, width=220)
    render_status(run, console)
    text = console.export_text()
    assert "what a smaller budget buys" in text and "1/2" in text and "3/4" in text
    doc = status_document(run)["budget_curve"]
    assert [p["fraction"] for p in doc["points"]] == [k / 8 for k in range(1, 9)]
    json.dumps(doc, allow_nan=False)
    html = write_report(run, tmp_path / "r.html").read_text()
    assert "fig-budget_fronts" in html and "fig-budget_hypervolume" in html


def test_export_at_half_the_budget_writes_the_cut_schedule(real_run: Path, tmp_path: Path) -> None:
    run = load_run(real_run)
    out = export(run, "knee", tmp_path / "half.yaml", max_budget="0.5")
    doc = yaml.safe_load(out.read_text())
    schedule = Schedule.from_dict(doc["schedule"])
    assert doc["source"]["max_budget_fraction"] == 0.5
    assert doc["objectives"]["planned_device_hours"] <= 0.5 * run.per_trial_hours * (1 + 1e-9)
    assert [s["args"]["max_steps"] for s in doc["trl"]] == [s.steps for s in schedule.stages]
    assert schedule.stages[-1].steps == doc["source"]["checkpoint"]["step"]
    assert "max_steps" in out.with_suffix(".py").read_text()
    res = CliRunner().invoke(app, ["export", str(real_run), "--max-budget", "2", "-o",
                                   str(tmp_path / "x.yaml")])
    assert isinstance(res.exception, UserError) and "not in (0, 1]" in str(res.exception)
    assert not (tmp_path / "x.yaml").exists()


def test_budget_text_forms() -> None:
    assert parse_budget("0.5", 0.012) == pytest.approx(0.006)
    assert parse_budget("1/4", 0.012) == pytest.approx(0.003)
    assert parse_budget("50%", 0.012) == pytest.approx(0.006)
    assert parse_budget("0.006h", None) == 0.006
    for bad in ("0", "-1", "abc", "1/0", "0h", "nanh"):
        with pytest.raises(UserError, match="--max-budget"):
            parse_budget(bad, 0.012)
    with pytest.raises(UserError, match="device-hours instead"):
        parse_budget("0.5", None)


def test_cut_schedule_refuses_a_step_the_stage_does_not_have() -> None:
    s = Schedule.from_dict({"stages": [{"kind": "sft", "steps": 10}, {"kind": "rl", "steps": 5}]})
    assert cut_schedule(s, 1, 5) == s
    with pytest.raises(ValueError):
        cut_schedule(s, 1, 6)


def test_hypervolume_se_is_the_delta_method(real_run: Path) -> None:
    from stagebudget.pareto import TrialPoint, compute_front

    pts = [TrialPoint(number=0, values=(0.5, 0.5), errors={ID_ACCURACY: 0.01, OOD_ACCURACY: 0.02})]
    front = compute_front(pts, (ID_ACCURACY, OOD_ACCURACY), ("maximize", "maximize"), (0.0, 0.0))
    # hv = x * y: d/dx = y = .5, d/dy = x = .5
    assert hypervolume_se(front) == pytest.approx(((0.5 * 0.01) ** 2 + (0.5 * 0.02) ** 2) ** 0.5)


@pytest.mark.slow
def test_a_checkpoint_inside_rl_after_sft_retrains_to_its_curve_point(
        tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGEBUDGET_CACHE", str(tiny_base.parent))
    # a prefix cache of its own: its stages must not be replayed into other tests' trials,
    # whose curves would then show this test's evaluation steps
    monkeypatch.setenv("STAGEBUDGET_PREFIX_CACHE", str(tmp_path / "prefix_cache"))
    data = yaml.safe_load(DEMO.read_text())
    data.update(base_model="builtin:test", trials=1, concurrency=1, references=False,
                tasks={"source": "builtin", "n_train": 200, "n_id_test": 40, "n_ood_test": 40},
                budget={"per_trial_hours": 0.002})
    data["stages"]["sft"].update(share=0.5, lora_rank=16, eval_interval=10, batch_size=16)
    data["stages"]["rl"].update(eval_interval=10, batch_size=4, num_generations=4)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    run_dir = run_search(space, name="cut", runs_dir=tmp_path / "runs", live=False)
    [record] = RunDir(run_dir).records()
    assert record.status == "COMPLETE", record.error
    run = load_run(run_dir)
    inner = [c for c in checkpoint_candidates(run.trials()) if c.stage == "rl" and not c.final]
    assert inner, "the RL stage has an evaluation before its end"
    cand = inner[0]
    assert [s["kind"] for s in cand.schedule["stages"]] == ["sft", "rl"]
    out = export(run, "trial=0", tmp_path / "cut.yaml", max_budget=f"{cand.planned_hours!r}h")
    doc = yaml.safe_load(out.read_text())
    assert doc["source"]["checkpoint"]["step"] == cand.step
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    res = subprocess.run([sys.executable, "-m", "stagebudget.cli", "train", str(out), "-o",
                          str(tmp_path / "trained"), "--device", "cpu", "--no-save"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert {k: got["objectives"][k] for k in cand.values} == cand.values
    assert got["planned_device_hours"] == pytest.approx(cand.planned_hours)
    # builtin:test scores near 0, so every loss and reward up to the cut is compared too
    keys = ("stage", "stage_index", "step", "train_loss", "reward", ID_ACCURACY, OOD_ACCURACY)
    trial = [tuple(r.get(k) for k in keys) for r in RunDir(run_dir).curves(record.key)
             if (r["stage_index"], r["step"]) <= (cand.stage_index, cand.step)]
    rows = (tmp_path / "trained" / "curves.jsonl").read_text().splitlines()
    assert [tuple(json.loads(line).get(k) for k in keys) for line in rows] == trial


def test_a_search_over_id_ood_and_planned_device_hours(tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data.update(trials=6, concurrency=1, references=False,
                objectives=[{"name": "id_accuracy"}, {"name": "ood_accuracy"},
                            {"name": "device_hours"}])
    data["stages"]["sft"]["share"] = {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25}
    data["stages"]["rl"]["share"] = {"type": "float", "low": 0.25, "high": 0.5, "step": 0.25}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    run_dir = run_search(space, name="three", runs_dir=tmp_path / "runs", live=False,
                         trial_fn=functools.partial(fake_trial_fn, seconds=0.05))
    run = load_run(run_dir)
    assert run.study.metric_names == ["id_accuracy", "ood_accuracy", "device_hours"]
    views = [v for v in run.trials() if v.state == "COMPLETE"]
    assert len(views) == 6
    for v in views:  # the third value is the planned (load-free) cost, within the budget
        assert v.values["device_hours"] == pytest.approx(v.planned_hours)
        assert v.values["device_hours"] <= run.per_trial_hours
    assert len({round(v.values["device_hours"], 9) for v in views}) > 1  # it varies
    console = Console(record=True, width=220)
    render_status(run, console)
    assert "device_hours ↓" in console.export_text()
    html = write_report(run, tmp_path / "r.html").read_text()
    assert "fig-front_projection_1" in html and "fig-front_projection_2" in html
    assert budget_curve(run) is not None
