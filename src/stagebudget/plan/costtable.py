"""Where calibrated cost tables live: one per (base model, device) in the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

from stagebudget.modelref import model_key
from stagebudget.paths import default_cache_dir as cache_root


def default_table_path(base_model: str, device: str) -> Path:
    """``<cache>/cost/<device>-<model key>.json``: the table ``stagebudget calibrate`` writes."""
    key = hashlib.sha256(model_key(base_model).encode()).hexdigest()[:12]
    dev = "cuda" if device.startswith("cuda") else device
    return cache_root() / "cost" / f"{dev}-{key}.json"
