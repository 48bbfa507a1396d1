"""Statistics for comparing checkpoints measured on the same test prompts.

Every checkpoint of a study is scored on the same held-out prompts, so two accuracies are not
independent: their difference is measured best from the per-prompt outcomes of both (a paired
difference), whose standard error is often a third of what two unpaired standard errors
suggest. Seeds and trajectories are the units that repeat; :func:`cluster_bootstrap` resamples
them, not prompts or checkpoints that share a trajectory.

Each curve row keeps its per-prompt outcomes (:data:`OUTCOMES_OF`, encoded by
:func:`encode_outcomes`), so paired differences can be computed for any two evaluation points
of a run after the fact. Pure Python; nothing heavy is imported.

>>> d = paired_difference([1, 0, 1, 1], [1, 1, 1, 1])
>>> round(d.mean, 3), round(d.se, 3), d.n
(0.25, 0.25, 4)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from stagebudget.names import ID_ACCURACY, OOD_ACCURACY

# The curve-row keys that hold each accuracy's per-prompt outcomes (in test-set order).
OUTCOMES_OF = {ID_ACCURACY: "id_outcomes", OOD_ACCURACY: "ood_outcomes"}


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error and, where computed, an interval (``low``, ``high``)."""

    mean: float
    se: float
    n: int
    low: float | None = None
    high: float | None = None

    def beyond(self, k: float = 2.0) -> bool:
        """Is the mean more than ``k`` standard errors from zero (the project's bar for a
        finding)?

        >>> Estimate(0.05, 0.02, 100).beyond(), Estimate(0.03, 0.02, 100).beyond()
        (True, False)
        """
        return abs(self.mean) > k * self.se

    def __str__(self) -> str:
        text = f"{self.mean:+.3f} ± {self.se:.3f}"
        if self.low is not None and self.high is not None:
            text += f" [{self.low:+.3f}, {self.high:+.3f}]"
        return text


def encode_outcomes(scores: Sequence[float]) -> str | list[float]:
    """Per-prompt scores as a curve row keeps them: a string of ``0``/``1`` when every score is
    0 or 1 (exact match), else the scores rounded to 4 places.

    >>> encode_outcomes([1.0, 0.0, 1.0]), encode_outcomes([0.5, 1.0])
    ('101', [0.5, 1.0])
    """
    if all(s in (0, 1) for s in scores):
        return "".join("1" if s else "0" for s in scores)
    return [round(float(s), 4) for s in scores]


def decode_outcomes(value: str | Sequence[float]) -> list[float]:
    """The scores :func:`encode_outcomes` wrote.

    >>> decode_outcomes("101")
    [1.0, 0.0, 1.0]
    """
    if isinstance(value, str):
        if set(value) - {"0", "1"}:
            raise ValueError(f"per-prompt outcomes must be a string of 0 and 1, got {value[:20]!r}")
        return [1.0 if c == "1" else 0.0 for c in value]
    return [float(v) for v in value]


def row_outcomes(row: Mapping[str, object], objective: str) -> list[float] | None:
    """The per-prompt outcomes of ``objective`` in a curve row; None for a row measured before
    they were kept."""
    value = row.get(OUTCOMES_OF[objective])
    return decode_outcomes(value) if isinstance(value, str | list) else None  # type: ignore[arg-type]


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    mean, sd = _mean_sd(values)
    return mean, sd / math.sqrt(len(values))


def paired_difference(before: Sequence[float], after: Sequence[float]) -> Estimate:
    """``after - before`` on the same prompts: the mean per-prompt difference and its standard
    error (sample sd of the differences / sqrt(n)). The two must score the same prompts in
    the same order."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need the same prompts, but got {len(before)} and "
                         f"{len(after)} scores")
    mean, se = _mean_se([float(b) - float(a) for a, b in zip(before, after, strict=True)])
    return Estimate(mean, se, len(before))


def mcnemar_p(before: Sequence[float], after: Sequence[float]) -> float:
    """Exact two-sided McNemar p-value for 0/1 outcomes on the same prompts: of the prompts
    whose outcome changed, are gains and losses as even as a fair coin makes them?

    >>> mcnemar_p([0] * 5, [1] * 5)
    0.0625
    """
    gains = sum(1 for a, b in zip(before, after, strict=True) if b > a)
    losses = sum(1 for a, b in zip(before, after, strict=True) if a > b)
    n, k = gains + losses, min(gains, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def cluster_bootstrap(clusters: Mapping[object, Sequence[float]],
                      statistic: Callable[[list[float]], float] | None = None, *,
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Resample whole clusters (seeds, trajectories) with replacement; the statistic
    (default: the mean of all values) of each resample gives a standard error and a percentile
    interval. Values within a cluster share its randomness, so they are never resampled alone.

    >>> e = cluster_bootstrap({"s0": [0.1, 0.1], "s1": [0.1]}, n_boot=50)
    >>> round(e.mean, 6), round(e.se, 9), e.n
    (0.1, 0.0, 2)
    """
    if not clusters:
        raise ValueError("no clusters to resample")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    stat = statistic or (lambda v: sum(v) / len(v))
    groups = [list(map(float, v)) for v in clusters.values()]
    if any(not g for g in groups):
        raise ValueError("every cluster needs at least one value")
    rng = random.Random(seed)
    draws = []
    for _ in range(n_boot):
        picked = [v for _ in groups for v in rng.choice(groups)]
        draws.append(stat(picked))
    draws.sort()
    mean = stat([v for g in groups for v in g])
    _, sd = _mean_sd(draws)  # the bootstrap standard error: the spread of the draws
    tail = (1 - level) / 2
    low = draws[math.floor(tail * (n_boot - 1))]
    high = draws[math.ceil((1 - tail) * (n_boot - 1))]
    return Estimate(mean, sd, len(groups), low, high)
