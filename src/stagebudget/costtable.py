"""Where calibrated cost tables live: one per (base model, device) in the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

from stagebudget.basemodel import default_cache_dir as cache_root


def model_key(base_model: str) -> str:
    """``builtin:...`` as is; a local directory as its absolute path, so ``./m``, ``m`` and
    ``/abs/m`` name the same table whether calibrate, validate or search resolved them."""
    if base_model.startswith("builtin:"):
        return base_model
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.exists() else base_model


def default_table_path(base_model: str, device: str) -> Path:
    """``<cache>/cost/<device>-<model key>.json``: the table ``stagebudget calibrate`` writes."""
    key = hashlib.sha256(model_key(base_model).encode()).hexdigest()[:12]
    dev = "cuda" if device.startswith("cuda") else device
    return cache_root() / "cost" / f"{dev}-{key}.json"
