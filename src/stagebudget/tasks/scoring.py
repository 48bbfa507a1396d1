"""Scorers: ``(prediction, answer) -> float in [0, 1]``.

>>> SCORERS["exact"](" MW ", "MW")
1.0
>>> SCORERS["per_position"]("MWK", "MWR")
0.6666666666666666
"""

from __future__ import annotations

from collections.abc import Callable

NONE_MARK = "-"  # how an empty set is written in set-valued answers


def exact(prediction: str, answer: str) -> float:
    """1.0 when the stripped strings are equal, else 0.0."""
    return 1.0 if prediction.strip() == answer.strip() else 0.0


def per_position(prediction: str, answer: str) -> float:
    """Fraction of positions that match, over the longer of the two strings."""
    p, a = prediction.strip(), answer.strip()
    longest = max(len(p), len(a))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(p, a, strict=False)) / longest


def _as_set(text: str) -> set[str]:
    items = {t.strip() for t in text.strip().split(",")}
    return {t for t in items if t and t != NONE_MARK}


def set_f1(prediction: str, answer: str) -> float:
    """F1 between comma-separated sets ("-" or "" is the empty set; two empty sets score 1)."""
    p, a = _as_set(prediction), _as_set(answer)
    if not p and not a:
        return 1.0
    hits = len(p & a)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(p), hits / len(a)
    return 2 * precision * recall / (precision + recall)


def numeric(prediction: str, answer: str) -> float:
    """1.0 within tolerance, then a linear decay to 0.0; unparsable predictions score 0.

    The tolerance is ``max(0.5, 5% of |answer|)``; the score falls linearly from 1 at the
    tolerance to 0 at five times the tolerance. ``numeric("3", "3") == 1.0``,
    ``numeric("4", "3") == 0.75``.
    """
    try:
        p, a = float(prediction.strip()), float(answer.strip())
    except ValueError:
        return 0.0
    if p != p:  # NaN
        return 0.0
    tol = max(0.5, 0.05 * abs(a))
    dist = abs(p - a)
    if dist <= tol:
        return 1.0
    return max(0.0, 1.0 - (dist - tol) / (4 * tol))


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact": exact,
    "per_position": per_position,
    "set_f1": set_f1,
    "numeric": numeric,
}
