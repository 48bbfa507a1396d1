"""calibrate times real steps, fills the cost table and saves it where the planner reads it."""

from __future__ import annotations

import json

import pytest

from stagebudget.calibrate import calibrate, calibration_spec
from stagebudget.cost import CostModel, ModelShape
from stagebudget.errors import UserError
from stagebudget.schedule import StageSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibrate_fills_and_saves_the_table(tiny_base, tmp_path):
    out = tmp_path / "cost.json"
    lines: list[str] = []
    cost = calibrate(str(tiny_base), device="cpu", kinds=("sft", "rl"), ranks=(0, 4), steps=1,
                     out=out, progress=lines.append)
    assert len(cost.table) == 4 and len(lines) == 4
    keys = {"kind", "rank", "batch", "num_generations", "max_completion_length",
            "seconds_per_step"}
    for entry in cost.table:
        assert set(entry) == keys
        assert entry["seconds_per_step"] > 0
    rl = next(e for e in cost.table if e["kind"] == "rl")
    assert (rl["batch"], rl["num_generations"], rl["max_completion_length"]) == (16, 8, 12)
    assert next(e for e in cost.table if e["kind"] == "sft")["batch"] == 32

    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["entries"] == cost.table
    loaded = CostModel.load(out, ModelShape.builtin("test"))
    spec = StageSpec(kind="sft", steps=1, lora_rank=4, batch_size=32)
    assert loaded.step_seconds(spec) == pytest.approx(
        next(e for e in cost.table if e["kind"] == "sft" and e["rank"] == 4)["seconds_per_step"])


def test_calibrate_writes_the_default_table_path(tiny_base, tmp_path, monkeypatch):
    from stagebudget.costtable import default_table_path

    monkeypatch.setenv("STAGEBUDGET_CACHE", str(tmp_path))
    calibrate(str(tiny_base), device="cpu", kinds=("cpt",), ranks=(4,), steps=1)
    assert default_table_path(str(tiny_base), "cpu").is_file()


def test_calibration_spec_uses_default_batches():
    spec = calibration_spec("rl", 4, 4)
    assert (spec.batch_size, spec.num_generations, spec.max_completion_length) == (16, 8, 12)
    assert spec.eval_interval > spec.steps  # no evaluation while timing
    assert calibration_spec("cpt", 0, 4).batch_size == 32


@pytest.mark.parametrize("kwargs, match", [
    ({"kinds": ("dpo",)}, "unknown stage kind 'dpo'"),
    ({"ranks": (-1,)}, "ranks must be >= 0"),
    ({"steps": 0}, "steps must be >= 1"),
])
def test_calibrate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        calibrate("builtin:test", device="cpu", **kwargs)
