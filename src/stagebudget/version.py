"""The package's version, and what else decides a trial's numbers on this machine.

Light: torch is imported only inside :func:`numerics`.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

__version__ = "0.1.0"

# the packages whose versions move trained results (constraints.txt pins them for the demo)
VERSIONED = ("stagebudget", "torch", "transformers", "trl", "peft", "ray", "optuna", "datasets",
             "accelerate")


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED` (a package that is missing is left out)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def numerics() -> dict[str, Any]:
    """What decides floating-point results here besides the code and the data: the CPU kernels
    torch chose (``AVX512``, ``AVX2``, ``DEFAULT``; ``ATEN_CPU_CAPABILITY`` overrides the choice)
    and the package versions. Recorded in run.json and base_info.json, compared on resume."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": package_versions()}


def numerics_changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two :func:`numerics` readings, one phrase each, e.g.
    ``["cpu_capability AVX2 -> AVX512", "transformers 5.23.0 -> 5.24.0"]``.

    >>> numerics_changes({"cpu_capability": "AVX2", "versions": {"torch": "2.13.0"}},
    ...                  {"cpu_capability": "AVX512", "versions": {"torch": "2.13.0"}})
    ['cpu_capability AVX2 -> AVX512']
    """
    out = []
    if recorded.get("cpu_capability") != now.get("cpu_capability"):
        out.append(f"cpu_capability {recorded.get('cpu_capability')} -> {now.get('cpu_capability')}")
    old, new = recorded.get("versions") or {}, now.get("versions") or {}
    for name in sorted(set(old) | set(new)):
        if name != "stagebudget" and old.get(name) != new.get(name):
            out.append(f"{name} {old.get(name, 'absent')} -> {new.get(name, 'absent')}")
    return out


__all__ = ["VERSIONED", "__version__", "numerics", "numerics_changes", "package_versions"]
