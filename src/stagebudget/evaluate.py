"""Batched greedy evaluation of a model on a suite's ID-test and OOD-test splits.

Prompts (text or chat messages) are tokenised exactly as TRL's SFT and GRPO trainers tokenise
them (:mod:`stagebudget.chat`), so the model is measured on the inputs it was trained on;
generation stops at every stop token the model declares, and the task's ``answer`` extraction
and scorer turn each completion into a score.
"""

from __future__ import annotations

from typing import Any

from stagebudget.records import ID_ACCURACY, OOD_ACCURACY

EVAL_BATCH = 256


def max_new_tokens_for(suite: Any, tokenizer: Any) -> int:
    """The task's ``max_new_tokens`` if set, else the longest tokenised test target plus 2."""
    from stagebudget.chat import default_max_new_tokens

    if suite.max_new_tokens is not None:
        return int(suite.max_new_tokens)
    return default_max_new_tokens(tokenizer, suite)


def accuracy(model: Any, tokenizer: Any, suite: Any, examples: list[Any], max_new_tokens: int,
             batch_size: int = EVAL_BATCH) -> float:
    """Mean ``suite.score`` of greedy completions of ``examples`` (0.0 for an empty split)."""
    from stagebudget.basemodel import greedy_generate

    if not examples:
        return 0.0
    preds = greedy_generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens,
                            batch_size=batch_size)
    scores = [suite.score(e, p) for e, p in zip(examples, preds, strict=True)]
    return sum(scores) / len(scores)


def evaluate(model: Any, tokenizer: Any, suite: Any, *, max_new_tokens: int | None = None,
             batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """``{"id_accuracy", "ood_accuracy"}`` of greedy decoding on the suite's test splits."""
    n_new = max_new_tokens or max_new_tokens_for(suite, tokenizer)
    return {
        ID_ACCURACY: accuracy(model, tokenizer, suite, suite.id_test, n_new, batch_size),
        OOD_ACCURACY: accuracy(model, tokenizer, suite, suite.ood_test, n_new, batch_size),
    }
