"""The run report: one self-contained HTML file (plotly's JS inlined, no network needed).

Three figures drawn from :class:`~stagebudget.pareto.FrontInfo` (nothing is computed here):
the ID/OOD front with ±1 standard-error bars, the curves of the front trials and the reference
schedules across stage boundaries, and hypervolume against the number of completed trials;
then the budget curve's two (:mod:`stagebudget.results.budgetreport`); a
table of the front's schedules; above them a small table about the run (with the commands that
made it and that train the knee again, and the package versions). Plotly is imported inside
the functions, so importing this module stays light.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagebudget.fileio import atomic_write_text
from stagebudget.names import (
    COMPLETE,
    DEVICE_HOURS,
    FAILED,
    ID_ACCURACY,
    OOD_ACCURACY,
    PRUNED,
    RUNNING,
    SECONDS_PER_HOUR,
)
from stagebudget.pareto import FrontInfo, StageCell, TrialPoint, front_rows
from stagebudget.results.budgetcurve import budget_curve
from stagebudget.results.budgetreport import NOTES as BUDGET_NOTES
from stagebudget.results.budgetreport import budget_fronts_figure, budget_hypervolume_figure
from stagebudget.rundir import describe_spend, spend_summary

if TYPE_CHECKING:
    from stagebudget.results.run import Run

REFERENCE_SYMBOLS = {"sft_only": "square-open", "rl_only": "diamond-open", "heuristic": "star-open"}
MAX_CURVE_PANELS = 12
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
PROJECTION_NAMES = ("front_projection_1", "front_projection_2")  # a third objective's pairs
FIGURE_NAMES = ("front", *PROJECTION_NAMES, "curves", "hypervolume", "budget_fronts",
                "budget_hypervolume")
ID_COLOUR, OOD_COLOUR, GREY = "#1f77b4", "#ff7f0e", "#b0b0b0"


def write_report(run: Run, out: Path | None = None, *, png: bool = False,
                 on_message: Callable[[str], None] | None = None) -> Path:
    """Write the HTML report of ``run`` (default ``RUN/report.html``; into a folder ``out`` as
    ``<run>-report.html``) and return its path.

    With ``png=True`` each figure is also saved as ``<stem>-<figure>.png`` through kaleido when a
    Chromium/Chrome binary is present; otherwise that step is skipped with a message.
    """
    say = on_message or (lambda msg: print(msg, file=sys.stderr))
    views = run.trials()  # one join, for the front and the budget curve
    front = run.front(views=views)
    out = Path(out) if out is not None else run.dir.report
    if out.is_dir():  # like export: a folder gets the file, named after the run
        out = out / f"{run.name}-report.html"
    figures = {"front": front_figure(front), "curves": curves_figure(front),
               "hypervolume": hypervolume_figure(front)}
    for name, axes in zip(PROJECTION_NAMES, projections(front), strict=False):
        figures[name] = front_figure(front, axes)
    curve = budget_curve(run, views=views)
    if curve is not None:
        figures.update(budget_fronts=budget_fronts_figure(curve),
                       budget_hypervolume=budget_hypervolume_figure(curve))
    atomic_write_text(out, render_page(run.name, run_summary(run, front), figures, front))
    if png:
        write_pngs(figures, out, say)
    return out


def run_summary(run: Run, front: FrontInfo) -> list[tuple[str, str]]:
    """The header table's rows (label, value)."""
    c = front.counts
    budget = run.per_trial_hours
    objectives = ", ".join(f"{n} ({'max' if d == 'maximize' else 'min'})"
                           for n, d in zip(front.objective_names, front.directions, strict=True))
    ref = ", ".join(f"{v:.4g}" for v in front.ref_point)
    return [
        ("run", f"{run.name} (study {run.study.study_name})"),
        ("trials", f"{c.get(COMPLETE, 0)} complete, {c.get(FAILED, 0)} failed, "
                   f"{c.get(RUNNING, 0)} running, {c.get(PRUNED, 0)} pruned "
                   f"of {run.meta.get('trials_requested', '?')} requested"),
        ("budget", f"{budget:.4g} device-hours per trial" if budget is not None else "unknown"),
        ("cost", describe_spend(spend_summary(run.dir.records()))),
        ("objectives", objectives),
        ("front size", f"{len(front.front)} of {len(front.points)} completed trials"),
        ("hypervolume", f"{front.hypervolume:.4f} (reference point {ref})"),
        ("knee", f"trial {front.knee}: {front.points[front.knee].label}"
         if front.knee is not None else "–"),
        *([("train the knee", knee_commands(run.dir.root))] if front.knee is not None else []),
        ("made by", str(run.meta.get("command") or "unknown (run made before commands were kept)")),
        ("versions", versions_text(run)),
    ]


