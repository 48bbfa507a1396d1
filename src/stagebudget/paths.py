"""Where stagebudget caches what it builds: the cache root and the prefix-checkpoint cache."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$STAGEBUDGET_CACHE`` or ``~/.cache/stagebudget``."""
    env = os.environ.get("STAGEBUDGET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stagebudget"


def default_prefix_cache_dir() -> Path:
    """``$STAGEBUDGET_PREFIX_CACHE``, else ``<stagebudget cache>/prefixes`` (under
    ``$STAGEBUDGET_CACHE`` or ``~/.cache/stagebudget``)."""
    env = os.environ.get("STAGEBUDGET_PREFIX_CACHE")
    return Path(env).expanduser() if env else default_cache_dir() / "prefixes"
