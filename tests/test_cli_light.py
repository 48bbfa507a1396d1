"""The CLI answers fast, without heavy imports, and turns bad input into clean errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stagebudget.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from stagebudget.cli import app; "
            "heavy = [m for m in ('torch', 'ray', 'trl', 'peft', 'plotly', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert run("--help").returncode == 0


def test_validate_prints_space_and_costs():
    res = run("validate", "search_spaces/demo.yaml")
    assert res.returncode == 0, res.stderr
    assert "cheapest schedule" in res.stdout and "most expensive schedule" in res.stdout


def test_bad_space_exits_nonzero_without_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nbudget: {per_trial_hours: 0.01}\nstages: {sft: {share: 1.0}}\nfoo: 1\n")
    res = run("validate", str(p))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "unknown key `foo`" in res.stderr
    missing = run("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "file not found" in missing.stderr
