"""A task scorer written by the user: ``(prediction, answer) -> float in [0, 1]``.

stagebudget extracts ``prediction`` from the completion first (``answer: answer_tag`` takes the
text inside the last ``<answer>...</answer>``), then calls this function. The same function
scores evaluation and is the RL reward (plus the format term).
"""

from __future__ import annotations


def base_match(prediction: str, answer: str) -> float:
    """Fraction of bases in the right place, over the longer of the two sequences.

    >>> base_match("TACGT", "TACGT")
    1.0
    >>> base_match("TACG", "TACGT")
    0.8
    """
    p, a = prediction.strip().upper(), answer.strip().upper()
    longest = max(len(p), len(a))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(p, a, strict=False)) / longest
