"""The reference the fast greedy decoder is checked against: ``model.generate`` itself, with the
arguments evaluation means (tests only)."""

from __future__ import annotations

from typing import Any


def generate_greedy(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int,
                    batch_size: int = 256) -> list[str]:
    """Greedy completions of ``prompts`` (text or chat messages) by ``model.generate``, cut at
    the first stop token.

    Prompts are tokenised as the trainers tokenise them (:func:`stagebudget.chat.prompt_ids`),
    left-padded into batches; generation stops at every stop token the model declares
    (:func:`stagebudget.chat.stop_token_ids`); special tokens are removed from the text.
    """
    import torch

    from stagebudget.chat import cut_at_stop, prompt_ids, stop_token_ids

    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            rows = [prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                device=device)
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=mask,
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad, eos_token_id=stops)
            for row in gen[:, width:].tolist():
                out.append(tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out
