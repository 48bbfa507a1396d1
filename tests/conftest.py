"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Directory of the test-sized base model, built once per test session."""
    from stagebudget.basemodel import build_base

    return build_base("test", cache_dir=tmp_path_factory.mktemp("base_cache"))
