"""Scorers ``(prediction, answer) -> float in [0, 1]`` and answer extraction.

A task's ``scorer`` is a built-in name (:data:`SCORERS`) or an import path
``package.module:function`` (importable: installed or on ``PYTHONPATH``) or a file path
``path/to/file.py:function`` (relative to the space or schedule file) to a user function with
the same signature::

    def my_scorer(prediction: str, answer: str) -> float:  # 0.0 (wrong) .. 1.0 (right)
        ...

``prediction`` is the part of the model's completion that the task's ``answer`` setting
extracts (:data:`EXTRACTIONS`), ``answer`` is the reference answer from the task file. The
same function scores evaluation and is the RL reward (plus an optional format term).

>>> SCORERS["exact"](" MW ", "MW")
1.0
>>> SCORERS["per_position"]("MWK", "MWR")
0.6666666666666666
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagebudget.errors import ScorerError

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


# Dense counterparts of all-or-nothing scorers, used as partial credit in the RL reward: an
# exact-match reward gives a GRPO group no signal when all its completions are wrong (or all
# right), however close they came; graded scorers already give partial credit.
DENSE_OF = {"exact": "per_position"}


def partial_credit(scorer: str, prediction: str | None, answer: str) -> float:
    """Partial credit in [0, 1] of ``prediction`` for a task scored by ``scorer`` (a name or
    import path): the dense counterpart (:data:`DENSE_OF`) of an all-or-nothing scorer, else 0
    (graded and user scorers give their own partial credit). No answer scores 0.

    >>> partial_credit("exact", "MWK", "MWR"), partial_credit("numeric", "4", "3")
    (0.6666666666666666, 0.0)
    """
    dense = DENSE_OF.get(scorer)
    if dense is None or prediction is None:
        return 0.0
    return float(SCORERS[dense](prediction, answer))


Scorer = Callable[[str, str], float]
EXTRACTIONS = ("full", "answer_tag", "last_line", "regex:PATTERN")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def resolve_scorer(ref: str, base_dir: Path | None = None) -> Scorer:
    """The scorer named ``ref``: a key of :data:`SCORERS`, ``package.module:function`` or
    ``file.py:function`` (a relative file path is taken from ``base_dir``).

    >>> resolve_scorer("exact") is exact
    True
    >>> resolve_scorer("stagebudget.tasks.scoring:numeric") is numeric
    True
    """
    if ref in SCORERS:
        return SCORERS[ref]
    module_name, sep, attr = ref.rpartition(":")
    if not sep or not module_name or not attr:
        raise ScorerError(f"unknown scorer {ref!r}; allowed: {', '.join(SCORERS)}, an import "
                          "path 'package.module:function' or a file 'file.py:function', naming "
                          "a function (prediction, answer) -> float in [0, 1]")
    try:
        module = (_load_file(module_name, base_dir) if module_name.endswith(".py")
                  else importlib.import_module(module_name))
    except Exception as exc:  # the user's module: any import failure is a user error
        raise ScorerError(f"scorer {ref!r}: cannot import {module_name!r} "
                          f"({type(exc).__name__}: {exc}); a module must be importable "
                          "(installed or on PYTHONPATH), a .py file must exist (relative paths "
                          "start at the space or schedule file's folder)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ScorerError(f"scorer {ref!r}: {module_name!r} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


def _load_file(name: str, base_dir: Path | None) -> Any:
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    key = "stagebudget_scorer_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    sys.modules[key] = module
    return module


def is_scorer_file(ref: str | None) -> bool:
    """True for the ``file.py:function`` form (whose path is resolved like other paths)."""
    return ref is not None and ref.rpartition(":")[0].endswith(".py")


def check_scorer(ref: str, fn: Scorer, prediction: str, answer: str) -> None:
    """Call ``fn`` once; raise :class:`ScorerError` unless it returns a number in [0, 1]."""
    try:
        value = fn(prediction, answer)
    except Exception as exc:
        raise ScorerError(f"scorer {ref!r} raised {type(exc).__name__}: {exc} when called as "
                          f"{ref}(prediction={prediction!r}, answer={answer!r})") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ScorerError(f"scorer {ref!r} returned {value!r} for prediction={prediction!r}, "
                          f"answer={answer!r}; a scorer must return a number in [0, 1]")


def check_extraction(mode: str) -> None:
    """Raise :class:`ScorerError` unless ``mode`` is one of :data:`EXTRACTIONS`."""
    if mode.startswith("regex:"):
        try:
            re.compile(mode[len("regex:"):])
        except re.error as exc:
            raise ScorerError(f"answer {mode!r}: invalid regular expression ({exc})") from None
        return
    if mode not in EXTRACTIONS:
        raise ScorerError(f"unknown answer extraction {mode!r}; allowed: {', '.join(EXTRACTIONS)}")


def extract(mode: str, completion: str) -> str | None:
    """The answer inside ``completion`` (None when there is none), by extraction ``mode``.

    >>> extract("answer_tag", "<think>2+2</think><answer> 4 </answer>")
    '4'
    >>> extract("last_line", "reasoning\\nMW\\n")
    'MW'
    >>> extract(r"regex:=\\s*(\\d+)", "x = 3, so y = 42")
    '42'
    >>> extract("answer_tag", "no tags") is None
    True
    """
    if mode == "full":
        return completion.strip()
    if mode == "answer_tag":
        found = _TAG.findall(completion)
        return found[-1].strip() if found else None
    if mode == "last_line":
        lines = [line.strip() for line in completion.splitlines() if line.strip()]
        return lines[-1] if lines else None
    matches = list(re.finditer(mode[len("regex:"):], completion))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.re.groups else last.group(0)).strip()
