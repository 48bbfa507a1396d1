"""Import shim, kept for the training scripts earlier versions exported
(``from stagebudget.basemodel import resolve_base_model``): the code lives in
:mod:`stagebudget.modelref` (model references, no torch) and :mod:`stagebudget.training.model`
(building and loading models). New code imports from those.
"""

from __future__ import annotations

from stagebudget.errors import ModelRefError
from stagebudget.modelref import (
    base_info,
    cache_problem,
    load_tokenizer,
    model_identity,
    resolve_base_model,
    same_weights,
    ship_base,
    shipped_base,
)
from stagebudget.modelref import base_info as describe  # its earlier name
from stagebudget.paths import default_cache_dir
from stagebudget.training.model import (
    build_base,
    build_tokenizer,
    load_model,
    load_model_and_tokenizer,
)

__all__ = [
    "ModelRefError",
    "base_info",
    "build_base",
    "build_tokenizer",
    "cache_problem",
    "default_cache_dir",
    "describe",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_identity",
    "resolve_base_model",
    "same_weights",
    "ship_base",
    "shipped_base",
]
