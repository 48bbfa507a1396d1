"""Batched greedy evaluation of a model on a suite's ID-test and OOD-test splits.

Prompts (text or chat messages) are tokenised exactly as TRL's SFT and GRPO trainers tokenise
them (:mod:`stagebudget.chat`), so the model is measured on the inputs it was trained on;
generation stops at every stop token the model declares, and the task's ``answer`` extraction
and scorer turn each completion into a score.
"""

from __future__ import annotations

import math
from typing import Any

from stagebudget.records import ID_ACCURACY, ID_ACCURACY_SE, OOD_ACCURACY, OOD_ACCURACY_SE

EVAL_BATCH = 256


def max_new_tokens_for(suite: Any, tokenizer: Any) -> int:
    """The task's ``max_new_tokens`` if set, else the longest tokenised test target plus 2."""
    from stagebudget.chat import default_max_new_tokens

    if suite.max_new_tokens is not None:
        return int(suite.max_new_tokens)
    return default_max_new_tokens(tokenizer, suite)


def mean_and_se(scores: list[float]) -> tuple[float, float]:
    """Mean of per-example scores and its standard error (sample sd / sqrt(n)).

    For 0/1 scores this is the binomial standard error ``sqrt(p(1-p)/(n-1))``.

    >>> mean_and_se([1.0, 0.0, 1.0, 0.0])
    (0.5, 0.2886751345948129)
    """
    n = len(scores)
    if n == 0:
        return 0.0, 0.0
    mean = sum(scores) / n
    if n == 1:
        return mean, 0.0
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, math.sqrt(var / n)


def scores(model: Any, tokenizer: Any, suite: Any, examples: list[Any], max_new_tokens: int,
           batch_size: int = EVAL_BATCH) -> list[float]:
    """``suite.score`` of the greedy completion of each example."""
    from stagebudget.basemodel import greedy_generate

    if not examples:
        return []
    preds = greedy_generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens,
                            batch_size=batch_size)
    return [suite.score(e, p) for e, p in zip(examples, preds, strict=True)]


def evaluate(model: Any, tokenizer: Any, suite: Any, *, max_new_tokens: int | None = None,
             batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Greedy decoding on the suite's test splits: each accuracy and its standard error.

    Keys: ``id_accuracy``, ``id_accuracy_se``, ``ood_accuracy``, ``ood_accuracy_se``.
    """
    n_new = max_new_tokens or max_new_tokens_for(suite, tokenizer)
    out: dict[str, float] = {}
    for split, key, se_key in ((suite.id_test, ID_ACCURACY, ID_ACCURACY_SE),
                               (suite.ood_test, OOD_ACCURACY, OOD_ACCURACY_SE)):
        out[key], out[se_key] = mean_and_se(
            scores(model, tokenizer, suite, split, n_new, batch_size))
    return out
