"""status, pareto (report) and export on a run directory written by a real `run_search` (real
Ray, Optuna and records, fake trials), not only on hand-made directories: the shapes the code
reads are the shapes it writes."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from stagebudget.results.export import export
from stagebudget.results.report import write_report
from stagebudget.results.run import load_run
from stagebudget.results.status import render_status
from stagebudget.schedule import Schedule
from stagebudget.searching.driver import run_search
from stagebudget.testing.fakes import fake_trial_fn

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("real_run")
    data = yaml.safe_load(DEMO.read_text())
    data.update(trials=5, concurrency=1)  # 3 references + 2 sampled
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    return run_search(space, name="views", runs_dir=tmp / "runs", live=False,
                      trial_fn=functools.partial(fake_trial_fn, seconds=0.05))


def test_status_reads_what_the_search_wrote(real_run: Path) -> None:
    run = load_run(real_run)
    rows = run.status_rows()
    assert len(rows) == 5 and all(r.state == "COMPLETE" for r in rows)
    assert {r.reference for r in rows} >= {"sft_only", "rl_only", "heuristic"}
    per_trial = run.per_trial_hours
    assert per_trial == yaml.safe_load(DEMO.read_text())["budget"]["per_trial_hours"]
    for r in rows:
        assert r.device_hours is not None and 0 < r.device_hours <= per_trial + 1e-12
        assert r.sft_share is not None and 0.0 <= r.sft_share <= 1.0
        assert r.id_accuracy is not None and r.ood_accuracy is not None
    for view in run.trials():
        shares = view.stage_shares
        assert shares and abs(sum(shares.values()) - 1.0) < 1e-9, shares
    front = run.front()
    assert front.front and set(front.curves) == set(front.front)
    assert all(front.curves[n].x for n in front.front)
    console = Console(record=True, width=200)
    render_status(run, console)
    assert "views" in console.export_text()


def test_report_and_export_on_a_real_run(real_run: Path, tmp_path: Path) -> None:
    run = load_run(real_run)
    html = write_report(run, tmp_path / "report.html").read_text()
    assert "views" in html and "plotly" in html.lower()
    out = export(run, "knee", tmp_path)
    document = yaml.safe_load(out.read_text())
    knee = run.front(curves=False).knee
    view = next(t for t in run.trials() if t.number == knee)
    assert Schedule.load(out) == view.schedule
    assert [s["stage"] for s in document["trl"]] == [s.kind for s in view.schedule.stages]
    assert document["source"]["record"] == view.record.key
