"""Every common architecture family through stagebudget's evaluation: the fast greedy decoder
(key/value cache, rows leaving the batch as they stop) gives ``model.generate``'s tokens on MoE
routing, sliding-window and hybrid caches alike (a Qwen3-MoE model failed in its load-balancing
loss at the first evaluation)."""

from __future__ import annotations

import pytest

from families import EOS, FAMILIES, PAD, tiny_model
from stagebudget.training.evaluate import _decode_batch

# Prompts longer than the sliding window (4), of several lengths (left padding), and a stop
# token that some rows reach early (they leave the batch) while others run to the limit.
ROWS = [[5, 9, 14, 3, 22, 8, 40, 11], [7, 30], [12, 12, 60, 4, 19], [33, 42, 17, 9, 5, 71]]
NEW = 10


def _generate(model, rows, stops):
    import torch

    want = []
    for row in rows:  # one row at a time: no padding, the reference decoding
        out = model.generate(torch.tensor([row]), max_new_tokens=NEW, do_sample=False,
                             attention_mask=torch.ones(1, len(row), dtype=torch.long),
                             eos_token_id=stops, pad_token_id=PAD)
        new = out[0, len(row):].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
        want.append(new[:cut])
    return want


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_greedy_decoder_matches_generate_in_every_family(family: str) -> None:
    import torch

    model = tiny_model(family)
    with torch.inference_mode():
        free = _generate(model, ROWS, [EOS])
        # stop on a token the model emits mid-way, so that rows leave the batch at different steps
        stops = [EOS, free[0][min(2, len(free[0]) - 1)]]
        want = _generate(model, ROWS, stops)
        got = _decode_batch(model, ROWS, NEW, PAD, stops)
    assert got == want
