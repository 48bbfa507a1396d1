"""The report's budget-curve figures: the checkpoint fronts per budget fraction, and the
hypervolume against budget with ±1 standard error (drawn from a
:class:`~stagebudget.results.budgetcurve.BudgetCurve`; nothing is computed here). Plotly is
imported inside the functions."""

from __future__ import annotations

import html
from typing import Any

from stagebudget.names import ID_ACCURACY, OOD_ACCURACY
from stagebudget.results.budgetcurve import KEEP, BudgetCurve, Candidate, fraction_text

NOTES = {
    "budget_fronts": "Every evaluated checkpoint of every trial is a schedule (the same earlier "
                     "stages, the current one cut at that step) with a planned cost: the front "
                     "of those that fit each fraction of the per-trial budget. Hover a point for "
                     "its schedule; `stagebudget export RUN --max-budget F` exports from them.",
    "budget_hypervolume": "Hypervolume of each fraction's front (±1 standard error, delta "
                          "method), against the trials' own front at the full budget.",
}


def _hover(c: Candidate) -> str:
    se = {n: c.errors.get(n) for n in (ID_ACCURACY, OOD_ACCURACY)}
    acc = " / ".join(f"{c.values[n]:.3f}" + (f" ±{se[n]:.3f}" if se[n] is not None else "")
                     for n in (ID_ACCURACY, OOD_ACCURACY))
    return (f"<b>trial {c.trial}, {c.stage} step {c.step}</b><br>ID / OOD {acc}<br>"
            f"planned {c.planned_hours:.4g} device-hours<br>{html.escape(c.label)}")


def budget_fronts_figure(curve: BudgetCurve) -> Any:
    """ID vs OOD: one front line per budget fraction (darker = more budget)."""
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale

    fig = go.Figure()
    colours = sample_colorscale("Viridis", [0.85 * (1 - i / max(1, len(curve.points) - 1))
                                            for i in range(len(curve.points))])
    for point, colour in zip(curve.points, colours, strict=True):
        members = [curve.by_number[n] for n in point.front.front]
        if not members:
            continue
        fig.add_trace(go.Scatter(
            x=[c.values[ID_ACCURACY] for c in members], y=[c.values[OOD_ACCURACY] for c in members],
            mode="lines+markers", name=f"{fraction_text(point.fraction)} of the budget "
                                       f"({len(members)} on the front)",
            line={"color": colour, "width": 1.5}, marker={"color": colour, "size": 9},
            error_x=_bars([c.errors.get(ID_ACCURACY) for c in members], colour),
            error_y=_bars([c.errors.get(OOD_ACCURACY) for c in members], colour),
            text=[_hover(c) for c in members], hovertemplate="%{text}<extra></extra>"))
    fig.update_layout(title="What a smaller budget buys: the checkpoint front per budget fraction",
                      xaxis_title=ID_ACCURACY, yaxis_title=OOD_ACCURACY, height=560,
                      template="plotly_white", hoverlabel={"align": "left"},
                      legend={"orientation": "h", "y": -0.15})
    return fig


def budget_hypervolume_figure(curve: BudgetCurve) -> Any:
    """Hypervolume of the checkpoint front against the budget fraction, ±1 SE."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[p.fraction for p in curve.points], y=[p.hypervolume for p in curve.points],
        mode="lines+markers", name="checkpoint front",
        error_y={"type": "data", "array": [p.hypervolume_se for p in curve.points],
                 "visible": True},
        customdata=[[p.fitting, len(p.front.front), p.hours] for p in curve.points],
        hovertemplate="%{x:.3g} of the budget (%{customdata[2]:.4g} device-hours): "
                      "hypervolume %{y:.4f}<br>%{customdata[0]} checkpoints fit, "
                      "%{customdata[1]} on the front<extra></extra>"))
    if curve.trial_hypervolume is not None:
        fig.add_hline(y=curve.trial_hypervolume, line={"dash": "dot", "color": "#888"},
                      annotation_text="the trials' own front (full budget)")
    keep = curve.smallest_fraction_keeping()
    title = "Hypervolume vs budget" + (
        f": {KEEP:.0%} of the full budget's from {keep:.3g} of it" if keep is not None else "")
    fig.update_layout(title=title, xaxis_title="fraction of the per-trial budget",
                      yaxis_title="hypervolume (reference point 0, 0)", height=380,
                      template="plotly_white", xaxis={"range": [0, 1.05]})
    return fig


def _bars(errors: list[float | None], colour: str) -> dict[str, Any] | None:
    if all(e is None for e in errors):
        return None
    return {"type": "data", "array": [e if e is not None else float("nan") for e in errors],
            "visible": True, "thickness": 1, "width": 2, "color": colour}
