"""A trial over several workers (searching/workers.py): 2 Ray Train workers over gloo train the
same schedule as one process with the same global batch, and the trial's ledger shows both
workers' spend; multi-worker spaces that cannot train as planned are refused before compute."""

from __future__ import annotations

import json

import pytest

from stagebudget.errors import ConfigError
from stagebudget.plan.cost import CostModel, ModelShape
from stagebudget.schedule import Schedule, StageSpec, TasksRef
from stagebudget.space.schema import SearchSpace

TASKS = TasksRef(n_train=64, n_id_test=8, n_ood_test=8)
COST = CostModel.analytic(ModelShape.builtin("test"))
# Measured: 2 workers x batch 4 vs 1 worker x batch 8 differ by float summation order only
# (the gradient all-reduce, the loss averaged over the global batch's tokens); see the test.
LOSS_TOLERANCE = 1e-4


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "curves.jsonl").read_text().splitlines()]


def _losses(out_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in _rows(out_dir)
            if r["stage_index"] == 0 and r.get("train_loss") is not None]


@pytest.mark.slow
def test_two_workers_match_one_and_show_both_spends(tiny_base, tmp_path, one_thread):
    """2 workers x 4 examples train the SFT stage's loss curve of 1 worker x 8 examples; an RL
    stage (GRPO, 4 prompts x 4 completions a step, 8 per worker) follows on the same workers.
    GRPO samples with each worker's own random stream, so only its running is checked."""
    import ray

    from stagebudget.searching.workers import run_on_workers
    from stagebudget.training.pipeline import run_schedule

    sft = StageSpec(kind="sft", steps=6, lora_rank=4, batch_size=8, eval_interval=1,
                    learning_rate=1e-2)
    rl = StageSpec(kind="rl", steps=2, lora_rank=4, batch_size=4, num_generations=4,
                   max_completion_length=8, eval_interval=2, learning_rate=1e-2)
    schedule = Schedule(base_model=str(tiny_base), tasks=TASKS, budget_hours=0.01, stages=(sft,))
    one = run_schedule(schedule, tmp_path / "one", device="cpu", cost=COST)
    # "local": a private Ray (a bare ray.init() joins a cluster another test left running)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        two = run_on_workers("stagebudget.training.pipeline:run_schedule",
                             schedule.model_copy(update={"stages": (sft, rl)}), workers=2,
                             cpu=1, gpu=0, out_dir=tmp_path / "two", device="cpu", cost=COST)
    finally:
        ray.shutdown()
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    diff = max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))
    print(f"max |loss difference| over {len(a)} steps: {diff:.3g}")
    assert diff <= LOSS_TOLERANCE
    assert a[0][1] != a[-1][1]  # it trained
    ledger = two.ledger
    workers = ledger["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert all(w["train_seconds"] > 0 for w in workers)
    assert ledger["train_seconds"] == pytest.approx(sum(w["train_seconds"] for w in workers))
    assert ledger["device_hours"] == pytest.approx(ledger["train_seconds"] / 3600)
    assert [st["steps_done"] for st in ledger["stages"]] == [6, 2]
    assert all(st["train_seconds"] > 0 for w in workers for st in w["stages"])
    assert _rows(tmp_path / "two")[-1]["reward"] is not None
    # the curve's budget axis counts every worker's seconds, as the ledger does
    assert _rows(tmp_path / "two")[-1]["device_seconds"] == pytest.approx(ledger["train_seconds"])
    assert two.objectives()["device_hours"] == pytest.approx(ledger["device_hours"])
    assert one.ledger.get("workers") is None


def _space_file(tmp_path, workers=2, **changes):
    import yaml

    data = {
        "name": "workers", "base_model": "builtin:test",
        "tasks": {"source": "builtin", "n_train": 200, "n_id_test": 20, "n_ood_test": 20},
        "budget": {"per_trial_hours": 0.002},
        "stages": {"sft": {"share": 1.0, "batch_size": 16, "eval_interval": 5, "lora_rank": 4,
                           "learning_rate": {"type": "categorical", "choices": [3e-3, 1e-2]}}},
        "trials": 1, "concurrency": 1, "references": False,
        "resources_per_trial": {"cpu": 1, "workers": workers},
    }
    for key, value in changes.items():
        if key in data["stages"]["sft"] or key == "batch_size":
            data["stages"]["sft"][key] = value
        else:
            data[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_workers_default_to_one_and_valid_settings_load(tmp_path):
    assert SearchSpace.load(_space_file(tmp_path, workers=1)).resources_per_trial.workers == 1
    assert SearchSpace.load(_space_file(tmp_path)).resources_per_trial.workers == 2
    space = _space_file(tmp_path, batch_size={"type": "int", "low": 8, "high": 32, "step": 8})
    assert SearchSpace.load(space).resources_per_trial.workers == 2
    rl = {"share": 1.0, "batch_size": 3, "num_generations": 4,  # 12 completions over 2 workers
          "lora_rank": {"type": "categorical", "choices": [4, 8]}}
    assert SearchSpace.load(_space_file(tmp_path, stages={"rl": rl})).stages["rl"]


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"batch_size": 9}, r"space\.yaml.*stages\.sft\.batch_size.*multiple of 2; 9 is not"),
    ({"batch_size": {"type": "int", "low": 8, "high": 16}},
     r"stages\.sft\.batch_size.*multiple of 2; 9 is not"),
    ({"batch_size": {"type": "categorical", "choices": [8, 12, 15]}},
     r"stages\.sft\.batch_size.*15 is not"),
    ({"workers": 3, "stages": {"rl": {"share": 1.0, "batch_size": 4, "num_generations": 4,
                                      "lora_rank": {"type": "categorical", "choices": [4, 8]}}}},
     r"stages\.rl\.batch_size` x `stages\.rl\.num_generations.*multiple of 3; 16 = 4 x 4"),
])
def test_multi_worker_spaces_that_cannot_train_as_planned_are_refused(tmp_path, changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        SearchSpace.load(_space_file(tmp_path, **changes))


@pytest.mark.parametrize(("workers", "pattern"), [
    (0, r"resources_per_trial\.workers.*greater than or equal to 1"),
    (1.5, r"resources_per_trial\.workers"),
    ("two", r"resources_per_trial\.workers"),
])
def test_bad_worker_counts_are_refused(tmp_path, workers, pattern):
    with pytest.raises(ConfigError, match=pattern):
        SearchSpace.load(_space_file(tmp_path, workers=workers))


def test_a_trial_on_two_workers_holds_no_cpu_itself(tmp_path):
    from stagebudget.searching.tune_adapter import trial_resources

    assert trial_resources(SearchSpace.load(_space_file(tmp_path)))["cpu"] == 0
    assert trial_resources(SearchSpace.load(_space_file(tmp_path, workers=1))) == {"cpu": 1,
                                                                                  "gpu": 0}


@pytest.mark.slow
def test_a_searched_trial_on_two_workers_records_both_spends(tmp_path):
    import optuna

    from stagebudget.rundir import RunDir
    from stagebudget.searching.driver import run_search
    from stagebudget.studystore import open_storage

    run_dir = run_search(_space_file(tmp_path), name="w2", runs_dir=tmp_path / "runs", live=False)
    (record,) = RunDir(run_dir).records()
    assert record.status == "COMPLETE", record.error
    workers = record.ledger["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert all(w["train_seconds"] > 0 for w in workers)
    assert record.ledger["train_seconds"] == pytest.approx(sum(w["train_seconds"] for w in workers))
    assert record.objectives["device_hours"] == pytest.approx(record.ledger["device_hours"])
    assert 0.0 <= record.objectives["id_accuracy"] <= 1.0
    rows = RunDir(run_dir).curves(record.key)
    assert rows[-1]["step"] == record.ledger["stages"][0]["steps_done"] > 0
    # Rank 0's curve rows reached Tune while the workers trained (TuneReportCallback), then the
    # trial's final result; Optuna recorded the trial as complete.
    (results,) = [p for p in run_dir.rglob("result.json") if "train" not in p.parts]
    told = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    assert [r["global_step"] for r in told if not r["final"]] == [r["global_step"] for r in rows]
    assert told[-1]["final"] is True
    meta = RunDir(run_dir).read_meta()
    study = optuna.load_study(study_name=meta["study_name"], storage=open_storage(meta["storage"]))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
def test_two_workers_share_the_prefix_cache_and_write_each_entry_once(tiny_base, tmp_path,
                                                                     one_thread):
    """A 2-worker trial of 4 SFT steps fills the cache (rank 0 writes, every worker's RNG state
    in its checkpoints); a 2-worker trial of 6 steps goes on from its step-4 checkpoint, each
    worker credited its own recorded spend, and trains the curve one process trains alone."""
    import ray

    from stagebudget.prefixcache import PrefixCache
    from stagebudget.searching.workers import run_on_workers
    from stagebudget.training.pipeline import run_schedule

    def sft(steps):
        return Schedule(base_model=str(tiny_base), tasks=TASKS, budget_hours=0.01, stages=(
            StageSpec(kind="sft", steps=steps, lora_rank=4, batch_size=8, eval_interval=2,
                      learning_rate=1e-2),))

    run_schedule(sft(6), tmp_path / "one", device="cpu", cost=COST)
    cache = PrefixCache(tmp_path / "cache")
    # "local": a private Ray (a bare ray.init() joins a cluster another test left running)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first, second = (run_on_workers(
            "stagebudget.training.pipeline:run_schedule", sft(steps), workers=2, cpu=1, gpu=0,
            out_dir=tmp_path / f"two{steps}", device="cpu", cost=COST, prefix_cache=cache)
            for steps in (4, 6))
    finally:
        ray.shutdown()
    entries = cache.all_entries()
    assert sorted((e.kind, e.steps) for e in entries if e.kind != "eval") == [
        ("end", 4), ("end", 6), ("step", 2), ("step", 4), ("step", 6)]
    step4 = next(e for e in entries if (e.kind, e.steps) == ("step", 4))
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in step4.checkpoint.iterdir()}
    assert not any((tmp_path / "cache" / "tmp").glob("*"))
    assert next(e for e in entries if e.kind == "end").records()["workers"][1]["train_seconds"] > 0
    (stage,) = second.ledger["stages"]
    assert stage["reused_steps"] == 4 and stage["steps_done"] == 6
    for mine, before in zip(second.ledger["workers"], first.ledger["workers"], strict=True):
        assert mine["reused_train_seconds"] == pytest.approx(before["stages"][0]["train_seconds"])
        assert mine["spent_train_seconds"] > 0
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two6")
    assert [s for s, _ in a] == [s for s, _ in b] == [2, 4, 6]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) <= LOSS_TOLERANCE


