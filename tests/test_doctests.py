"""The examples in the package's docstrings (``>>>``) run and give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import stagebudget

MODULES = sorted(m.name for m in pkgutil.walk_packages(stagebudget.__path__, "stagebudget."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_examples_are_found() -> None:
    """A change that stopped collecting them (a renamed package) would pass the test above."""
    found = sum(len(t.examples) for name in MODULES
                for t in doctest.DocTestFinder().find(importlib.import_module(name)))
    assert found >= 90
