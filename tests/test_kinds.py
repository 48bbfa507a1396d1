"""A stage kind is one registration: schedules, spaces, the cost model, the planner, export and
the stage lookup all follow it (shown with a toy kind)."""

from __future__ import annotations

import pytest
import yaml

from stagebudget.errors import ConfigError
from stagebudget.kinds import (
    StageKindInfo,
    get_kind,
    kind_only_fields,
    register_stage_kind,
    stage_kinds,
    unregister_stage_kind,
)
from stagebudget.plan.cost import Budget, CostModel, ModelShape, plan_schedule
from stagebudget.schedule import Schedule, StageSpec
from stagebudget.space.schema import SearchSpace
from stagebudget.training.stages import STAGES, get_stage
from stagebudget.trlconfig import config_class, lora_kwargs, trl_config_kwargs


def toy_runner(ctx):  # pragma: no cover - looked up, not run
    return None


@pytest.fixture
def toy_kind():
    info = register_stage_kind(StageKindInfo(
        name="toy", order=15, runner=toy_runner, trl_config="trl.SFTConfig",
        trl_args={"completion_only_loss": True, "packing": False}))
    yield info
    unregister_stage_kind("toy")


def test_builtin_kinds_in_stage_order():
    assert stage_kinds() == ("cpt", "sft", "rl")
    assert set(kind_only_fields()) == {"num_generations", "max_completion_length", "beta",
                                       "temperature"}


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_stage_kind(StageKindInfo(name="sft", order=1, runner="x:y", trl_config="z"))
    assert get_kind("sft").runner == "stagebudget.training.stages.sft:run_sft"


def test_a_toy_kind_is_one_registration(tmp_path, toy_kind):
    assert stage_kinds() == ("cpt", "sft", "toy", "rl")
    # schedules accept it; the kind-only fields of rl stay rl's
    spec = StageSpec(kind="toy", steps=5, lora_rank=4)
    with pytest.raises(ValueError, match="applies only to rl"):
        StageSpec(kind="toy", steps=5, num_generations=4)
    # training finds its function; export and training share its TRL/LoRA mapping
    assert get_stage("toy") is toy_runner and STAGES["toy"] is toy_runner and "toy" in STAGES
    assert config_class(spec) == "trl.SFTConfig"
    args = trl_config_kwargs(spec, seed=1)
    assert args["packing"] is False and args["max_length"] == spec.max_length
    assert lora_kwargs(spec)["r"] == 4
    # the cost model prices it and the planner orders it between sft and rl
    cost = CostModel.analytic(ModelShape.builtin("tiny"))
    assert cost.step_seconds(spec) > 0
    plan = plan_schedule({"rl": 0.3, "toy": 0.3, "sft": 0.4}, {}, Budget(hours=0.05), cost)
    assert [s.kind for s in plan.stages] == ["sft", "toy", "rl"]
    # a search space takes it as a stage
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"budget": {"per_trial_hours": 0.05}, "stages": {
        "sft": {"share": 0.5}, "toy": {"share": {"type": "float", "low": 0.1, "high": 0.5}}}}))
    space = SearchSpace.load(path)
    assert "toy.share" in space.dimensions()
    schedule = space.schedule_from_params({"toy.share": 0.3}, cost)
    assert Schedule.from_dict(schedule.to_dict()) == schedule


def test_unregistered_kind_is_named(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"budget": {"per_trial_hours": 0.05},
                                    "stages": {"toy": {"share": 1.0}}}))
    with pytest.raises(ConfigError, match="unknown stage 'toy'; allowed: cpt, sft, rl"):
        SearchSpace.load(path)
