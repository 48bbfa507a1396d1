"""run_schedule end to end on the test-sized model: records, curves, repeatability, budget, NaN."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from stagebudget.plan.cost import CostModel, ModelShape
from stagebudget.schedule import Schedule, StageSpec, TasksRef
from stagebudget.stats import OUTCOMES_OF, paired_difference, row_outcomes
from stagebudget.training.pipeline import TrainingDiverged, TrialResult, run_schedule

TASKS = TasksRef(n_train=64, n_id_test=8, n_ood_test=8)
COST = CostModel.analytic(ModelShape.builtin("test"))


pytestmark = pytest.mark.usefixtures("one_thread")


def _schedule(tiny_base, **kw) -> Schedule:
    stages = kw.pop("stages", (
        StageSpec(kind="cpt", steps=2, lora_rank=0, batch_size=8, eval_interval=5),
        StageSpec(kind="sft", steps=4, lora_rank=4, batch_size=8, eval_interval=2,
                  learning_rate=1e-2),
        StageSpec(kind="rl", steps=3, lora_rank=4, batch_size=4, num_generations=4,
                  max_completion_length=8, eval_interval=2, learning_rate=1e-2),
    ))
    return Schedule(base_model=str(tiny_base), tasks=TASKS, stages=stages, **kw)


def _run(schedule, out_dir, **kw) -> tuple[TrialResult, list[dict]]:
    reported: list[dict] = []
    result = run_schedule(schedule, out_dir, report=reported.append, device="cpu", cost=COST,
                          **kw)
    return result, reported


@pytest.fixture(scope="module")
def two_runs(tiny_base, tmp_path_factory):
    """The same three-stage schedule trained twice with the same seed."""
    torch.set_num_threads(1)
    schedule = _schedule(tiny_base, seed=3)
    first = _run(schedule, tmp_path_factory.mktemp("run_a"), save_model=True)
    second = _run(schedule, tmp_path_factory.mktemp("run_b"))
    return schedule, first, second, tmp_path_factory


@pytest.mark.slow
def test_schedule_writes_records_and_curves(two_runs, tmp_path_factory):
    schedule, (result, reported), _, _ = two_runs
    out = next(p for p in tmp_path_factory.getbasetemp().glob("run_a*"))
    for name in ("schedule.yaml", "curves.jsonl", "ledger.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert Schedule.load(out / "schedule.yaml") == schedule
    rows = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert rows == result.curves
    # each row keeps its per-prompt outcomes; Ray's results get the numbers only
    outcome_keys = set(OUTCOMES_OF.values())
    assert reported == [{k: v for k, v in r.items() if k not in outcome_keys} for r in rows]
    for row in rows:
        for objective, key in OUTCOMES_OF.items():
            per_prompt = row_outcomes(row, objective)
            assert per_prompt is not None and isinstance(row[key], str)
            assert len(per_prompt) == (TASKS.n_id_test if objective == "id_accuracy"
                                       else TASKS.n_ood_test)
            assert sum(per_prompt) / len(per_prompt) == pytest.approx(row[objective])
    # two points of one run compare prompt by prompt (a stage's step 0 repeats the last end)
    same = paired_difference(row_outcomes(rows[1], "ood_accuracy"),
                             row_outcomes(rows[2], "ood_accuracy"))
    assert same.mean == 0 and same.se == 0
    change = paired_difference(row_outcomes(rows[0], "id_accuracy"),
                               row_outcomes(rows[-1], "id_accuracy"))
    assert change.mean == pytest.approx(rows[-1]["id_accuracy"] - rows[0]["id_accuracy"])
    points = [(r["stage"], r["step"]) for r in rows]
    assert points == [("cpt", 0), ("cpt", 2),
                      ("sft", 0), ("sft", 2), ("sft", 4),
                      ("rl", 0), ("rl", 2), ("rl", 3)]
    assert [r["global_step"] for r in rows] == [0, 2, 2, 4, 6, 6, 8, 9]
    # the first point of a stage is the last one of the previous stage, reused
    for prev, row in itertools.pairwise(rows):
        if row["step"] == 0:
            assert (row["id_accuracy"], row["ood_accuracy"]) == (
                prev["id_accuracy"], prev["ood_accuracy"])
        assert row["device_seconds"] >= prev["device_seconds"]
    assert rows[0]["train_loss"] is None and rows[1]["train_loss"] is not None
    assert rows[5]["reward"] is None and rows[-1]["reward"] is not None

    ledger = json.loads((out / "ledger.json").read_text())
    assert [s["steps_done"] for s in ledger["stages"]] == [2, 4, 3]
    assert ledger["eval_seconds"] > 0 and ledger["train_seconds"] > 0
    assert not ledger["stopped_by_guard"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objectives"] == result.objectives()
    assert set(result.objectives()) == {"id_accuracy", "ood_accuracy", "device_hours",
                                        "id_accuracy_se", "ood_accuracy_se"}
    for row in rows:  # every evaluation point carries its standard errors
        assert 0 < row["id_accuracy_se"] <= 0.5 or row["id_accuracy"] in (0.0, 1.0)
    assert result.device_hours == pytest.approx(ledger["train_seconds"] / 3600)
    assert result.planned_device_hours == pytest.approx(COST.schedule_seconds(schedule) / 3600)
    rl = metrics["stages"][2]
    assert {"reward_first", "reward_last", "measured_over_planned"} <= set(rl)
    assert rl["generation"] == {"engine": "transformers", "bit_reproducible": True}
    # the algorithm as TRL was told it is recorded, pinned settings included
    assert rl["trl"]["config"] == "trl.GRPOConfig" and rl["trl"]["args"]["loss_type"] == "dapo"
    assert metrics["stages"][0]["trl"]["args"]["max_steps"] == schedule.stages[0].steps
    # and the adapter as PEFT was told it (cpt trained fully: no adapter)
    assert metrics["stages"][0]["peft"] is None
    assert rl["peft"]["r"] == 4 and rl["peft"]["use_dora"] is False
    assert (out / "model" / "config.json").is_file()
    assert not any("lora" in p.name for p in (out / "model").iterdir())


@pytest.mark.slow
def test_same_seed_same_metrics(two_runs):
    _, (a, _), (b, _), _ = two_runs
    strip = ("device_seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in a.curves] == [
        {k: v for k, v in r.items() if k not in strip} for r in b.curves]
    keep = ("train_loss", "train_loss_first", "reward_first", "reward_last", "mean_reward")
    for sa, sb in zip(a.metrics["stages"], b.metrics["stages"], strict=True):
        assert {k: sa.get(k) for k in keep} == {k: sb.get(k) for k in keep}
    assert (a.id_accuracy, a.ood_accuracy) == (b.id_accuracy, b.ood_accuracy)


@pytest.mark.slow
def test_planned_steps_are_the_contract_and_the_guard_stops_a_runaway(tiny_base, tmp_path):
    """A schedule trains all its planned steps even when they take longer than its budget (the
    overrun is recorded); past the guard the trial is stopped and fails, never scored."""
    from stagebudget.training.clock import BudgetGuardError

    stages = (StageSpec(kind="sft", steps=6, lora_rank=4, batch_size=8, eval_interval=10_000),)
    over = _schedule(tiny_base, budget_hours=1e-7, stages=stages)
    _run(over, tmp_path / "over", guard=1e9)
    ledger = json.loads((tmp_path / "over" / "ledger.json").read_text())
    assert ledger["stages"][0]["steps_done"] == 6
    assert ledger["over_budget"] and ledger["overrun_seconds"] > 0
    assert not ledger["stopped_by_guard"]
    assert json.loads((tmp_path / "over" / "metrics.json").read_text())["over_budget"]

    runaway = _schedule(tiny_base, budget_hours=0.5 / 3600, stages=(
        StageSpec(kind="sft", steps=100_000, lora_rank=4, batch_size=8, eval_interval=10_000),))
    with pytest.raises(BudgetGuardError, match=r"4 x its budget"):
        _run(runaway, tmp_path / "runaway")
    ledger = json.loads((tmp_path / "runaway" / "ledger.json").read_text())
    sft = ledger["stages"][0]
    assert ledger["stopped_by_guard"] and sft["stopped_by_guard"]
    assert 1 <= sft["steps_done"] < 100_000
    assert ledger["guard_clock"] == "cpu-time per thread"  # busy cores do not trip it
    assert 2.0 <= ledger["guarded_seconds"] <= 2.0 + sft["max_step_seconds"] + 0.05
    # The wall clock is read at other instants than the thread's cpu clock (stage start, step
    # ends), so it can trail by a few ms even though a thread never runs longer than the wall.
    assert ledger["train_seconds"] >= 2.0 - 0.02
    assert not (tmp_path / "runaway" / "metrics.json").exists()


def test_nan_loss_raises_training_diverged(tiny_base, tmp_path, monkeypatch):
    import stagebudget.training.model as basemodel

    real_load = basemodel.load_model_and_tokenizer

    def poisoned(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        with torch.no_grad():
            model.model.norm.weight.fill_(math.nan)  # every logit, hence the loss, is NaN
        return model, tokenizer

    monkeypatch.setattr(basemodel, "load_model_and_tokenizer", poisoned)
    schedule = _schedule(tiny_base, stages=(
        StageSpec(kind="sft", steps=5, lora_rank=4, batch_size=4),))
    with pytest.raises(TrainingDiverged, match=r"stage 0 \(sft\) at step 1") as info:
        _run(schedule, tmp_path)
    assert isinstance(info.value, RuntimeError) and info.value.step == 1
    ledger = json.loads((tmp_path / "ledger.json").read_text())  # written before propagating
    assert ledger["stages"][0]["kind"] == "sft"
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_the_same_schedule_gives_identical_results_beside_busy_processes(tiny_base, tmp_path,
                                                                         one_thread):
    """The budget is a contract on steps, so load changes only how long a trial takes: one
    schedule trained alone and beside two busy processes (one per core) trains the same steps
    to the same weights, curves and losses."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    schedule = Schedule(base_model=str(tiny_base), seed=0, budget_hours=0.0005,
                        tasks=TasksRef(n_train=64, n_id_test=10, n_ood_test=10),
                        stages=(StageSpec(kind="sft", steps=12, lora_rank=8, batch_size=8,
                                          eval_interval=4),
                                StageSpec(kind="rl", steps=4, lora_rank=4, batch_size=4,
                                          eval_interval=2)))
    idle = run_schedule(schedule, tmp_path / "idle", save_model=True, device="cpu")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        busy = run_schedule(schedule, tmp_path / "busy", save_model=True, device="cpu")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()

    def drop_times(rows):
        return [{k: v for k, v in r.items() if k != "device_seconds"} for r in rows]

    assert drop_times(busy.curves) == drop_times(idle.curves)
    assert [s["steps_done"] for s in busy.metrics["stages"]] == [12, 4]
    assert [s.get("train_loss") for s in busy.metrics["stages"]] == \
        [s.get("train_loss") for s in idle.metrics["stages"]]
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("idle", "busy"))
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_a_trial_process_does_not_import_mlflow_or_draw_library_bars(tiny_base, tmp_path):
    """Stages report to no tracker, so a training process does not pay TRL's import of
    mlflow (installed with the dev extra, so this test can fail): about 1 s per process. And
    a trial's output is its own: no transformers progress bar over the base model's weights
    (``stagebudget train`` printed one before its first curve row)."""
    import importlib.util
    import subprocess
    import sys

    assert importlib.util.find_spec("mlflow") is not None  # the dev extra installs it
    code = (
        "import sys\n"
        "from stagebudget.training.pipeline import run_schedule\n"
        "from stagebudget.schedule import Schedule, StageSpec, TasksRef\n"
        f"s = Schedule(base_model={str(tiny_base)!r}, tasks=TasksRef(n_train=16, n_id_test=4,"
        " n_ood_test=4), stages=(StageSpec(kind='rl', steps=1, lora_rank=2, batch_size=2,"
        " num_generations=2, eval_interval=1),))\n"
        "run_schedule(s, None, device='cpu')\n"
        "assert 'trl' in sys.modules and 'mlflow' not in sys.modules, 'mlflow imported'\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "DISABLE_MLFLOW_INTEGRATION"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Loading weights" not in done.stdout + done.stderr, done.stderr[-2000:]
