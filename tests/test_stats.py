"""The statistics helper (issue 25, item 5) on inputs whose answers are known by hand."""

from __future__ import annotations

import math
import random

import pytest

from stagebudget.names import ID_ACCURACY, OOD_ACCURACY
from stagebudget.stats import (
    Estimate,
    cluster_bootstrap,
    decode_outcomes,
    encode_outcomes,
    mcnemar_p,
    paired_difference,
    row_outcomes,
)


def test_paired_difference_by_hand():
    before = [1, 1, 0, 0, 1, 0, 1, 0]
    after = [1, 1, 1, 1, 1, 0, 0, 0]
    d = paired_difference(before, after)
    diffs = [0, 0, 1, 1, 0, 0, -1, 0]  # mean 1/8; sample variance (3 - 8/64) / 7
    assert d.mean == pytest.approx(1 / 8)
    assert d.se == pytest.approx(math.sqrt((sum(x * x for x in diffs) - 8 * (1 / 8) ** 2) / 7 / 8))
    assert d.n == 8


def test_pairing_sees_a_shift_two_unpaired_errors_miss():
    """Two checkpoints that agree on most prompts: the paired error is far below the unpaired
    one, so a 3-point gain shows as a finding only when paired."""
    rng = random.Random(0)
    before = [1.0 if rng.random() < 0.5 else 0.0 for _ in range(1000)]
    after = list(before)
    flipped = [i for i, v in enumerate(before) if v == 0.0][:30]
    for i in flipped:
        after[i] = 1.0
    d = paired_difference(before, after)
    unpaired = math.sqrt(2 * 0.25 / 1000)
    assert d.mean == pytest.approx(0.03)
    assert d.se < unpaired / 3 and d.beyond(2) and not 2 * unpaired < 0.03
    assert mcnemar_p(before, after) == pytest.approx(2 * 0.5 ** 30)


def test_paired_outcomes_must_cover_the_same_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1, 0], [1, 0, 1])


def test_mcnemar_by_hand():
    # 3 gains, 1 loss: P(X <= 1 | n=4, 1/2) = 5/16, two-sided 10/16
    assert mcnemar_p([0, 0, 0, 1, 1], [1, 1, 1, 0, 1]) == pytest.approx(10 / 16)
    assert mcnemar_p([1, 0], [1, 0]) == 1.0


def test_cluster_bootstrap_resamples_whole_clusters():
    # Two seeds whose values differ only between seeds: resampling clusters gives exactly the
    # three possible means (both seed A, one of each, both seed B).
    clusters = {"a": [0.0, 0.0, 0.0], "b": [1.0, 1.0, 1.0]}
    e = cluster_bootstrap(clusters, n_boot=4000, seed=1)
    assert e.mean == 0.5 and e.n == 2
    assert e.low == 0.0 and e.high == 1.0
    assert e.se == pytest.approx(math.sqrt(0.125), rel=0.05)  # sd of the mean of 2 fair coins / 2
    # resampling values, not clusters, would have called this mean precise (se ~ .2 / sqrt(6))
    assert cluster_bootstrap(clusters, n_boot=10, seed=1) == cluster_bootstrap(clusters, n_boot=10, seed=1)


def test_cluster_bootstrap_takes_a_statistic_and_refuses_empty_input():
    e = cluster_bootstrap({1: [1.0, 3.0], 2: [5.0]}, statistic=max, n_boot=200)
    assert e.mean == 5.0 and e.low in (3.0, 5.0) and e.high == 5.0
    with pytest.raises(ValueError):
        cluster_bootstrap({})
    with pytest.raises(ValueError):
        cluster_bootstrap({"a": []})
    with pytest.raises(ValueError, match="level"):
        cluster_bootstrap({"a": [1.0]}, level=1.5)


def test_outcomes_round_trip_and_are_read_from_curve_rows():
    assert decode_outcomes(encode_outcomes([1, 0, 0, 1])) == [1.0, 0.0, 0.0, 1.0]
    assert decode_outcomes(encode_outcomes([0.25, 1.0])) == [0.25, 1.0]
    row = {ID_ACCURACY: 0.5, "id_outcomes": "10"}
    assert row_outcomes(row, ID_ACCURACY) == [1.0, 0.0]
    assert row_outcomes(row, OOD_ACCURACY) is None  # a row from before outcomes were kept
    with pytest.raises(ValueError, match="0 and 1"):
        decode_outcomes("10x")


def test_an_estimate_prints_with_its_error():
    assert str(Estimate(0.016, 0.005, 9, 0.01, 0.021)) == "+0.016 ± 0.005 [+0.010, +0.021]"
