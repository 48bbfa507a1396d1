"""Helpers shared by the tests that run searches: the demo space with changes, and a search
driver in its own process that is SIGKILLed once a condition holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def demo_space(tmp_path: Path, **changes: object) -> Path:
    """The demo space with top-level ``changes``, written to ``tmp_path/space.yaml``."""
    data = yaml.safe_load(DEMO.read_text())
    data.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def kill_driver_when(script: str, args: list[str], log: Path, done: Callable[[], bool],
                     timeout: float = 150) -> None:
    """Run ``python -c script *args`` in its own process group; SIGKILL the group once
    ``done()`` holds. Fails if the driver exits first or ``done()`` never holds."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script, *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert proc.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"condition never held:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
