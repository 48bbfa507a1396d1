"""stagebudget.errors holds every exception class: one root, old import paths, pickling."""

from __future__ import annotations

import importlib
import inspect
import pickle
import subprocess
import sys

import pytest

from stagebudget import errors

CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass)
           if issubclass(c, BaseException) and c.__module__ == errors.__name__]

# where each class was defined before errors.py held them all; those paths must keep working
OLD_HOMES = {
    "ModelTaskError": ["stagebudget.chat"],
    "GenerationTooLong": ["stagebudget.chat"],
    "ModelRefError": ["stagebudget.modelref", "stagebudget.basemodel"],
    "SearchInterrupted": ["stagebudget.searching.driver"],
    "StagePruned": ["stagebudget.searching.earlystop"],
    "ClusterError": ["stagebudget.searching.preflight"],
    "ReplayMiss": ["stagebudget.searching.replay"],
    "TaskFileError": ["stagebudget.tasks"],
    "DataMissingError": ["stagebudget.tasks.data"],
    "ScorerError": ["stagebudget.tasks.scoring", "stagebudget.tasks"],
    "BudgetGuardError": ["stagebudget.training.clock", "stagebudget.training.pipeline"],
    "TrainingDiverged": ["stagebudget.training.stages.common", "stagebudget.training.stages",
                         "stagebudget.training.pipeline"],
}

EXAMPLES = {
    "ConfigError": lambda c: c("bad", source="s.yaml", field="budget"),
    "GenerationTooLong": lambda c: c("too long", "eval.max_new_tokens"),
    "StagePruned": lambda c: c("pruned", {"stage": 0}),
    "TrainingDiverged": lambda c: c("sft", 0, 3, float("inf")),
}


def test_every_exception_but_ctrl_c_derives_from_the_root() -> None:
    assert len(CLASSES) >= 18
    for cls in CLASSES:
        if cls is errors.SearchInterrupted:
            assert issubclass(cls, KeyboardInterrupt) and not issubclass(cls, Exception)
        else:
            assert issubclass(cls, errors.StagebudgetError), cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_exception_survives_pickling(cls: type[BaseException]) -> None:
    exc = EXAMPLES.get(cls.__name__, lambda c: c("a message"))(cls)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and str(back) == str(exc) and vars(back) == vars(exc)


@pytest.mark.parametrize("name", sorted(OLD_HOMES))
def test_old_import_paths_give_the_same_class(name: str) -> None:
    for module in OLD_HOMES[name]:
        assert getattr(importlib.import_module(module), name) is getattr(errors, name), module


def test_errors_imports_only_the_standard_library() -> None:
    code = ("import sys, stagebudget.errors; "
            "print(sorted(m for m in sys.modules if m.startswith('stagebudget')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['stagebudget', 'stagebudget.errors', 'stagebudget.version']"
