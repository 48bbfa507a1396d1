"""What decides a trial's numbers besides the code: recorded, compared, and said when it moves."""

from __future__ import annotations

import logging

from stagebudget.prefixcache import PrefixCache, context_key
from stagebudget.searching.resume import warn_numerics_changed
from stagebudget.version import numerics, numerics_changes, package_versions


def test_numerics_name_the_cpu_kernels_and_the_versions_that_move_results():
    now = numerics()
    assert now["cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "NO AVX", "VSX", "ZVECTOR",
                                     "SVE256"} or now["cpu_capability"]
    assert {"torch", "transformers", "trl", "peft", "optuna", "ray", "datasets",
            "accelerate"} <= set(package_versions())
    assert numerics_changes(now, now) == []
    other = {"cpu_capability": "AVX2", "versions": {**now["versions"], "transformers": "5.0.0"}}
    changes = numerics_changes(other, now)
    assert f"cpu_capability AVX2 -> {now['cpu_capability']}" in changes or now["cpu_capability"] == "AVX2"
    assert f"transformers 5.0.0 -> {now['versions']['transformers']}" in changes


def test_resume_warns_naming_both_values_when_the_numerics_changed(caplog):
    now = numerics()
    with caplog.at_level(logging.WARNING):
        assert warn_numerics_changed({"name": "r", "numerics": now}) == []
        assert warn_numerics_changed({"name": "r"}) == []  # a run from before the record
        assert not caplog.records
        old = {"cpu_capability": "AVX2-OLD", "versions": {**now["versions"], "trl": "0.0.1"}}
        changes = warn_numerics_changed({"name": "r", "numerics": old})
    assert changes and any("AVX2-OLD" in m and f"trl 0.0.1 -> {now['versions']['trl']}" in m
                           for m in caplog.messages)


def test_the_prefix_cache_says_which_numerics_made_entries_it_cannot_reuse(tmp_path):
    cache = PrefixCache(tmp_path)
    context = {"base_model": {"model.safetensors": "abc"}, "data": "d", "seed": 0,
               "device": "cpu", "threads": 1, "cpu_capability": "AVX512",
               "versions": {"torch": "2.13.0"}, "trust_remote_code": False}
    assert cache.numerics_changes(context) == []
    assert (tmp_path / "contexts" / f"{context_key(context)}.json").is_file()
    assert cache.numerics_changes(context) == []  # the same context again: nothing to say
    other_seed = {**context, "seed": 1, "cpu_capability": "AVX2"}
    assert cache.numerics_changes(other_seed) == []  # other seed: its entries never applied
    here = {**context, "cpu_capability": "AVX2", "versions": {"torch": "2.14.1"}}
    assert cache.numerics_changes(here) == ["cpu_capability AVX512 -> AVX2",
                                            "torch 2.13.0 -> 2.14.1"]
