"""Progress of a running search: a rich live panel, or plain log lines for CI and tests.

Compute, then render: :func:`collect_stats` reads the Optuna study (done, failed, best ID/OOD,
front size) and the budget limiter into a plain :class:`SearchStats`; the displays only draw it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from rich.console import Console
from rich.live import Live
from rich.table import Table

from stagebudget.names import ID_ACCURACY, OOD_ACCURACY, REFERENCE_ATTR, REUSED_ATTR
from stagebudget.pareto import FrontInfo, TrialPoint, compute_front, front_rows
from stagebudget.rundir import is_interrupted, is_twin


@dataclass
class SearchStats:
    """One snapshot of a search."""

    requested: int
    done: int = 0
    running: int = 0
    failed: int = 0
    spent_hours: float = 0.0
    search_hours: float | None = None
    best_id: float | None = None
    best_ood: float | None = None
    front_size: int = 0

    def line(self) -> str:
        """``"3/8 done, 1 running, 0 failed | 0.031/0.1 device-h | best ID 0.9 ..."``"""
        budget = f"{self.spent_hours:.4g}" + (
            f"/{self.search_hours:.4g}" if self.search_hours is not None else "")
        return (f"{self.done}/{self.requested} done, {self.running} running, {self.failed} failed"
                f" | {budget} device-h | best ID {_fmt(self.best_id)}, best OOD "
                f"{_fmt(self.best_ood)} | front {self.front_size}")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def collect_stats(study: Any, objective_names: list[str], *, requested: int, running: int,
                  spent_hours: float, search_hours: float | None) -> SearchStats:
    """Read counts and bests from the Optuna study (the source of truth). A twin told its
    original's result took no trial slot and is not counted as done."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not is_twin(t)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    stats = SearchStats(requested=requested, running=running, spent_hours=spent_hours,
                        search_hours=search_hours,
                        done=sum(t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
                                 and not is_interrupted(t) for t in trials),
                        failed=sum(t.state == TrialState.FAIL and not is_interrupted(t)
                                   for t in trials))
    for attr, name in (("best_id", ID_ACCURACY), ("best_ood", OOD_ACCURACY)):
        if name in objective_names and complete:
            i = objective_names.index(name)
            setattr(stats, attr, max(t.values[i] for t in complete))
    stats.front_size = len(study_front(study, objective_names).front)
    return stats


def study_front(study: Any, objective_names: list[str]) -> FrontInfo:
    """The front of the study's completed trials, by :func:`~stagebudget.pareto.compute_front`
    (the one front every view uses: status, report, export, the live panel and the summary).
    A trial that reused a twin's measurements repeats a schedule already in the study (the
    study holds no schedules; records do, see :func:`~stagebudget.pareto.twins_of`): left out."""
    directions = [d.name.lower() for d in study.directions]
    points = [TrialPoint(number=t.number, values=tuple(t.values), params=dict(t.params),
                         reference=t.user_attrs.get(REFERENCE_ATTR) or None)
              for t in study.get_trials(deepcopy=False)
              if t.state.name == "COMPLETE" and t.values is not None
              and all(math.isfinite(v) for v in t.values) and REUSED_ATTR not in t.user_attrs]
    return compute_front(points, objective_names, directions)


class ProgressCallback(tune.Callback):
    """Refreshes the display when trials start, finish or fail (and at most once a second)."""

    def __init__(self, display: Display, snapshot: Any, min_interval_s: float = 1.0) -> None:
        self.display = display
        self.snapshot = snapshot  # callable: running trial count -> SearchStats
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def _refresh(self, trials: list, force: bool, ended: Any = None) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        # A trial that just ended may still say RUNNING while its callbacks run.
        running = sum(t.status == Trial.RUNNING and t is not ended for t in trials)
        self.display.update(self.snapshot(running), force=force)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._refresh(trials, True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._refresh(trials, True, ended=trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._refresh(trials, True, ended=trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._refresh(trials, False)


class Display:
    """Plain log lines (``live=False``): one line each time something changed."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console
        self._last_line = ""

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = Console(highlight=False)
        return self._console

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks (tuner.pkl); consoles and live views hold locks.
        return {k: v for k, v in self.__dict__.items() if k not in ("_console", "_live")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _console=None)

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, stats: SearchStats, force: bool = False) -> None:
        line = stats.line()
        if line != self._last_line:
            self._last_line = line
            self.console.print(f"[search] {line}", markup=False)


class LiveDisplay(Display):
    """A rich live panel, redrawn in place."""

    def __enter__(self) -> LiveDisplay:
        self._live = Live(Table(), console=self.console, refresh_per_second=2, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(*exc)

    def update(self, stats: SearchStats, force: bool = False) -> None:
        self._live.update(render_stats(stats), refresh=True)


def render_stats(stats: SearchStats) -> Table:
    """The live panel as a two-column table."""
    table = Table(title="stagebudget search", show_header=False)
    budget = f"{stats.spent_hours:.4g}" + (
        f" of {stats.search_hours:.4g}" if stats.search_hours is not None else " (no limit)")
    for label, value in (
            ("trials", f"{stats.done}/{stats.requested} done, {stats.running} running, "
                       f"{stats.failed} failed"),
            ("budget (device-h)", budget), ("best ID", _fmt(stats.best_id)),
            ("best OOD", _fmt(stats.best_ood)), ("front size", str(stats.front_size))):
        table.add_row(label, value)
    return table


def front_table(study: Any, objective_names: list[str]) -> Table:
    """The Pareto front of the study, one row per non-dominated trial."""
    table = Table(title="Pareto front")
    table.add_column("#", justify="right")
    for name in objective_names:
        table.add_column(name, justify="right")
    table.add_column("params")
    for row in front_rows(study_front(study, objective_names)):
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.params.items())
        table.add_row(str(row.number), *(f"{value:.3f}" for _, value, _ in row.objectives),
                      params + (f" ({row.reference})" if row.reference else ""))
    return table
