"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests run first. In two processes (README: ``-n 2 --dist
    worksteal``) the suite then ends on short tests that both processes share, not on one
    process finishing a multi-minute test while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


@pytest.fixture(scope="session", autouse=True)
def _own_prefix_cache(tmp_path_factory):
    """Trials of this test session share a prefix cache of their own, never the user's (a
    test that checks training must not be answered by an earlier session's checkpoints)."""
    before = os.environ.get("STAGEBUDGET_PREFIX_CACHE")
    os.environ["STAGEBUDGET_PREFIX_CACHE"] = str(tmp_path_factory.mktemp("prefix_cache"))
    yield
    if before is None:
        os.environ.pop("STAGEBUDGET_PREFIX_CACHE", None)
    else:
        os.environ["STAGEBUDGET_PREFIX_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Directory of the test-sized base model, built once per test session."""
    from stagebudget.training.model import build_base

    return build_base("test", cache_dir=tmp_path_factory.mktemp("base_cache"))


@pytest.fixture
def one_thread():
    """Train with one torch thread, as a Ray trial with ``cpu: 1`` does (and without
    oversubscribing a shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
