"""stagebudget: decide how to spend a fixed post-training budget.

The Python API mirrors the CLI::

    import stagebudget
    run_dir = stagebudget.search("search_spaces/demo.yaml", trials=8)
    run = stagebudget.load_run(run_dir)
    front = run.front()

Heavy dependencies (torch, ray, trl, peft, plotly) are imported lazily, so ``import
stagebudget`` and the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stagebudget.version import __version__

if TYPE_CHECKING:
    from stagebudget.results.run import load_run as load_run
    from stagebudget.searching.driver import run_search as search


def __getattr__(name: str) -> Any:
    if name == "search":
        from stagebudget.searching.driver import run_search

        return run_search
    if name == "load_run":
        from stagebudget.results.run import load_run

        return load_run
    if name in ("train", "run_schedule"):
        from stagebudget.training.pipeline import run_schedule

        return run_schedule
    if name in ("Schedule", "StageSpec", "TasksRef"):
        from stagebudget import schedule

        return getattr(schedule, name)
    if name == "SearchSpace":
        from stagebudget.space.schema import SearchSpace

        return SearchSpace
    raise AttributeError(f"module 'stagebudget' has no attribute {name!r}")


__all__ = ["Schedule", "SearchSpace", "StageSpec", "TasksRef", "__version__", "load_run",
           "run_schedule", "search"]
