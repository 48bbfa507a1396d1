"""scripts/setup.sh installs constraints.txt as it is (uv, no resolving): the file must hold the
whole environment, and uv must get pip's own package sources."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from pip_settings_for_uv import uv_options  # noqa: E402


def test_pips_sources_become_uv_options_once_each():
    listed = ("global.cert='/etc/ssl/c.crt'\n"
              "global.constraint='/etc/xdg/pip/constraints.txt'\n"
              "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'\n"
              "global.find-links='/opt/wheels'\n"
              ":env:.find-links='/opt/wheels'\n"
              ":env:.default-timeout='180'\n")
    assert uv_options(listed) == [
        "--index-strategy", "unsafe-best-match",
        "--constraint", "/etc/xdg/pip/constraints.txt",
        "--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
        "--find-links", "/opt/wheels"]
    assert uv_options("") == ["--index-strategy", "unsafe-best-match"]


def _locked() -> dict[str, str]:
    text = (ROOT / "constraints.txt").read_text()
    return {canonicalize_name(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)$", text, re.M)}


def test_the_lock_holds_every_package_stagebudget_and_its_dev_tools_need():
    """Walks the installed requirements of ``stagebudget[dev]`` (markers evaluated here): each
    one is pinned, so a dependency added to pyproject.toml without the lock fails here, not on
    a user's fresh install."""
    locked = _locked()
    assert "setuptools" in locked  # pip freeze leaves it out; torch needs a recent one
    seen: set[str] = set()
    todo = [(r, {"dev"}) for r in md.requires("stagebudget") or []]
    missing = []
    while todo:
        text, extras = todo.pop()
        req = Requirement(text)
        env_ok = req.marker is None or any(
            req.marker.evaluate({"extra": e}) for e in (extras or {""}))
        name = canonicalize_name(req.name)
        if not env_ok or name in seen:
            continue
        seen.add(name)
        if name not in locked:
            missing.append(name)
            continue
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            missing.append(f"{name} (not installed)")
            continue
        todo += [(r, set(req.extras)) for r in requires]
    assert not missing, f"constraints.txt lacks {missing}"
    assert {"torch", "transformers", "trl", "peft", "optuna", "ray"} <= seen
