"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Directory of the test-sized base model, built once per test session."""
    from stagebudget.basemodel import build_base

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
