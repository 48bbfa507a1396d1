"""``stagebudget status RUN``: one row per trial, then the front, readable while a run goes on."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from stagebudget.names import COMPLETE, FAILED, PRUNED, RUNNING, TWINS, WAITING
from stagebudget.pareto import FrontInfo, front_rows
from stagebudget.results.budgetcurve import KEEP, budget_curve, fraction_text
from stagebudget.rundir import describe_spend, spend_summary

if TYPE_CHECKING:
    from rich.console import Console

    from stagebudget.results.budgetcurve import BudgetCurve, Candidate
    from stagebudget.results.run import Run, StatusRow

STATE_STYLE = {COMPLETE: "green", RUNNING: "yellow", WAITING: "dim", PRUNED: "magenta",
               FAILED: "red"}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _with_se(value: float | None, se: float | None) -> str:
    """``0.712 ±.014``: an accuracy with its standard error, when the record has one."""
    if se is None or value is None:
        return _fmt(value)
    return f"{value:.3f} ±{format(se, '.3f').lstrip('0')}"


def trials_table(rows: list[StatusRow], title: str = "trials") -> Table:
    """The per-trial table: state, reference, schedule, SFT share, objectives, cost (nominal:
    planned by the cost model; measured: timed training, which grows with load; spent: what
    this trial really trained), front, error."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for name, kw in (("#", {"justify": "right"}), ("state", {"min_width": 8}), ("ref", {}),
                     ("schedule", {"overflow": "fold", "min_width": 24}),
                     ("sft share", {"justify": "right"}),
                     ("ID ± SE", {"justify": "right"}), ("OOD ± SE", {"justify": "right"}),
                     ("nominal dev-h\n(planned)", {"justify": "right"}),
                     ("measured\ndev-s", {"justify": "right"}),
                     ("spent\ndev-h", {"justify": "right"}),
                     ("front", {"justify": "center"}),
                     ("error", {"overflow": "ellipsis", "max_width": 36, "no_wrap": True})):
        table.add_column(name, **kw)  # type: ignore[arg-type]
    for r in rows:
        mark = "✓ knee" if r.knee else ("✓" if r.on_front else "")
        table.add_row(
            "–" if r.number is None else str(r.number),
            Text(r.state, style=STATE_STYLE.get(r.state, "")),
            r.reference or "",
            r.schedule,
            _fmt(r.sft_share, ".3g"),
            _with_se(r.id_accuracy, r.id_se),
            _with_se(r.ood_accuracy, r.ood_se),
            _fmt(r.planned_hours, ".4f"),
            _fmt(r.measured_seconds, ".1f"),
            _fmt(r.spent_hours, ".4f"),
            Text(mark, style="bold green") if mark else "",
            Text(r.error or "", style="red"),
            style="dim" if r.state not in (COMPLETE, RUNNING) else None,
        )
    return table


def front_table(front: FrontInfo) -> Table:
    """The front: its trials (by the first objective), the knee, and the hypervolume."""
    ref = ", ".join(f"{v:.3g}" for v in front.ref_point)
    caption = (f"hypervolume {front.hypervolume:.4f} (reference point {ref}); "
               f"knee: {'trial ' + str(front.knee) if front.knee is not None else '–'}")
    table = Table(title=f"Pareto front ({len(front.front)} of {len(front.points)} completed)",
                  title_justify="left", caption=caption, caption_justify="left",
                  header_style="bold")
    table.add_column("#", justify="right")
    for name, direction in zip(front.objective_names, front.directions, strict=True):
        table.add_column(f"{name} {'↑' if direction == 'maximize' else '↓'}", justify="right")
    table.add_column("sft share", justify="right")
    table.add_column("schedule", overflow="fold")
    table.add_column("", justify="left")
    for row in front_rows(front):
        table.add_row(str(row.number), *(f"{value:.4g}" for _, value, _ in row.objectives),
                      _fmt(row.sft_share, ".3g"), row.label, ", ".join(row.tags))
    return table


def render_status(run: Run, console: Console) -> None:
    """Print the trials table and the front summary of ``run`` (finished or not)."""
    views = run.trials()  # one join of the study and the records, for the front and the curve
    front = run.front(curves=False, views=views)
    c = front.counts
    budget = run.per_trial_hours
    console.print(
        f"[bold]{run.name}[/bold]  {c.get(COMPLETE, 0) - c.get(TWINS, 0)} complete"
        + (f" (+{c[TWINS]} told a trained twin's result)" if c.get(TWINS) else "")
        + f", {c.get(RUNNING, 0)} "
        f"running, {c.get('FAILED', 0)} failed, {c.get('PRUNED', 0)} pruned"
        f" of {run.meta.get('trials_requested', '?')} requested"
        + (f"; budget {budget:.4g} device-hours per trial" if budget is not None else "")
    )
    console.print(trials_table(run.status_rows(front)))
    spend = spend_summary(run.dir.records())
    if spend["nominal_device_hours"] > 0:
        console.print(f"cost: {describe_spend(spend)}")
    if front.empty:
        console.print("no completed trial yet: the front appears once a trial completes")
        return
    console.print(front_table(front))
    curve = budget_curve(run, views=views)
    if curve is not None:
        console.print(budget_table(curve))


