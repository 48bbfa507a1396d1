"""One result type for every trial function: the pipeline, the replay and the fakes."""

from __future__ import annotations

import json
import os

from stagebudget.schedule import Schedule, StageSpec
from stagebudget.searching.replay import ReplayResult, replay_trial
from stagebudget.testing.fakes import FakeResult, fake_trial_fn
from stagebudget.training.pipeline import TrialResult as PipelineResult
from stagebudget.trialresult import TrialResult


def test_the_pipeline_replay_and_fakes_share_one_result_type() -> None:
    assert PipelineResult is ReplayResult is FakeResult is TrialResult


def test_a_replayed_result_is_a_trial_result_planned_as_spent(tmp_path) -> None:
    sft = Schedule(stages=(StageSpec(kind="sft", steps=10),))
    table = tmp_path / "table.jsonl"
    table.write_text(json.dumps({
        "schedule": sft.to_dict(), "seed": 0, "id_accuracy": 0.5, "ood_accuracy": 0.4,
        "id_accuracy_se": 0.01, "nominal_device_hours": 0.004}) + "\n")
    result = replay_trial(sft, tmp_path / "run" / "trials" / "t", table=str(table))
    assert isinstance(result, TrialResult) and result.schedule == sft
    assert result.planned_device_hours == result.device_hours == 0.004
    assert result.objectives() == {"id_accuracy": 0.5, "ood_accuracy": 0.4,
                                   "device_hours": 0.004, "id_accuracy_se": 0.01}


def test_a_fake_result_is_a_trial_result_with_a_fake_ledger() -> None:
    sft = Schedule(stages=(StageSpec(kind="sft", steps=10),), budget_hours=0.002)
    result = fake_trial_fn(sft, seconds=0.0, se=True)
    assert isinstance(result, TrialResult) and result.schedule == sft
    assert result.planned_device_hours == result.device_hours == 0.002
    assert result.ledger == {"device_hours": 0.002, "fake": True, "pid": os.getpid()}
    assert set(result.objectives()) == {"id_accuracy", "ood_accuracy", "device_hours",
                                        "id_accuracy_se", "ood_accuracy_se"}