def knee_commands(run_dir: Path) -> str:
    """The commands that export the knee and train it again (stagebudget, or plain TRL)."""
    return (f"stagebudget export {run_dir} --pick knee -o knee.yaml && stagebudget train "
            "knee.yaml -o knee-model   (plain TRL + PEFT: python knee.py --out knee-trl)")


def versions_text(run: Run) -> str:
    """Package versions the trials ran with (from the records), else the run's stagebudget."""
    seen: dict[str, set[str]] = {}
    for view in run.trials():
        for name, version in (view.record.versions if view.record is not None else {}).items():
            seen.setdefault(name, set()).add(str(version))
    if not seen:
        return f"stagebudget {run.meta.get('version', '?')}"
    return ", ".join(f"{name} {' / '.join(sorted(v))}" for name, v in seen.items())


def projections(front: FrontInfo) -> list[tuple[str, str]]:
    """With more than two objectives, the other pairs to draw beside the main plot: each further
    objective against each of the main plot's axes (``device_hours`` against ID, then OOD)."""
    main = _axes(front)
    rest = [n for n in front.objective_names if n not in main]
    return [(extra, axis) for extra in rest for axis in main]


def _axes(front: FrontInfo) -> tuple[str, str]:
    names = front.objective_names
    if ID_ACCURACY in names and OOD_ACCURACY in names:
        return ID_ACCURACY, OOD_ACCURACY
    return (names[0], names[1]) if len(names) > 1 else (names[0], names[0])


def hover_text(p: TrialPoint, front: FrontInfo) -> str:
    """The full schedule of one trial as hover HTML: stages with steps, ranks, lr, shares."""
    tags = [t for t in ("front" if p.number in front.front else "dominated",
                        "knee" if p.number == front.knee else "", p.reference or "") if t]
    lines = [f"<b>trial {p.number}</b> ({', '.join(tags)})",
             " · ".join(f"{n} {v:.4g}" for n, v in zip(front.objective_names, p.values,
                                                          strict=True))]
    if p.sft_share is not None:
        lines.append(f"SFT budget share {p.sft_share:.3g}")
    stages = (p.schedule or {}).get("stages", [])
    for s in stages:
        share = p.stage_shares.get(s.get("kind", ""))
        rank = s.get("lora_rank", 0)
        lines.append(
            f"{s.get('kind')}: {s.get('steps')} steps, "
            + (f"LoRA r{rank} α{s.get('lora_alpha') or 2 * rank}" if rank else "full FT")
            + f", lr {s.get('learning_rate', 0):.2g}, batch {s.get('batch_size')}"
            + (f", share {share:.3g}" if share is not None else "")
        )
    if not stages:
        lines.append(html.escape(p.label))
    return "<br>".join(lines)