def _pick_text(candidate: Candidate | None) -> str:
    if candidate is None:
        return "–"
    return (f"{candidate.values['id_accuracy']:.3f} / {candidate.values['ood_accuracy']:.3f} "
            f"{candidate.label} (#{candidate.trial})")


def budget_table(curve: BudgetCurve) -> Table:
    """What a smaller budget buys: per budget fraction, the front of the trials' evaluated
    checkpoints that fit it (:mod:`stagebudget.results.budgetcurve`), its hypervolume ± SE and
    the best ID / OOD at the floors."""
    keep = curve.smallest_fraction_keeping()
    trials = len({c.trial for c in curve.candidates})
    caption = (f"{len(curve.candidates)} checkpoints of {trials} trials, each a re-trainable "
               f"schedule (`export --max-budget`); floors: ID >= {curve.id_floor:.3f}, OOD >= "
               f"{curve.ood_floor:.3f} ({curve.floors_from}); "
               + (f"{KEEP:.0%} of the full budget's hypervolume from {fraction_text(keep)} of it"
                  if keep is not None else "no hypervolume yet"))
    table = Table(title="what a smaller budget buys", title_justify="left", caption=caption,
                  caption_justify="left", header_style="bold")
    for name in ("budget", "dev-h", "fit", "front", "hypervolume ± SE",
                 f"best ID / OOD, OOD >= {curve.ood_floor:.3f}",
                 f"best ID / OOD, ID >= {curve.id_floor:.3f}"):
        table.add_column(name, justify="right" if name in ("dev-h", "fit", "front") else "left",
                         overflow="fold")
    for p in curve.points:
        table.add_row(fraction_text(p.fraction), f"{p.hours:.4g}", str(p.fitting),
                      str(len(p.front.front)), _with_se(p.hypervolume, p.hypervolume_se),
                      _pick_text(p.best_id), _pick_text(p.best_ood))
    return table


def budget_document(curve: BudgetCurve | None) -> dict[str, Any] | None:
    """The budget curve as JSON-safe data (``status --json``'s ``budget_curve``)."""
    if curve is None:
        return None

    def candidate(c: Candidate | None) -> dict[str, Any] | None:
        if c is None:
            return None
        return {"candidate": c.number, "trial": c.trial, "stage_index": c.stage_index,
                "step": c.step, "label": c.label, "planned_device_hours": c.planned_hours,
                "objectives": {n: {"value": v, "se": c.errors.get(n)} for n, v in c.values.items()}}

    return {
        "per_trial_device_hours": curve.per_trial_hours,
        "candidates": len(curve.candidates),
        "floors": {"id_accuracy": curve.id_floor, "ood_accuracy": curve.ood_floor,
                   "from": curve.floors_from},
        "smallest_fraction_keeping_95pct": curve.smallest_fraction_keeping(),
        "trials_front_hypervolume": curve.trial_hypervolume,
        "points": [{"fraction": p.fraction, "device_hours": p.hours, "fitting": p.fitting,
                    "front": [candidate(curve.by_number[n]) for n in p.front.front],
                    "hypervolume": p.hypervolume, "hypervolume_se": p.hypervolume_se,
                    "best_id_at_ood_floor": candidate(p.best_id),
                    "best_ood_at_id_floor": candidate(p.best_ood)} for p in curve.points],
    }


def status_document(run: Run) -> dict[str, Any]:
    """``status --json``: the run, its trials (label, schedule, state, objectives ± SE, nominal
    and spent cost) and the front, as plain JSON-safe data (non-finite numbers become None).

    >>> sorted(status_document(load_run("runs/demo")))  # doctest: +SKIP
    ['budget_device_hours_per_trial', 'cost', 'counts', 'front', 'name', 'objectives', ...]
    """
    views = run.trials()
    front = run.front(curves=False, views=views)
    rows = run.status_rows(front)
    return _json_safe({
        "name": run.name, "run_dir": str(run.dir.root),
        "trials_requested": run.meta.get("trials_requested"),
        "budget_device_hours_per_trial": run.per_trial_hours,
        "objectives": [{"name": n, "direction": d} for n, d in run.objectives],
        "counts": front.counts,
        "trials": [_trial_document(r, run.objective_names) for r in rows],
        "front": {"trials": front.front, "knee": front.knee, "hypervolume": front.hypervolume,
                  "reference_point": list(front.ref_point), "references": front.references}
        if not front.empty else None,
        "cost": spend_summary(run.dir.records()),
        "budget_curve": budget_document(budget_curve(run, views=views)),
    })


def _trial_document(r: StatusRow, objective_names: tuple[str, ...]) -> dict[str, Any]:
    return {
        "number": r.number, "key": r.key, "state": r.state, "reference": r.reference,
        "label": r.label, "params": r.params, "stages": list(r.stages),
        "sft_share": r.sft_share,
        "objectives": {n: {"value": r.values.get(n), "se": r.errors.get(n)}
                       for n in objective_names},
        "nominal_device_hours": r.planned_hours,  # planned by the cost model (load-free)
        "measured_device_seconds": r.measured_seconds,
        "spent_device_hours": r.spent_hours,
        "reused_from": r.reused_from, "on_front": r.on_front, "knee": r.knee, "note": r.error,
    }


def _json_safe(value: Any) -> Any:
    """``value`` with NaN/inf as None and tuples as lists (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
