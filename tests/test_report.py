"""The HTML report: figures drawn from FrontInfo, self-contained page, and a real browser render."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fake_run import FRONT, FakeTrial, make_fake_run, standard_error
from stagebudget.results import report
from stagebudget.results.report import (
    curves_figure,
    front_figure,
    front_table,
    hypervolume_figure,
    write_pngs,
    write_report,
)
from stagebudget.results.run import Run, load_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return load_run(make_fake_run(tmp_path_factory.mktemp("runs") / "fake"))


@pytest.fixture(scope="module")
def html_path(run: Run) -> Path:
    return write_report(run)


def test_front_figure_draws_the_front_info(run: Run) -> None:
    front = run.front(curves=False)
    fig = front_figure(front)
    traces = {t.name: t for t in fig.data}
    # trial 10 repeats trial 5's params (so its schedule): drawn once, as trial 5
    assert len(traces["dominated"].x) == len(front.dominated) == 4 and front.twins == {10: 5}
    line = traces["Pareto front"]
    assert list(line.x) == [0.60, 0.70, 0.85, 0.92] and line.mode == "lines+markers"
    assert list(line.marker.color) == [0.125, 0.25, 0.5, 0.5]  # coloured by SFT share
    refs = {n: t for n, t in traces.items() if n.startswith("reference: ")}
    assert {t.marker.symbol for t in refs.values()} == {"square-open", "diamond-open",
                                                          "star-open"}
    assert "knee (trial 3)" in [a.text for a in fig.layout.annotations]
    hover = line.text[2]
    assert "trial 3" in hover and "knee" in hover
    assert "sft: 40 steps, LoRA r8 α16, lr 0.0005, batch 32, share 0.5" in hover
    assert "rl: 20 steps, LoRA r16 α32" in hover


def test_curves_and_hypervolume_figures(run: Run) -> None:
    front = run.front()
    curves = curves_figure(front)
    assert len(curves.data) == 2 * (len(FRONT) + 2)  # ID and OOD per front trial + 2 references
    titles = [a.text for a in curves.layout.annotations]
    assert "trial 0: sft 80@r32 (sft_only, dominated)" in titles
    assert "trial 2: sft 20@r32 -> rl 30@r4 (heuristic)" in titles
    assert sum(1 for s in curves.layout.shapes if s.type == "line") == len(FRONT)  # boundaries
    hv = hypervolume_figure(front)
    assert list(hv.data[0].x) == list(range(1, 9))  # 9 completed, one a twin (of trial 5)
    assert hv.data[0].y[-1] == pytest.approx(0.53)


def test_report_is_self_contained(html_path: Path) -> None:
    text = html_path.read_text()
    assert html_path.name == "report.html"
    assert not re.search(r"<script[^>]+src=", text), "no external scripts (machines are offline)"
    assert text.count("Plotly.newPlot") == 3
    assert len(text) > 1_000_000  # plotly.js itself is inlined
    assert "9 complete, 1 failed, 1 running" in text
    assert "0.5300 (reference point 0, 0)" in text
    assert "trial 3: sft 40@r8 -&gt; rl 20@r16" in text


def test_report_before_any_trial_completes(tmp_path: Path) -> None:
    run = load_run(make_fake_run(tmp_path / "r", trials=(FakeTrial(0.5, 8, 4, state="RUNNING"),)))
    out = write_report(run, tmp_path / "out" / "r.html")
    assert "no completed trial yet" in out.read_text()


def test_png_skipped_without_a_browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    looked: list[bool] = []
    monkeypatch.setattr(report, "find_browser", lambda: looked.append(True))
    messages: list[str] = []
    assert write_pngs({}, tmp_path / "r.html", messages.append) == []
    assert looked == [True]  # the patched lookup was the one asked
    assert "PNG export skipped: no Chromium/Chrome found" in messages[0]


def chromium() -> str:
    path = next((p for n in ("chromium", "chromium-browser", "google-chrome")
                 if (p := shutil.which(n))), None)
    if path is None:
        pytest.skip("no chromium binary on PATH (CI: apt-get install -y chromium)")
    return path


def headless(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def figure_dom(dom: str, name: str) -> str:
    start = dom.index(f'id="fig-{name}"')
    ends = [i for n in ("front", "curves", "hypervolume")
            if (i := dom.find(f'id="fig-{n}"', start + 1)) > 0]
    return dom[start:min(ends, default=len(dom))]


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run: Run, html_path: Path, tmp_path: Path) -> None:
    binary = chromium()
    dom = headless(binary, "--dump-dom", html_path.resolve().as_uri()).stdout
    # SVG that only exists once the inlined plotly.js ran, with no network.
    assert dom.count('class="main-svg"') >= 3
    front = run.front(curves=False)
    points = re.compile(r'class="point\b')
    n_front = len(points.findall(figure_dom(dom, "front")))
    assert n_front == len(front.points) - len(front.twins) + len(front.references)  # a twin once
    assert len(points.findall(figure_dom(dom, "hypervolume"))) == len(front.hv_history)
    # a panel per front trial and per reference schedule off the front (sft_only, rl_only)
    assert figure_dom(dom, "curves").count('class="scatterlayer') == len(FRONT) + 2
    assert '<table class="front">' in dom
    shot = tmp_path / "report.png"
    headless(binary, "--window-size=1400,2600", f"--screenshot={shot}",
             html_path.resolve().as_uri())
    assert shot.stat().st_size > 50_000  # a blank page is a few KB


def test_three_objective_front_is_not_joined(tmp_path: Path) -> None:
    run = load_run(make_fake_run(tmp_path / "r3", device_hours=True))
    fig = front_figure(run.front(curves=False))
    front = next(t for t in fig.data if t.name.startswith("Pareto front"))
    assert front.mode == "markers" and front.name == "Pareto front (3 objectives)"
    assert "device_hours" in front.text[0]


def test_error_bars_front_table_and_provenance(tmp_path: Path) -> None:
    run = load_run(make_fake_run(tmp_path / "se", standard_errors=True))
    front = run.front(curves=False)
    traces = {t.name: t for t in front_figure(front).data}
    line = traces["Pareto front"]
    assert list(line.error_x.array) == [standard_error(v) for v in (0.60, 0.70, 0.85, 0.92)]
    assert list(line.error_y.array) == [standard_error(v) for v in (0.62, 0.55, 0.50, 0.40)]
    assert traces["dominated"].error_y.visible
    header, *rows = front_table(front)
    assert header[2:] == ["steps ran / planned", "LoRA rank", "learning rate", "budget share",
                          "id_accuracy ± SE", "ood_accuracy ± SE",
                          "nominal device-hours (planned)", "measured device-seconds"]
    knee = next(r for r in rows if r[0] == "3")
    assert knee[1] == "knee"
    assert knee[2:6] == ["sft 40/40\nrl 20/20", "sft r8\nrl r16", "sft 0.0005\nrl 0.001",
                         "sft 0.5\nrl 0.5"]
    assert knee[6] == f"0.850 ± {standard_error(0.85):.3f}" and knee[7] == "0.500 ± 0.035"
    assert next(r for r in rows if r[0] == "2")[1] == "heuristic"
    text = write_report(run).read_text()
    assert '<table class="front">' in text and "0.850 ± 0.025" in text and "sft 40/40<br>rl 20/20" in text
    assert "stagebudget export " in text and "--pick knee" in text and "python knee.py" in text
    assert "stagebudget search space.yaml --name fake" in text
    assert "stagebudget 0.1.0, torch 2.13.0" in text


def test_runs_without_standard_errors_draw_without_bars(run: Run) -> None:
    front = run.front(curves=False)
    traces = {t.name: t for t in front_figure(front).data}
    assert traces["Pareto front"].error_x.array is None and traces["dominated"].error_y.array is None
    assert front_table(front)[1][6] == "0.600"  # no ± without a standard error