@pytest.mark.slow
def test_a_workers_exception_is_raised_in_the_trial_as_itself(tmp_path):
    """A deterministic failure on the workers (a diverged loss) reaches the trial as the same
    exception type, so the trainable records it FAILED and does not retry it."""
    import functools

    import ray

    from stagebudget.errors import TrainingDiverged
    from stagebudget.searching.workers import run_on_workers
    from stagebudget.testing.fakes import fake_trial_fn

    schedule = Schedule(base_model="builtin:test", tasks=TASKS, stages=(
        StageSpec(kind="sft", steps=4, batch_size=8),))
    # "local": a private Ray (a bare ray.init() joins a cluster another test left running)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(TrainingDiverged, match="sft"):
            run_on_workers(functools.partial(fake_trial_fn, fail="diverge", seconds=0.0),
                           schedule, workers=2, cpu=1, gpu=0, out_dir=tmp_path / "t")
    finally:
        ray.shutdown()


def test_workers_times_cpus_must_fit_this_machine(tmp_path):
    import os

    from stagebudget.errors import UserError
    from stagebudget.searching.preflight import check_local_resources

    cpus = os.cpu_count() or 1
    space = SearchSpace.load(_space_file(tmp_path, workers=2 * cpus, batch_size=16 * cpus))
    with pytest.raises(UserError, match=rf"cpu x workers {2 * cpus} = 1 x 1 x {2 * cpus} = "
                                        rf"{2 * cpus} CPUs, but this machine has {cpus}"):
        check_local_resources(space)
    check_local_resources(SearchSpace.load(_space_file(tmp_path, workers=cpus,
                                                       batch_size=16 * cpus)))
