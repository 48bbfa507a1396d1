"""Every ``from stagebudget... import name`` in bench/ and experiments/ names a module and a name
that exist. Those scripts import lazily inside functions, so a moved module only shows when the
script runs (the layout change broke ``bench/grid_table.py --check-spend`` that way)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("experiments/*.py")])


def _stagebudget_imports(path: Path) -> list[tuple[int, str, str | None]]:
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "stagebudget":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names
                      if alias.name.split(".")[0] == "stagebudget"]
    return found


def test_the_scripts_are_found() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"grid_table.py", "gpu.py", "portability.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_imports_resolve(script: Path) -> None:
    missing = []
    for line, module, name in _stagebudget_imports(script):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing.append(f"{script.name}:{line}: no module {module} ({exc})")
            continue
        if name is not None and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)