def front_figure(front: FrontInfo, axes: tuple[str, str] | None = None) -> Any:
    """ID vs OOD (or the objectives ``axes``): front highlighted and joined, dominated greyed,
    references and knee marked."""
    import plotly.graph_objects as go

    xname, yname = axes or _axes(front)
    fig = go.Figure()
    if front.empty:
        return _empty(fig, "no completed trial yet", "Pareto front")
    x = lambda n: front.value(n, xname)  # noqa: E731
    y = lambda n: front.value(n, yname)  # noqa: E731
    dom = front.dominated
    fig.add_trace(go.Scatter(
        x=[x(n) for n in dom], y=[y(n) for n in dom], mode="markers", name="dominated",
        marker={"color": GREY, "size": 9, "opacity": 0.8},
        error_x=error_bars(front, dom, xname, GREY), error_y=error_bars(front, dom, yname, GREY),
        text=[hover_text(front.points[n], front) for n in dom], hovertemplate="%{text}<extra></extra>",
    ))
    shares = [front.points[n].sft_share for n in front.front]
    # A line joins the front only when it is the 2-D front drawn (sorted along x); with a third
    # objective the front is a projection and a line would zigzag.
    planar = front.objective_names == (xname, yname)
    fig.add_trace(go.Scatter(
        x=[x(n) for n in front.front], y=[y(n) for n in front.front],
        mode="lines+markers" if planar else "markers",
        name="Pareto front" if planar else f"Pareto front ({len(front.directions)} objectives)",
        line={"color": "#444", "width": 1.5},
        error_x=error_bars(front, front.front, xname, "#444"),
        error_y=error_bars(front, front.front, yname, "#444"),
        marker={"size": 13, "color": [s if s is not None else math.nan for s in shares],
                "colorscale": "Viridis", "cmin": 0, "cmax": 1, "line": {"color": "#222", "width": 1},
                "colorbar": {"title": {"text": "SFT share"}, "len": 0.8}},
        text=[hover_text(front.points[n], front) for n in front.front],
        hovertemplate="%{text}<extra></extra>",
    ))
    for name, number in sorted(front.references.items()):
        fig.add_trace(go.Scatter(
            x=[x(number)], y=[y(number)], mode="markers+text", name=f"reference: {name}",
            marker={"symbol": REFERENCE_SYMBOLS.get(name, "x-open"), "size": 20,
                    "color": "#d62728", "line": {"width": 2}},
            text=[name], textposition="top center", hoverinfo="skip",
        ))
    if front.knee is not None:
        fig.add_annotation(x=x(front.knee), y=y(front.knee), text=f"knee (trial {front.knee})",
                           showarrow=True, arrowhead=2, ax=40, ay=40)
    title = ("ID vs OOD accuracy: Pareto front" if (xname, yname) == (ID_ACCURACY, OOD_ACCURACY)
             else f"{yname} vs {xname}: the Pareto front projected")
    fig.update_layout(title=title, height=560,
                      xaxis_title=xname, yaxis_title=yname, legend={"orientation": "h", "y": -0.15},
                      template="plotly_white", hoverlabel={"align": "left"})
    return fig


def error_bars(front: FrontInfo, numbers: list[int], name: str, colour: str) -> dict[str, Any] | None:
    """Plotly error bars of ±1 standard error of objective ``name``; None when no trial has one
    (runs made before standard errors were measured are drawn without)."""
    errs = [front.points[n].errors.get(name) for n in numbers]
    if all(e is None for e in errs):
        return None
    return {"type": "data", "array": [e if e is not None else math.nan for e in errs],
            "visible": True, "thickness": 1.2, "width": 3, "color": colour}


def _with_se(value: float, se: float | None) -> str:
    return f"{value:.3f} ± {se:.3f}" if se is not None else f"{value:.3f}"


def front_table(front: FrontInfo) -> list[list[str]]:
    """Rows (header first) of the front's schedules: steps that ran, ranks, learning rates,
    shares, objectives ± SE, the nominal cost (device-hours the cost model planned) and the
    measured training device-seconds. A cell holds one line per stage."""
    names = [n for n in front.objective_names if n != DEVICE_HOURS]
    rows = [["trial", "", "steps ran / planned", "LoRA rank", "learning rate", "budget share",
             *[f"{n} ± SE" for n in names], "nominal device-hours (planned)",
             "measured device-seconds"]]
    for row in front_rows(front):
        rows.append([
            str(row.number), ", ".join(row.tags), *_stage_lines(row.stages),
            *[_with_se(value, se) for name, value, se in row.objectives if name != DEVICE_HOURS],
            f"{row.planned_hours:.4f}" if row.planned_hours is not None else "–",
            f"{row.device_hours * SECONDS_PER_HOUR:.1f}" if row.device_hours is not None else "–",
        ])
    return rows


def _stage_lines(stages: tuple[StageCell, ...]) -> list[str]:
    """The steps (ran/planned), rank, learning rate and budget share cells: a line per stage."""
    steps = [f"{c.kind} {c.steps_done}/{c.steps_planned}" for c in stages]
    ranks = [f"{c.kind} r{c.lora_rank}" if c.lora_rank else f"{c.kind} full" for c in stages]
    lrs = [f"{c.kind} {float(c.learning_rate):.2g}" for c in stages]
    shares = [f"{c.kind} {c.share:.3g}" if c.share is not None else f"{c.kind} –" for c in stages]
    return ["\n".join(col) for col in (steps, ranks, lrs, shares)]


