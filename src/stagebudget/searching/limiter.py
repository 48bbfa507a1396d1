"""The search-wide budget (``budget.search_hours``): a Tune searcher wrapper that stops starting
trials once one more could pass it; running trials always finish (see
:mod:`stagebudget.searching.tune_adapter` for why Tune must never stop them)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher

from stagebudget.names import DEVICE_HOURS, SPENT_DEVICE_HOURS

log = logging.getLogger(__name__)


class BudgetLimiter(Searcher):
    """Searcher wrapper that stops *starting* trials once the search budget would be passed.

    Spend = device-hours finished trials really trained (a reused prefix is not charged
    twice; + ``prior_hours`` from before a resume)
    + planned device-hours of running ones. A new trial starts only if spend plus the per-trial
    budget (the most any trial can plan) fits in ``search_hours``. Running trials always finish,
    so no Optuna trial is left RUNNING and none is cut short with a half-trained score.
    """

    def __init__(self, searcher: Searcher, *, search_hours: float | None, per_trial_hours: float,
                 planned_hours: Callable[[dict[str, Any]], float], prior_hours: float = 0.0):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.search_hours = search_hours
        self.per_trial_hours = per_trial_hours
        self.planned_hours = planned_hours
        self.spent_hours = prior_hours
        self.running: dict[str, float] = {}
        self.measured: dict[str, float] = {}
        self.stopped_by_budget = False

    @property
    def committed_hours(self) -> float:
        return self.spent_hours + sum(self.running.values())

    def suggest(self, trial_id: str) -> dict | None:  # or Searcher.FINISHED (a str)
        if self.search_hours is not None and (
                self.committed_hours + self.per_trial_hours > self.search_hours + 1e-12):
            if not self.stopped_by_budget:
                log.info("search budget reached: %.4f of %.4f device-hours committed",
                         self.committed_hours, self.search_hours)
            self.stopped_by_budget = True
            return Searcher.FINISHED if not self.running else None  # type: ignore[return-value]
        config = self.searcher.suggest(trial_id)
        if isinstance(config, dict):
            try:
                self.running[trial_id] = self.planned_hours(config)
            except Exception:  # the trial itself will fail and say why; count it at full budget
                self.running[trial_id] = self.per_trial_hours
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if DEVICE_HOURS in result:
            self.measured[trial_id] = float(result[DEVICE_HOURS])
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        planned = self.running.pop(trial_id, 0.0)
        if result and (SPENT_DEVICE_HOURS in result or DEVICE_HOURS in result):
            # what the trial really trained: a reused prefix was paid for by an earlier trial
            self.spent_hours += float(result.get(SPENT_DEVICE_HOURS, result.get(DEVICE_HOURS, 0.0)))
        else:  # failed: charge what it had measured, else what it planned (it ran until killed)
            self.spent_hours += self.measured.get(trial_id, planned)
        self.measured.pop(trial_id, None)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def get_state(self) -> dict[str, Any]:
        # Tune saves each wrapper's state beside the inner searcher; keep it to plain numbers.
        return {"spent_hours": self.spent_hours, "running": dict(self.running),
                "stopped_by_budget": self.stopped_by_budget}

    def set_state(self, state: dict[str, Any]) -> None:
        self.spent_hours = state["spent_hours"]
        self.running = dict(state["running"])
        self.stopped_by_budget = state["stopped_by_budget"]

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
