"""What one trial scored and spent: the one result type every trial function returns.

:func:`stagebudget.training.pipeline.run_schedule` fills it from a real run, the replay
(:func:`stagebudget.searching.replay.replay_trial`) from a benchmark table row and the fakes
(:func:`stagebudget.testing.fakes.fake_trial_fn`) from a formula; the trainable reads only its
:meth:`TrialResult.objectives` and ``ledger``. Light on purpose (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stagebudget.names import DEVICE_HOURS, ID_ACCURACY, OOD_ACCURACY
from stagebudget.schedule import Schedule

__all__ = ["TrialResult"]


@dataclass
class TrialResult:
    """What one trained (or replayed, or faked) schedule scored and spent.

    ``device_hours`` is the measured training time, ``planned_device_hours`` what the cost
    model planned (a replayed or fake trial has only the one figure: both are equal).
    ``standard_errors`` holds the accuracies' standard errors that were measured.
    """

    schedule: Schedule
    id_accuracy: float
    ood_accuracy: float
    device_hours: float
    planned_device_hours: float
    curves: list[dict[str, Any]] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    standard_errors: dict[str, float] = field(default_factory=dict)

    def objectives(self) -> dict[str, float]:
        """``{"id_accuracy", "ood_accuracy", "device_hours"}`` and the accuracies' standard
        errors (``id_accuracy_se``, ``ood_accuracy_se``)."""
        return {ID_ACCURACY: self.id_accuracy, OOD_ACCURACY: self.ood_accuracy,
                DEVICE_HOURS: self.device_hours, **self.standard_errors}
