"""Optuna samplers the way Ray Tune needs them: picklable.

Tune pickles the searcher, and with it the sampler: into ``tuner.pkl`` when the Tuner is built
and into the searcher checkpoint at every experiment save (``OptunaSearch.save`` pickles its
``__dict__``: the sampler, the study and the trials, each of which holds the sampler). Imported
lazily by :func:`stagebudget.space.sampler.make_sampler`, so validating a space does not import Optuna.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable.

    Optuna 5.1 gave every genetic-algorithm sampler a lock and no ``__getstate__``
    (``optuna/samplers/_ga/_base.py``: ``self._thread_lock = threading.Lock()``), so pickling
    it raises ``TypeError: cannot pickle '_thread.lock' object``. The lock is dropped when
    pickled and a new one made when unpickled, as Optuna's own ``Study`` does with its
    thread-local state. The class keeps Optuna's name: a GA sampler keys the generation of each
    trial by its class name (``NSGAIISampler:generation``), which a resumed study must still find.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_thread_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
