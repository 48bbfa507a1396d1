"""The Optuna sampler a search space names, built in one place (:func:`make_sampler`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stagebudget.errors import ConfigError

if TYPE_CHECKING:
    from stagebudget.space.schema import SearchSpace


def make_sampler(space: SearchSpace, trials: int) -> Any:
    """The Optuna sampler named in ``space.sampler``, seeded, with ``options`` as keyword args.

    >>> make_sampler(SearchSpace.load("search_spaces/demo.yaml"), 8)  # doctest: +SKIP
    <optuna.samplers._gp.sampler.GPSampler object ...>
    """
    import warnings

    import optuna

    from stagebudget.space.nsga2 import NSGAIISampler

    spec = space.sampler
    seed = spec.seed if spec.seed is not None else space.seed
    opts = dict(spec.options)
    samplers: dict[str, Callable[..., Any]] = {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": NSGAIISampler,
        "gp": optuna.samplers.GPSampler,
        "random": optuna.samplers.RandomSampler,
        "grid": optuna.samplers.GridSampler,
    }
    # Optuna's 10 random start-up trials would make a search of <= 10 trials a random search.
    startup = min(10, max(2, trials // 3))
    if spec.name == "tpe":
        # Without these, parallel trials collide.
        opts = {"multivariate": True, "constant_liar": True, "n_startup_trials": startup, **opts}
    elif spec.name == "gp":
        opts = {"n_startup_trials": startup, **opts}
    elif spec.name == "nsga2":
        # A population under 4 re-proposed identical params (FINDINGS); Optuna's default (50)
        # would make any small search a random search.
        opts = {"population_size": max(4, min(50, trials // 2)), **opts}
    args: tuple[Any, ...] = (space.grid_space(),) if spec.name == "grid" else ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return samplers[spec.name](*args, seed=seed, **opts)
        except TypeError as exc:
            raise ConfigError(f"bad option for the {spec.name} sampler: {exc}",
                              source=getattr(space, "source_file", None),
                              field="sampler.options") from None
