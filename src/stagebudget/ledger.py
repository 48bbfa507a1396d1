"""What a trial actually spends: measured device-seconds per stage, training and evaluation apart.

A :class:`BudgetClock` is a stopwatch over training that pauses while the model is evaluated, so
the budget is charged for training only (evaluation is recorded beside it). On a CPU a
device-second is a wall-second; on GPUs it is wall-seconds times the GPUs held.

:class:`BudgetCallback` stops a stage *before* a step that would pass the remaining budget (using
the last step's duration as the estimate of the next), so the measured training time never exceeds
the budget by more than one step. A stop is recorded (``stopped_at_budget``) and any overrun is
recorded too (``overrun_seconds``), never hidden.

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
    stopped_at_budget: bool = False


class BudgetClock:
    """Stopwatch of training device-seconds against an optional budget.

    ``budget_seconds`` is the whole schedule's training budget (None: unlimited). ``gpus`` is the
    number of devices held (device-seconds = wall-seconds x gpus; 1 on a CPU).
    """

    def __init__(self, budget_seconds: float | None = None, *, device: str = "cpu",
                 gpus: int = 1, timer: Any = time.perf_counter) -> None:
        if budget_seconds is not None and budget_seconds <= 0:
            raise ValueError(f"budget_seconds must be > 0 or None, but got {budget_seconds}")
        if gpus < 1:
            raise ValueError(f"gpus must be >= 1, but got {gpus}")
        self.budget_seconds = budget_seconds
        self.device = device
        self.gpus = gpus if device.startswith("cuda") else 1
        self._timer = timer
        self.stages: list[StageEntry] = []
        self._running_since: float | None = None

    # --- stage bookkeeping -----------------------------------------------------------------
    def begin_stage(self, kind: str, index: int, *, planned_steps: int,
                    planned_seconds: float) -> None:
        """Open the ledger entry of a stage (the clock is not running yet)."""
        self.stages.append(StageEntry(kind, index, planned_steps, planned_seconds))

    def end_stage(self, steps_done: int) -> None:
        """Close the current stage, stopping the training timer if it runs."""
        self.stop()
        self.current.steps_done = steps_done

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

    def stop(self) -> None:
        """Stop charging training time."""
        if self._running_since is not None:
            self.current.train_seconds += self._device_seconds(self._timer() - self._running_since)
            self._running_since = None

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
        """Charge the body (trainer construction, merging) to setup time, outside the budget."""
        start = self._timer()
        try:
            yield
        finally:
            self.current.setup_seconds += self._device_seconds(self._timer() - start)

    def _device_seconds(self, wall: float) -> float:
        return wall * self.gpus

    # --- queries ---------------------------------------------------------------------------
    def train_seconds(self) -> float:
        """Training device-seconds spent so far (all stages, including a running timer)."""
        total = sum(s.train_seconds for s in self.stages)
        if self._running_since is not None:
            total += self._device_seconds(self._timer() - self._running_since)
        return total

    def remaining(self) -> float | None:
        """Training device-seconds left in the budget (None: no budget)."""
        if self.budget_seconds is None:
            return None
        return self.budget_seconds - self.train_seconds()

    def exhausted(self) -> bool:
        """True when no training time is left."""
        left = self.remaining()
        return left is not None and left <= 0

    def fits(self, step_seconds: float) -> bool:
        """Whether one more step of ``step_seconds`` stays within the budget."""
        left = self.remaining()
        return left is None or (left > 0 and left >= step_seconds)

    def overrun_seconds(self) -> float:
        """Training device-seconds spent beyond the budget (0 when within it or unlimited)."""
        if self.budget_seconds is None:
            return 0.0
        return max(0.0, self.train_seconds() - self.budget_seconds)

    def ledger(self) -> dict[str, Any]:
        """Plain-dict ledger: per stage and in total."""
        train = self.train_seconds()
        return {
            "device": self.device,
            "gpus": self.gpus,
            "budget_seconds": self.budget_seconds,
            "train_seconds": train,
            "eval_seconds": sum(s.eval_seconds for s in self.stages),
            "setup_seconds": sum(s.setup_seconds for s in self.stages),
            "device_hours": train / 3600.0,
            "stopped_at_budget": any(s.stopped_at_budget for s in self.stages),
            "overrun_seconds": self.overrun_seconds(),
            "stages": [asdict(s) for s in self.stages],
        }


def budget_callback(clock: BudgetClock, prior_step_seconds: float | None = None) -> Any:
    """A ``TrainerCallback`` that stops training before a step that would pass the budget.

    The next step is estimated to take as long as the last one (before the first step,
    ``prior_step_seconds``, e.g. the cost model's estimate). Built lazily so that importing this
    module does not import transformers.
    """
    from transformers import TrainerCallback

    class BudgetCallback(TrainerCallback):  # type: ignore[misc]
        """Stop before a step that would overrun; mark the stage as stopped at the budget."""

        def __init__(self) -> None:
            self.last_mark = clock.train_seconds()
            self.estimate = prior_step_seconds or 0.0

        def _check(self, control: Any) -> None:
            if not clock.fits(self.estimate):
                control.should_training_stop = True
                clock.current.stopped_at_budget = True

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # The Trainer takes its first step whatever the control says: whether a stage may
            # start at all is decided before it is built (``BudgetClock.fits``).
            self.last_mark = clock.train_seconds()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = clock.train_seconds()
            self.estimate = now - self.last_mark
            self.last_mark = now
            entry = clock.current
            entry.max_step_seconds = max(entry.max_step_seconds, self.estimate)
            if state.global_step < state.max_steps:
                self._check(control)

    return BudgetCallback()