def curves_figure(front: FrontInfo) -> Any:
    """ID/OOD curves of each front trial, one panel each, stage boundaries as dotted lines."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    numbers = curve_numbers(front)
    if not numbers:
        return _empty(go.Figure(), "no front trial has curves yet", "Curves of the front trials")
    cols = min(2, len(numbers))
    rows = math.ceil(len(numbers) / cols)
    fig = make_subplots(rows=rows, cols=cols, vertical_spacing=0.35 / rows + 0.04,
                        subplot_titles=[panel_title(front, n) for n in numbers])
    for i, n in enumerate(numbers):
        c, r, col = front.curves[n], i // cols + 1, i % cols + 1
        for label, ys, colour, dash in (("ID", c.id_accuracy, ID_COLOUR, "solid"),
                                        ("OOD", c.ood_accuracy, OOD_COLOUR, "dash")):
            fig.add_trace(go.Scatter(
                x=c.x, y=ys, mode="lines+markers", name=f"{label} accuracy", legendgroup=label,
                showlegend=i == 0, line={"color": colour, "dash": dash}, marker={"size": 5},
                customdata=c.stages,
                hovertemplate=f"{label} %{{y:.3f}}<br>%{{customdata}} · x %{{x:.4g}}<extra></extra>",
            ), row=r, col=col)
        for bx, name in c.boundaries:
            fig.add_vline(x=bx, line_dash="dot", line_color="#666", row=r, col=col,
                          annotation_text=name, annotation_position="top left",
                          annotation_font_size=10)
        fig.update_xaxes(title_text=c.x_label, row=r, col=col)
        fig.update_yaxes(title_text="accuracy", row=r, col=col)
    height = 300 * rows + 160
    # Legend above the panel titles: its offset is in pixels over the plot area's height.
    fig.update_layout(title="ID/OOD accuracy across stages: the front and the reference schedules",
                      height=height,
                      template="plotly_white", margin={"t": 130, "b": 70},
                      legend={"orientation": "h", "yanchor": "bottom", "xanchor": "right",
                              "x": 1, "y": 1 + 36 / (height - 200)})
    return fig


def curve_numbers(front: FrontInfo) -> list[int]:
    """Trials drawn as curves: the front's, then reference schedules off the front."""
    wanted = dict.fromkeys([*front.front, *sorted(front.references.values())])
    return [n for n in wanted if n in front.curves][:MAX_CURVE_PANELS]


def panel_title(front: FrontInfo, number: int) -> str:
    """``trial 3: sft 40@r8 -> rl 20@r16`` plus its reference name, or that it is dominated."""
    p = front.points[number]
    tags = [t for t in (p.reference or "", "" if number in front.front else "dominated") if t]
    return f"trial {number}: {p.label}" + (f" ({', '.join(tags)})" if tags else "")


