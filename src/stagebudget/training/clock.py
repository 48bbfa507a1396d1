"""What a trial actually spends: measured device-seconds per stage, training and evaluation apart.

A :class:`BudgetClock` is a stopwatch over training that pauses while the model is evaluated, so
the budget is charged for training only (evaluation is recorded beside it). On a CPU a
device-second is a wall-second; on GPUs it is wall-seconds times the GPUs held.

The schedule's planned steps are the contract: the planner fits them into the budget with the
cost model, and a trial trains exactly those steps whatever the machine's load, so the same
schedule gives the same result on an idle and on a busy machine. The measured spend is recorded
beside the planned one, and an overrun is flagged (``over_budget``, ``overrun_seconds``), never
hidden. A stage that starts from a cached prefix (:mod:`stagebudget.prefixcache`) is credited
the prefix's recorded spend (``reused_*``): what the schedule costs trained alone (its nominal
cost, ``train_seconds``) stays the same, while ``spent_train_seconds`` is what this trial
really trained. Only a runaway trial is stopped: :class:`BudgetCallback` ends a stage once training has
used ``guard`` times the budget (:data:`OVERRUN_GUARD` by default) and marks it
``stopped_by_guard``; the pipeline then fails the trial with :class:`BudgetGuardError`, so a
half-trained schedule is never scored.

>>> clock = BudgetClock(budget_seconds=10.0)
>>> clock.begin_stage("sft", 0, planned_steps=5, planned_seconds=4.0)
>>> clock.end_stage(steps_done=5)
>>> clock.ledger()["stages"][0]["steps_done"]
5
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from stagebudget.errors import BudgetGuardError as BudgetGuardError  # re-exported: its old home
from stagebudget.names import SECONDS_PER_HOUR
from stagebudget.plan.cost import OVERRUN_GUARD


@dataclass
class StageEntry:
    """Measured spend of one stage (device-seconds)."""

    kind: str
    index: int
    planned_steps: int
    planned_seconds: float
    steps_done: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    setup_seconds: float = 0.0
    max_step_seconds: float = 0.0
    stopped_by_guard: bool = False
    cpu_seconds: float = 0.0  # process CPU time while training, all threads
    reused_steps: int = 0
    reused_train_seconds: float = 0.0
    reused_eval_seconds: float = 0.0
    # the reused prefix on the guard's clock (CPU time per thread on a CPU): its stopwatch
    # seconds were measured under whatever load the trial that trained it ran beside
    reused_guard_seconds: float = 0.0

    @property
    def nominal_train_seconds(self) -> float:
        """Training seconds of this stage trained alone: reused prefix + trained now."""
        return self.reused_train_seconds + self.train_seconds


class BudgetClock:
    """Stopwatch of training device-seconds against an optional budget.

    ``budget_seconds`` is the whole schedule's training budget (None: unlimited); ``guard`` is the
    multiple of it after which a runaway trial is stopped. ``gpus`` is the number of devices held
    (device-seconds = wall-seconds x gpus; 1 on a CPU).
    """

    def __init__(self, budget_seconds: float | None = None, *, device: str = "cpu",
                 gpus: int = 1, timer: Any = time.perf_counter,
                 guard: float = OVERRUN_GUARD, cpu_timer: Any = None, threads: int = 1) -> None:
        if budget_seconds is not None and budget_seconds <= 0:
            raise ValueError(f"budget_seconds must be > 0 or None, but got {budget_seconds}")
        if guard < 1:
            raise ValueError(f"the overrun guard must be >= 1 (times the budget), but got {guard}")
        self.guard = guard
        if gpus < 1:
            raise ValueError(f"gpus must be >= 1, but got {gpus}")
        self.budget_seconds = budget_seconds
        self.device = device
        self.gpus = gpus if device.startswith("cuda") else 1
        self._timer = timer
        # On a CPU the guard reads the process's CPU time per thread (``cpu_timer``, e.g.
        # time.process_time), which waiting for a busy core does not advance: a trial slowed
        # down by other processes is not a runaway. Without it (GPUs, tests) the guard reads
        # the training stopwatch.
        self._cpu_timer = cpu_timer if not self.device.startswith("cuda") else None
        self.threads = max(1, threads)
        self.stages: list[StageEntry] = []
        self._running_since: float | None = None
        self._cpu_since: float | None = None

    # --- stage bookkeeping -----------------------------------------------------------------
    def begin_stage(self, kind: str, index: int, *, planned_steps: int,
                    planned_seconds: float) -> None:
        """Open the ledger entry of a stage (the clock is not running yet)."""
        self.stages.append(StageEntry(kind, index, planned_steps, planned_seconds))

    def end_stage(self, steps_done: int) -> None:
        """Close the current stage, stopping the training timer if it runs."""
        self.stop()
        self.current.steps_done = steps_done

    def credit(self, steps: int, train_seconds: float, eval_seconds: float,
               guard_seconds: float | None = None) -> None:
        """Credit the current stage with a reused prefix: ``steps`` already trained (by another
        trial) for ``train_seconds`` of training and ``eval_seconds`` of evaluation, and
        ``guard_seconds`` on the guard's clock (default: ``train_seconds``)."""
        entry = self.current
        entry.reused_steps = steps
        entry.reused_train_seconds, entry.reused_eval_seconds = train_seconds, eval_seconds
        entry.reused_guard_seconds = train_seconds if guard_seconds is None else guard_seconds

    @property
    def current(self) -> StageEntry:
        if not self.stages:
            raise RuntimeError("no stage has begun: call begin_stage first")
        return self.stages[-1]

    # --- the training stopwatch ------------------------------------------------------------
    def start(self) -> None:
        """Start (or resume) charging training time to the current stage."""
        if self._running_since is None:
            self._running_since = self._timer()
            self._cpu_since = self._cpu_timer() if self._cpu_timer is not None else None

    def stop(self) -> None:
        """Stop charging training time."""
        if self._running_since is not None:
            self.current.train_seconds += self._device_seconds(self._timer() - self._running_since)
            if self._cpu_since is not None and self._cpu_timer is not None:
                self.current.cpu_seconds += self._cpu_timer() - self._cpu_since
            self._running_since = self._cpu_since = None

    @property
    def running(self) -> bool:
        return self._running_since is not None

    @contextmanager
    def training(self) -> Iterator[None]:
        """Charge the body to the current stage's training time."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Pause the training timer; charge the body to the current stage's evaluation time."""
        was_running = self.running
        self.stop()
        start = self._timer()
        try:
            yield
        finally:
            if self.stages:
                self.current.eval_seconds += self._device_seconds(self._timer() - start)
            if was_running:
                self.start()

    @contextmanager
    def setting_up(self) -> Iterator[None]:
        """Charge the body (trainer construction, merging, publishing a checkpoint) to setup
        time, outside the budget; a running training timer is paused meanwhile."""
        was_running = self.running
        self.stop()
        start = self._timer()
        try:
            yield
        finally:
            self.current.setup_seconds += self._device_seconds(self._timer() - start)
            if was_running:
                self.start()

    def _device_seconds(self, wall: float) -> float:
        return wall * self.gpus

    # --- queries ---------------------------------------------------------------------------
    def train_seconds(self) -> float:
        """Nominal training device-seconds so far (all stages, reused prefixes included, and a
        running timer): what the schedule has cost as if trained alone."""
        return self.spent_seconds() + sum(s.reused_train_seconds for s in self.stages)

    def spent_seconds(self) -> float:
        """Training device-seconds this trial really trained so far (reused prefixes excluded)."""
        total = sum(s.train_seconds for s in self.stages)
        if self._running_since is not None:
            total += self._device_seconds(self._timer() - self._running_since)
        return total

    def stage_seconds(self) -> tuple[float, float]:
        """Nominal (training, evaluation) device-seconds of the current stage so far."""
        entry = self.current
        running = (self._device_seconds(self._timer() - self._running_since)
                   if self._running_since is not None else 0.0)
        return (entry.nominal_train_seconds + running,
                entry.reused_eval_seconds + entry.eval_seconds)

    def remaining(self) -> float | None:
        """Training device-seconds left in the budget (None: no budget)."""
        if self.budget_seconds is None:
            return None
        return self.budget_seconds - self.train_seconds()

    def guard_seconds(self) -> float | None:
        """Training device-seconds after which a runaway trial is stopped (None: no budget)."""
        return None if self.budget_seconds is None else self.budget_seconds * self.guard

    def guarded_seconds(self) -> float:
        """What the guard compares with its limit: nominal training seconds, counted on a CPU
        as the process's CPU time per thread (load-independent), else as the stopwatch; a reused
        prefix counts what it used on the same clock."""
        return sum(self._guarded(s) for s in self.stages)

    def stage_guarded_seconds(self) -> float:
        """:meth:`guarded_seconds` of the current stage alone (what a cache entry records)."""
        return self._guarded(self.current)

    def _guarded(self, entry: StageEntry) -> float:
        if self._cpu_timer is None:
            running = (self._device_seconds(self._timer() - self._running_since)
                       if self._running_since is not None and entry is self.current else 0.0)
            return entry.nominal_train_seconds + running
        cpu = entry.cpu_seconds
        if self._cpu_since is not None and entry is self.current:
            cpu += float(self._cpu_timer()) - self._cpu_since
        return cpu / self.threads + entry.reused_guard_seconds

    def past_guard(self) -> bool:
        """True once training has used more than the overrun guard allows."""
        limit = self.guard_seconds()
        return limit is not None and self.guarded_seconds() > limit

    def overrun_seconds(self) -> float:
        """Training device-seconds spent beyond the budget (0 when within it or unlimited)."""
        if self.budget_seconds is None:
            return 0.0
        return max(0.0, self.train_seconds() - self.budget_seconds)

    def ledger(self) -> dict[str, Any]:
        """Plain-dict ledger: per stage and in total. ``train_seconds``/``device_hours`` are
        nominal (reused prefixes included); ``spent_*`` is what this trial trained."""
        train, spent = self.train_seconds(), self.spent_seconds()
        return {
            "device": self.device,
            "gpus": self.gpus,
            "budget_seconds": self.budget_seconds,
            "train_seconds": train,
            "eval_seconds": sum(s.eval_seconds for s in self.stages),
            "setup_seconds": sum(s.setup_seconds for s in self.stages),
            "device_hours": train / SECONDS_PER_HOUR,
            "spent_train_seconds": spent,
            "spent_device_hours": spent / SECONDS_PER_HOUR,
            "reused_train_seconds": train - spent,
            "guard_seconds": self.guard_seconds(),
            "guarded_seconds": self.guarded_seconds(),
            "guard_clock": "cpu-time per thread" if self._cpu_timer is not None else "stopwatch",
            "over_budget": self.overrun_seconds() > 0,
            "stopped_by_guard": any(s.stopped_by_guard for s in self.stages),
            "overrun_seconds": self.overrun_seconds(),
            "stages": [asdict(s) for s in self.stages],
        }


