"""Batched greedy evaluation of a model on a suite's ID-test and OOD-test splits.

Prompts (text or chat messages) are tokenised exactly as TRL's SFT and GRPO trainers tokenise
them (:mod:`stagebudget.chat`), so the model is measured on the inputs it was trained on;
generation stops at every stop token the model declares, and the task's ``answer`` extraction
and scorer turn each completion into a score.
"""

from __future__ import annotations

import math
from typing import Any

from stagebudget.names import ID_ACCURACY, OOD_ACCURACY, STANDARD_ERROR_OF
from stagebudget.stats import OUTCOMES_OF, encode_outcomes

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

    >>> [round(v, 6) for v in mean_and_se([1.0, 0.0, 1.0, 0.0])]
    [0.5, 0.288675]
    """
    n = len(scores)
    if n == 0:
        return 0.0, 0.0
    mean = sum(scores) / n
    if n == 1:
        return mean, 0.0
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, math.sqrt(var / n)


def greedy_completions(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int,
                       batch_size: int = EVAL_BATCH) -> list[str]:
    """Greedy completions of ``prompts``, cut at the first stop token; the same text as
    ``model.generate`` (greedy, stopping at every stop token the model declares), faster.

    Prompts are tokenised as the trainers tokenise them (:func:`stagebudget.chat.prompt_ids`)
    and left-padded in batches of ``batch_size``; decoding reuses the key/value cache, and a
    row that has produced a stop token leaves the batch (``generate`` keeps decoding every row
    until the last one stops; answers of graded length make that most of the work).
    """
    import torch

    from stagebudget.chat import cut_at_stop, prompt_ids, stop_token_ids

    was_training = model.training
    model.eval()
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    # Batches of similar prompt length: little padding, and similar answer lengths stop together.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                new = _decode_batch(model, [ids[i] for i in chunk], max_new_tokens, pad, stops)
                for i, row in zip(chunk, new, strict=True):
                    out[i] = tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def cache_kwarg(model: Any) -> str:
    """The name a model's ``forward`` takes its key/value cache by: ``cache`` in transformers
    >= 5.24 (``past_key_values`` still works there with a FutureWarning and goes in 5.40), else
    ``past_key_values`` (older transformers, remote-code models). A peft wrapper passes it on."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _decode_batch(model: Any, rows: list[list[int]], max_new_tokens: int, pad: int,
                  stops: list[int]) -> list[list[int]]:
    """Greedy new tokens of left-padded ``rows`` (each up to and including its stop token)."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stop_ids = torch.tensor(stops, device=device)
    cache = DynamicCache(config=model.config)
    forward_kw: dict[str, Any] = {cache_kwarg(model): cache}
    if getattr(model.config, "output_router_logits", False):
        # MoE models that return router logits add their load-balancing loss, computed over the
        # attention mask, which a cached step's logits do not span; decoding needs no loss.
        forward_kw["output_router_logits"] = False
    new: list[list[int]] = [[] for _ in rows]
    alive = torch.arange(len(rows), device=device)
    for t in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=True, **forward_kw).logits[:, -1]
        nxt = logits.argmax(-1)
        for row, tok in zip(alive.tolist(), nxt.tolist(), strict=True):
            new[row].append(tok)
        keep = ~torch.isin(nxt, stop_ids)
        if t == max_new_tokens - 1 or not bool(keep.any()):
            break
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            alive, nxt, mask, positions = alive[idx], nxt[idx], mask[idx], positions[idx]
        ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return new


def scores(model: Any, tokenizer: Any, suite: Any, examples: list[Any], max_new_tokens: int,
           batch_size: int = EVAL_BATCH) -> list[float]:
    """``suite.score`` of the greedy completion of each example."""
    if not examples:
        return []
    preds = greedy_completions(model, tokenizer, [e.prompt for e in examples], max_new_tokens,
                               batch_size=batch_size)
    return [suite.score(e, p) for e, p in zip(examples, preds, strict=True)]


def evaluate(model: Any, tokenizer: Any, suite: Any, *, max_new_tokens: int | None = None,
             batch_size: int = EVAL_BATCH) -> dict[str, Any]:
    """Greedy decoding on the suite's test splits: each accuracy, its standard error and its
    per-prompt outcomes (so two checkpoints can be compared prompt by prompt,
    :mod:`stagebudget.stats`).

    Keys: ``id_accuracy``, ``id_accuracy_se``, ``ood_accuracy``, ``ood_accuracy_se`` and
    ``id_outcomes``, ``ood_outcomes`` (:func:`~stagebudget.stats.encode_outcomes`).
    """
    n_new = max_new_tokens or max_new_tokens_for(suite, tokenizer)
    out: dict[str, Any] = {}
    for split, key in ((suite.id_test, ID_ACCURACY), (suite.ood_test, OOD_ACCURACY)):
        per_prompt = scores(model, tokenizer, suite, split, n_new, batch_size)
        out[key], out[STANDARD_ERROR_OF[key]] = mean_and_se(per_prompt)
        out[OUTCOMES_OF[key]] = encode_outcomes(per_prompt)
    return out
