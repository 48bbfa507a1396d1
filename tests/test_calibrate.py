"""calibrate times real steps, fills the cost table and saves it where the planner reads it."""

from __future__ import annotations

import json

import pytest

from stagebudget.errors import UserError
from stagebudget.plan.cost import CostModel, ModelShape
from stagebudget.schedule import StageSpec
from stagebudget.training.calibrate import calibrate, calibration_spec

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
    from stagebudget.plan.costtable import default_table_path

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


def test_rl_cost_scales_with_measured_completion_lengths():
    """A table entry that measured short completions plans RL steps by those lengths: a longer
    maximum costs no more when completions stop early anyway."""
    from stagebudget.plan.cost import CostModel, ModelShape
    from stagebudget.schedule import StageSpec

    entry = {"kind": "rl", "rank": 4, "batch": 16, "num_generations": 8,
             "max_completion_length": 12, "mean_completion_length": 6.0, "seconds_per_step": 1.0}
    cost = CostModel(shape=ModelShape.builtin("test"), table=[entry])
    short = StageSpec(kind="rl", steps=1, lora_rank=4, batch_size=16, num_generations=8,
                      max_completion_length=12)
    long = short.model_copy(update={"max_completion_length": 256})
    tiny = short.model_copy(update={"max_completion_length": 3})
    assert cost.step_seconds(long) == pytest.approx(cost.step_seconds(short))
    assert cost.step_seconds(tiny) < cost.step_seconds(short)
    no_lengths = CostModel(shape=ModelShape.builtin("test"),
                           table=[{**entry, "mean_completion_length": None}])
    assert no_lengths.step_seconds(long) > 10 * no_lengths.step_seconds(short)


@pytest.mark.slow
def test_calibrating_a_space_times_its_own_shapes_at_its_concurrency(tmp_path, tiny_base):
    import json

    import yaml

    from stagebudget.training.calibrate import calibrate_space

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "cal", "base_model": str(tiny_base),
        "tasks": {"source": "builtin", "n_train": 100, "n_id_test": 10, "n_ood_test": 10},
        "budget": {"per_trial_hours": 0.002}, "concurrency": 2,
        "stages": {"sft": {"share": {"type": "categorical", "choices": [0.0, 0.5]},
                           "lora_rank": {"type": "categorical", "choices": [8, 0]},
                           "batch_size": 8},
                   "rl": {"share": "rest", "lora_rank": 4, "batch_size": 4,
                          "num_generations": 4, "max_completion_length": 16}}}))
    cost = calibrate_space(space, steps=2, out=tmp_path / "cost.json")
    shapes = sorted((e["kind"], e["rank"], e["batch"]) for e in cost.table)
    assert shapes == [("rl", 4, 4), ("sft", 0, 8), ("sft", 8, 8)]
    rl = next(e for e in cost.table if e["kind"] == "rl")
    assert 0 < rl["mean_completion_length"] <= 16
    saved = json.loads((tmp_path / "cost.json").read_text())
    assert saved["concurrency"] == 2 and saved["threads_per_trial"] == 1
    assert all(e["seconds_per_step"] > 0 for e in saved["entries"])
