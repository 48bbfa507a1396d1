from __future__ import annotations

import itertools

import pytest

from stagebudget.errors import BudgetError
from stagebudget.plan.cost import (
    MIN_EVAL_POINTS,
    PLAN_FILL,
    Budget,
    CostModel,
    ModelShape,
    plan_schedule,
)
from stagebudget.schedule import StageSpec


@pytest.fixture
def cost() -> CostModel:
    return CostModel.analytic(ModelShape.builtin("tiny"))


@pytest.mark.parametrize("size", ["tiny", "test"])
def test_builtin_shape_is_the_built_model(size):
    """The planner's shape of a built-in model is the model basemodel builds (one source)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stagebudget.modelref import config_dict as _config_dict

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**_config_dict(size)))
    real = sum(p.numel() for p in model.parameters())
    shape = ModelShape.builtin(size)
    assert shape.hidden == model.config.hidden_size
    assert shape.intermediate == model.config.intermediate_size
    assert shape.layers == model.config.num_hidden_layers
    assert shape.n_params == pytest.approx(real, rel=0.02)  # norms are left out


def test_costs_grow_with_work(cost):
    sft8 = cost.step_seconds(StageSpec(kind="sft", steps=1, lora_rank=8))
    sft64 = cost.step_seconds(StageSpec(kind="sft", steps=1, lora_rank=64))
    big = cost.step_seconds(StageSpec(kind="sft", steps=1, lora_rank=8, batch_size=128))
    rl = cost.step_seconds(StageSpec(kind="rl", steps=1, lora_rank=4, batch_size=16))
    assert 0 < sft8 < sft64 and sft8 < big and rl > sft8


@pytest.mark.parametrize(
    ("share", "hours", "rank_sft", "rank_rl"),
    list(itertools.product([0.0, 0.125, 0.5, 0.875, 1.0], [0.005, 0.02, 0.3], [8, 256], [0, 4, 64])),
)
def test_every_planned_schedule_fits_its_budget(cost, share, hours, rank_sft, rank_rl):
    budget = Budget(hours=hours)
    s = plan_schedule({"sft": share, "rl": 1 - share},
                      {"sft": {"lora_rank": rank_sft}, "rl": {"lora_rank": rank_rl, "batch_size": 16}},
                      budget, cost)
    assert cost.schedule_seconds(s) <= budget.seconds
    kinds = [st.kind for st in s.stages]
    assert kinds == [k for k, a in (("sft", share), ("rl", 1 - share)) if a > 0]
    # and no step was wasted: one more step of any stage would not fit in its share
    for st, amount in zip(s.stages, [a for a in (share, 1 - share) if a > 0], strict=True):
        assert (st.steps + 1) * cost.step_seconds(st) > amount * budget.seconds * PLAN_FILL


def test_too_small_budget_says_what_would_fit(cost):
    with pytest.raises(BudgetError, match="would fit one step"):
        plan_schedule({"rl": 1.0}, {"rl": {"lora_rank": 4}}, Budget(hours=1e-5), cost)


def test_steps_mode_over_budget_is_an_error(cost):
    with pytest.raises(BudgetError, match="raise the budget"):
        plan_schedule({"sft": 10_000}, {}, Budget(hours=0.001), cost, mode="steps")


@pytest.mark.parametrize("hours", [0, -1, float("nan"), float("inf")])
def test_bad_budgets(hours):
    with pytest.raises(BudgetError):
        Budget(hours=hours)


def test_calibrated_table_is_used_and_round_trips(tmp_path, cost):
    cost.table = [{"kind": "sft", "rank": 8, "batch": 32, "seconds_per_step": 1.0}]
    cost.save(tmp_path / "t.json")
    loaded = CostModel.load(tmp_path / "t.json", ModelShape.builtin("tiny"))
    assert loaded.step_seconds(StageSpec(kind="sft", steps=1, lora_rank=8)) == pytest.approx(1.0)
    double = loaded.step_seconds(StageSpec(kind="sft", steps=1, lora_rank=8, batch_size=64))
    assert 1.5 < double < 2.0
    # kinds absent from the table fall back to the analytic estimate
    rl = StageSpec(kind="rl", steps=1, lora_rank=4)
    assert loaded.step_seconds(rl) == pytest.approx(cost._analytic(rl))


@pytest.mark.parametrize("share", [0.02, 0.1, 0.3, 0.5, 0.9])
def test_every_planned_stage_is_evaluated_at_least_three_times(cost, share):
    budget = Budget(hours=0.012)
    schedule = plan_schedule({"sft": share, "rl": 1 - share}, {"rl": {"batch_size": 16}},
                             budget, cost)
    for stage in schedule.stages:
        # evaluation points after the start: every eval_interval steps, and the end
        points = {s for s in range(stage.eval_interval, stage.steps, stage.eval_interval)}
        points.add(stage.steps)
        assert len(points) >= min(MIN_EVAL_POINTS, stage.steps), stage
        assert stage.eval_interval <= 25  # never longer than configured


def test_a_longer_sft_max_length_plans_longer_steps() -> None:
    cm = CostModel.analytic(ModelShape.builtin("tiny"))
    short, long = (StageSpec(kind="sft", steps=1, max_length=n) for n in (32, 512))
    assert cm.step_seconds(long) > 4 * cm.step_seconds(short)
    assert cm.step_seconds(StageSpec(kind="sft", steps=1)) == cm.step_seconds(short)


def test_cpu_prices_follow_the_measured_tiny_model(cost):
    """The fitted cpu constants keep what was measured on the tiny model (2-core CPU): a LoRA
    SFT step costs more than a full fine-tuning one (the adapter's fixed cost dominates at this
    size), and a GRPO step's sampling scales with its rows, so half the prompts cost well under
    a full step. Measured idle (cost.py): SFT full 0.076 s, LoRA r16 0.097 s; GRPO 8 prompts
    0.180 s, 16 prompts ~0.32 s."""
    def step(kind: str, **kw) -> float:
        return cost.step_seconds(StageSpec(kind=kind, steps=1, **kw))

    lora_sft = step("sft", lora_rank=16, batch_size=64)
    assert lora_sft > step("sft", lora_rank=0, batch_size=64)
    full, half = step("rl", lora_rank=4, batch_size=16), step("rl", lora_rank=4, batch_size=8)
    assert 0.5 * full < half < 0.8 * full
    assert 1.6 * lora_sft < half < 2.2 * lora_sft


def test_a_run_plans_with_its_frozen_cost_model_on_resume(tmp_path, monkeypatch):
    """RUN/cost.json freezes the cost model (analytic constants included): after the built-in
    constants change, the run still plans the schedules it planned when it started."""
    from runhelpers import demo_space
    from stagebudget.plan import cost as cost_module
    from stagebudget.searching.driver import COST_FILE, frozen_cost_model
    from stagebudget.space.schema import SearchSpace

    space = SearchSpace.load(demo_space(tmp_path))
    params = {"sft.share": 0.5, "sft.lora_rank": 16, "sft.learning_rate": 1e-3, "rl.lora_rank": 4}
    before = space.schedule_from_params(params, frozen_cost_model(tmp_path, space, "cpu"))
    assert (tmp_path / COST_FILE).is_file()
    slower = {k: dict(v, flops=v["flops"] / 3) for k, v in cost_module._DEVICE.items()}
    monkeypatch.setattr(cost_module, "_DEVICE", slower)
    resumed = space.schedule_from_params(params, frozen_cost_model(tmp_path, space, "cpu"))
    fresh = space.schedule_from_params(params, space.cost_model("cpu"))
    assert resumed == before
    assert fresh.stages[0].steps < before.stages[0].steps  # the change is real