# Per-stage ledger fields that add up over the workers of one trial (device-seconds).
_SUMMED = ("train_seconds", "eval_seconds", "setup_seconds", "cpu_seconds", "reused_train_seconds",
           "reused_eval_seconds", "reused_guard_seconds")


def combine_ledgers(ledgers: list[dict[str, Any]]) -> dict[str, Any]:
    """One trial's ledger from the ledgers of its data-parallel workers (rank order).

    Device-seconds add up: a trial on 2 workers that trained 10 s of wall time spent 20
    device-seconds, and the budget (each worker held its share) adds up the same way. Steps
    are the trial's (every worker took the same steps). ``workers`` lists what each worker
    spent, so the record shows every worker's share.

    >>> one = BudgetClock(budget_seconds=5.0); one.begin_stage("sft", 0, planned_steps=2,
    ...     planned_seconds=1.0); one.current.train_seconds = 3.0
    >>> both = combine_ledgers([one.ledger(), one.ledger()])
    >>> both["train_seconds"], both["budget_seconds"], len(both["workers"])
    (6.0, 10.0, 2)
    """
    first = {k: v for k, v in ledgers[0].items() if k != "host"}
    total = {k: sum(float(led[k] or 0.0) for led in ledgers)
             for k in ("train_seconds", "eval_seconds", "setup_seconds", "spent_train_seconds",
                       "reused_train_seconds", "guarded_seconds")}
    budget = (sum(float(led["budget_seconds"]) for led in ledgers)
              if first["budget_seconds"] is not None else None)
    stages = []
    for entries in zip(*(led["stages"] for led in ledgers), strict=True):
        stage = {**entries[0], **{k: sum(float(e[k]) for e in entries) for k in _SUMMED}}
        stage["max_step_seconds"] = max(float(e["max_step_seconds"]) for e in entries)
        stage["stopped_by_guard"] = any(e["stopped_by_guard"] for e in entries)
        stages.append(stage)
    overrun = max(0.0, total["train_seconds"] - budget) if budget is not None else 0.0
    guard = first["guard_seconds"]
    return {
        **first, **total, "budget_seconds": budget,
        "device_hours": total["train_seconds"] / SECONDS_PER_HOUR,
        "spent_device_hours": total["spent_train_seconds"] / SECONDS_PER_HOUR,
        "guard_seconds": guard * len(ledgers) if guard is not None else None,
        "over_budget": overrun > 0, "overrun_seconds": overrun,
        "stopped_by_guard": any(led["stopped_by_guard"] for led in ledgers),
        "stages": stages,
        "workers": [{"rank": r, "host": led.get("host"),
                     **{k: led[k] for k in ("train_seconds", "spent_train_seconds",
                                            "reused_train_seconds", "eval_seconds",
                                            "setup_seconds", "guarded_seconds")},
                     "stages": [{k: s[k] for k in ("index", "kind", "train_seconds", "eval_seconds",
                                                   "cpu_seconds", "steps_done", "reused_steps",
                                                   "reused_train_seconds")}
                                for s in led["stages"]]}
                    for r, led in enumerate(ledgers)],
    }


def budget_callback(clock: BudgetClock) -> Any:
    """A ``TrainerCallback`` that stops a runaway stage once the overrun guard is passed.

    Within the guard a stage always trains all its planned steps: the budget was enforced
    when the schedule was planned. Built lazily so that importing this module does not import
    transformers.
    """
    from transformers import TrainerCallback

    from stagebudget.training.distributed import any_rank

    class BudgetCallback(TrainerCallback):  # type: ignore[misc]
        """Record the slowest step; stop and mark the stage when the guard is passed."""

        def __init__(self) -> None:
            self.last_mark = clock.train_seconds()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last_mark = clock.train_seconds()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = clock.train_seconds()
            entry = clock.current
            entry.max_step_seconds = max(entry.max_step_seconds, now - self.last_mark)
            self.last_mark = now
            # Several workers stop together or not at all (a lone stopped worker would leave
            # the others waiting at the next gradient all-reduce).
            if any_rank(clock.past_guard()) and state.global_step < state.max_steps:
                control.should_training_stop = True
                entry.stopped_by_guard = True

    return BudgetCallback()
