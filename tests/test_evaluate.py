"""Evaluation: the fast greedy decoder gives exactly ``model.generate``'s completions."""

from __future__ import annotations

import pytest

from reference_generate import generate_greedy
from stagebudget.tasks import load_suite
from stagebudget.training.evaluate import evaluate, greedy_completions, max_new_tokens_for
from stagebudget.training.model import load_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_greedy_completions_match_generate_row_for_row(tiny_base):
    model, tok = load_model_and_tokenizer(tiny_base)
    suite = load_suite(n_train=10, n_id_test=60, n_ood_test=60)
    prompts = [e.prompt for e in suite.id_test + suite.ood_test]
    n_new = max_new_tokens_for(suite, tok)
    # small batches: rows of several prompt lengths share a batch, and batches end at
    # different steps
    want = generate_greedy(model, tok, prompts, n_new, batch_size=16)
    got = greedy_completions(model, tok, prompts, n_new, batch_size=16)
    assert got == want
    lengths = {len(o) for o in want}
    assert len(lengths) > 1, "every row ran to the same length: the test checks no early stop"
    assert greedy_completions(model, tok, prompts[:5], 2) == generate_greedy(model, tok,
                                                                             prompts[:5], 2)
    assert greedy_completions(model, tok, [], n_new) == []


def test_the_decoder_passes_the_cache_by_its_new_name_with_the_same_completions(tiny_base,
                                                                              monkeypatch):
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache`` (the old name warns
    and goes in 5.40): the new name gives bit-identical completions and no FutureWarning."""
    import warnings

    import stagebudget.training.evaluate as ev

    model, tok = load_model_and_tokenizer(tiny_base)
    suite = load_suite(n_train=10, n_id_test=30, n_ood_test=30)
    prompts = [e.prompt for e in suite.id_test + suite.ood_test]
    n_new = max_new_tokens_for(suite, tok)
    assert ev.cache_kwarg(model) == "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = greedy_completions(model, tok, prompts, n_new, batch_size=16)
    monkeypatch.setattr(ev, "cache_kwarg", lambda m: "past_key_values")  # the old call
    with pytest.warns(FutureWarning, match="past_key_values"):
        old = greedy_completions(model, tok, prompts, n_new, batch_size=16)
    assert got == old


def test_evaluate_reports_each_accuracy_with_its_standard_error(tiny_base):
    model, tok = load_model_and_tokenizer(tiny_base)
    suite = load_suite(n_train=10, n_id_test=40, n_ood_test=30)
    model.train()
    out = evaluate(model, tok, suite)
    assert model.training  # evaluation switches to eval mode and back
    preds = generate_greedy(model, tok, [e.prompt for e in suite.id_test],
                            max_new_tokens_for(suite, tok))
    id_acc = sum(suite.score(e, p) for e, p in zip(suite.id_test, preds, strict=True)) / 40
    assert out["id_accuracy"] == pytest.approx(id_acc)
    assert set(out) == {"id_accuracy", "id_accuracy_se", "ood_accuracy", "ood_accuracy_se",
                        "id_outcomes", "ood_outcomes"}
    # the per-prompt outcomes, in test-set order, are the scores the accuracy averages
    assert out["id_outcomes"] == "".join(
        "1" if suite.score(e, p) else "0" for e, p in zip(suite.id_test, preds, strict=True))
    assert len(out["ood_outcomes"]) == 30
