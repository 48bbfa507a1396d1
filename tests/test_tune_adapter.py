"""What the driver hands Ray Tune: the searcher chain, which Tune pickles (``tuner.pkl`` with
Ray's cloudpickle, the searcher checkpoint with ``pickle`` via ``OptunaSearch.save``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray.cloudpickle

from stagebudget.searching.tune_adapter import build_searcher
from stagebudget.space.nsga2 import NSGAIISampler
from stagebudget.space.schema import SAMPLERS, SearchSpace
from stagebudget.studystore import open_storage

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def _no_hours(config: dict[str, Any]) -> float:
    return 0.0


def _searcher(space: SearchSpace, run_dir: Path) -> Any:
    return build_searcher(
        space, run_dir=run_dir, study_name="s", num_samples=8, concurrency=2, points=[],
        storage=open_storage(f"sqlite:///{run_dir / 'study.db'}"),
        limiter_kwargs={"search_hours": None, "planned_hours": _no_hours,
                        "per_trial_hours": space.budget.per_trial_hours})


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_survives_what_tune_pickles_and_samples_after(name: str,
                                                                     tmp_path: Path) -> None:
    # the grid sampler needs a gridded space: the published design is one
    path = SPACES / ("paper_grid.yaml" if name == "grid" else "demo.yaml")
    space = SearchSpace.load(path, sampler={"name": name, "seed": 1})
    budget, search = _searcher(space, tmp_path)
    assert search.suggest("before")  # a sampler that has run (GA caches, RNG state) pickles too

    # tuner.pkl: the whole chain, with Ray's cloudpickle
    chain = ray.cloudpickle.loads(ray.cloudpickle.dumps(budget))
    assert set(chain.suggest("t1")) == set(space.optuna_space())
    # the searcher checkpoint, saved and restored as Tune does
    search.save(str(tmp_path / "searcher.pkl"))
    _, restored = _searcher(space, tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert set(restored.suggest("t2")) == set(space.optuna_space())
    assert type(pickle.loads(pickle.dumps(restored.study.sampler))) is type(search.study.sampler)


def test_picklable_nsga2_keeps_optunas_generation_keys() -> None:
    """Trials of a study started with Optuna's own NSGAIISampler keep their generations."""
    ours, optunas = NSGAIISampler, optuna.samplers.NSGAIISampler
    assert issubclass(ours, optunas)
    assert ours._get_generation_key() == optunas._get_generation_key()
    assert ours._get_parent_cache_key_prefix() == optunas._get_parent_cache_key_prefix()