def hypervolume_figure(front: FrontInfo) -> Any:
    """Hypervolume of the completed trials so far against their count."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if not front.hv_history:
        return _empty(fig, "no completed trial yet", "Hypervolume")
    ref = ", ".join(f"{v:.3g}" for v in front.ref_point)
    fig.add_trace(go.Scatter(x=[k for k, _ in front.hv_history],
                             y=[v for _, v in front.hv_history], mode="lines+markers",
                             name="hypervolume", line={"shape": "hv"},
                             hovertemplate="%{x} trials: %{y:.4f}<extra></extra>"))
    fig.update_layout(title=f"Hypervolume vs completed trials (reference point {ref})",
                      xaxis_title="completed trials (in trial-number order)",
                      yaxis_title="hypervolume", height=380, template="plotly_white")
    return fig


def _empty(fig: Any, message: str, title: str) -> Any:
    fig.add_annotation(text=message, showarrow=False, font={"size": 16}, x=0.5, y=0.5,
                       xref="paper", yref="paper")
    fig.update_layout(title=title, height=300, template="plotly_white",
                      xaxis={"visible": False}, yaxis={"visible": False})
    return fig


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }}
table.summary {{ border-collapse: collapse; margin-bottom: 1.5em; }}
table.summary th {{ text-align: left; padding: 2px 16px 2px 0; color: #555; font-weight: 600; }}
table.summary td {{ padding: 2px 0; }}
section {{ margin-bottom: 2em; }} p.note {{ color: #555; margin: 0.2em 0; }}
table.front {{ border-collapse: collapse; font-size: 0.9em; margin-top: 0.5em; }}
table.front th, table.front td {{ border-bottom: 1px solid #ddd; padding: 4px 10px;
  text-align: left; vertical-align: top; white-space: nowrap; }}
table.front th {{ background: #f4f4f4; }}
</style></head><body>
<h1>stagebudget report: {title}</h1>
<table class="summary">{rows}</table>
{sections}
</body></html>
"""
NOTES = {
    "front": "Hover a point for its full schedule. Coloured points are the Pareto front (colour: "
             "SFT share of the budget), grey ones are dominated; outlined symbols mark the "
             "reference schedules.",
    "curves": "Accuracy measured during training; dotted lines mark stage boundaries (the "
              "adapter is merged there and the next stage trains a fresh one).",
    "hypervolume": "How much of the objective space the front covers as trials complete.",
    **dict.fromkeys(PROJECTION_NAMES, "The same trials in another pair of the objectives: with "
                    "a third objective the front is 3-dimensional, so a front trial can look "
                    "dominated in any one pair (the table below lists the front)."),
    **BUDGET_NOTES,
    "table": "The front's schedules. Steps that ran against the steps planned; ± is one "
             "standard error of the measured accuracy (absent for runs made before it was "
             "measured). Differences smaller than about two standard errors are noise.",
}


def render_page(title: str, summary: list[tuple[str, str]], figures: Mapping[str, Any],
                front: FrontInfo) -> str:
    """The HTML page: summary table, then each figure with a one-line note; plotly.js inlined once."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in summary)
    sections = []
    # the front's table follows the last picture of the front
    last_front = next(n for n in reversed(("front", *PROJECTION_NAMES)) if n in figures)
    for i, name in enumerate(n for n in FIGURE_NAMES if n in figures):
        div = figures[name].to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"fig-{name}",
                                    config={"displaylogo": False, "responsive": True})
        note = NOTES[name]
        if name == "curves" and len(front.front) > MAX_CURVE_PANELS:
            note += f" Showing the first {MAX_CURVE_PANELS} of {len(front.front)} front trials."
        sections.append(f'<section id="{name}"><p class="note">{html.escape(note)}</p>{div}'
                        "</section>")
        if name == last_front and len(front.front) > 0:
            sections.append(table_section(front))
    return PAGE.format(title=html.escape(title), rows=rows, sections="\n".join(sections))


def table_section(front: FrontInfo) -> str:
    """The front's schedules as an HTML table (see :func:`front_table`)."""
    header, *body = front_table(front)

    def cell(tag: str, text: str) -> str:
        return f"<{tag}>{'<br>'.join(html.escape(line) for line in text.splitlines())}</{tag}>"

    head = "".join(cell("th", h) for h in header)
    rows = "".join("<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in body)
    return (f'<section id="table"><p class="note">{html.escape(NOTES["table"])}</p>'
            f'<table class="front"><tr>{head}</tr>{rows}</table></section>')


def find_browser() -> str | None:
    """A Chromium/Chrome binary for kaleido (``BROWSER_PATH`` wins), or None."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).is_file():
        return env
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def write_pngs(figures: Mapping[str, Any], html_path: Path, say: Callable[[str], None]) -> list[Path]:
    """Save each figure as PNG beside the report; skip (saying why) without a browser engine."""
    browser = find_browser()
    if browser is None:
        say("PNG export skipped: no Chromium/Chrome found (install one, e.g. "
            "`apt-get install chromium`, or set BROWSER_PATH); the HTML report is complete")
        return []
    os.environ.setdefault("BROWSER_PATH", browser)  # where kaleido's choreographer looks first
    written: list[Path] = []
    for name, fig in figures.items():
        path = html_path.with_name(f"{html_path.stem}-{name}.png")
        try:
            fig.write_image(path, width=1200, height=fig.layout.height or 600)
        except Exception as exc:  # kaleido raises many types; the HTML is already written
            say(f"PNG export skipped: kaleido could not render with {browser}: {exc}")
            return written
        written.append(path)
    say("PNG figures: " + ", ".join(str(p) for p in written))
    return written
