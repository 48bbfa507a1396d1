"""The search driver: validation before compute, a fake search end to end, the search budget,
samplers, and one real small search (slow)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import optuna
import pytest
import yaml

from runhelpers import demo_space
from stagebudget.errors import ConfigError, UserError
from stagebudget.rundir import RunDir
from stagebudget.schedule import Schedule
from stagebudget.searching.driver import run_search
from stagebudget.searching.preflight import check_local_resources, check_space
from stagebudget.searching.tune_adapter import BudgetLimiter, make_sampler, reference_name
from stagebudget.space.schema import SearchSpace
from stagebudget.studystore import open_storage
from stagebudget.testing.fakes import fake_trial_fn
from stagebudget.version import numerics

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
FAST = functools.partial(fake_trial_fn, seconds=0.1)


def write_space(tmp_path: Path, **changes: object) -> Path:
    """The demo space with top-level ``changes``, written to tmp_path/space.yaml."""
    return demo_space(tmp_path, **changes)


def study_of(run_dir: Path) -> optuna.Study:
    meta = RunDir(run_dir).read_meta()
    return optuna.load_study(study_name=meta["study_name"], storage=open_storage(meta["storage"]))


# --- validation before compute ------------------------------------------------------------
def test_too_much_concurrency_for_this_machine_names_field_and_numbers(tmp_path: Path) -> None:
    cpus = os.cpu_count() or 1
    space = write_space(tmp_path, concurrency=cpus + 1)
    with pytest.raises(UserError, match=rf"concurrency.*{cpus + 1} x 1 .*has {cpus}"):
        run_search(space, runs_dir=tmp_path / "runs", live=False, trial_fn=FAST)
    assert not (tmp_path / "runs").exists()


def test_gpu_request_without_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    space = SearchSpace.load(DEMO, concurrency=1, resources_per_trial={"cpu": 1, "gpu": 1})
    with pytest.raises(UserError, match=r"resources_per_trial.gpu.*has 0"):
        check_local_resources(space)


def test_existing_run_dir_needs_resume_and_missing_one_cannot_resume(tmp_path: Path) -> None:
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    with pytest.raises(UserError, match=r"--resume.*--name"):
        run_search(DEMO, runs_dir=tmp_path / "runs", live=False, trial_fn=FAST)
    with pytest.raises(UserError, match="does not exist"):
        run_search(DEMO, name="nope", runs_dir=tmp_path / "runs", resume=True, live=False)


def test_bad_storage_and_budget_are_refused_before_compute(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither a database URL"):
        run_search(DEMO, runs_dir=tmp_path / "runs", storage="nonsense", live=False)
    assert not (tmp_path / "runs" / "demo").exists()
    with pytest.raises(UserError, match="budget-hours must be a positive number"):
        run_search(DEMO, runs_dir=tmp_path / "runs", search_hours=0, live=False)


def test_a_prefix_cache_that_cannot_be_written_is_refused_before_anything(tmp_path: Path,
                                                                         monkeypatch) -> None:
    """reuse.cache_dir under a file, or in a folder this user cannot write, is a config error
    naming the file, the field and the way out, before any run directory exists."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    space = write_space(tmp_path, reuse={"cache_dir": str(blocker / "cache")})
    with pytest.raises(ConfigError, match=r"reuse\.cache_dir.*a-file is not a directory.*"
                                          r"enabled: false") as info:
        run_search(space, runs_dir=tmp_path / "runs", live=False)
    assert str(space) in str(info.value)
    assert not (tmp_path / "runs").exists() and not (blocker.parent / "cache").exists()
    ok = write_space(tmp_path, reuse={"cache_dir": str(tmp_path / "new" / "cache")})
    check_space(ok)  # a folder still to be created under a writable one is fine
    assert not (tmp_path / "new").exists()  # and checking it writes nothing
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path
                        else real_access(p, mode))  # root ignores permission bits
    with pytest.raises(ConfigError, match="is not writable by this user"):
        check_space(ok)
    check_space(write_space(tmp_path, reuse={"enabled": False,
                                             "cache_dir": str(blocker / "cache")}))


# --- pieces without Ray -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random", "grid"])
def test_every_sampler_builds_and_proposes_inside_the_space(name: str) -> None:
    # the grid sampler needs a gridded space: the published design is one
    path = DEMO.parent / "paper_grid.yaml" if name == "grid" else DEMO
    space = SearchSpace.load(path, sampler={"name": name, "seed": 1})
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=make_sampler(space, trials=8))
    dists = space.optuna_space()
    for _ in range(3):
        trial = study.ask(fixed_distributions=dists)
        assert set(trial.params) == set(dists)
        study.tell(trial, [0.5, 0.5])


def test_the_default_sampler_is_gp_and_a_small_search_is_not_all_random_start_up() -> None:
    """GP is the default (bench/RESULTS.md, "Search quality"); like TPE it starts modelling
    after a third of a small search's trials, not after Optuna's 10."""
    space = SearchSpace.load(DEMO, sampler={"seed": 0})
    sampler = make_sampler(space, 12)
    assert isinstance(sampler, optuna.samplers.GPSampler) and sampler._n_startup_trials == 4
    assert make_sampler(space, 60)._n_startup_trials == 10
    assert SearchSpace.load(DEMO).sampler.name == "gp"  # the demo uses the default


def test_sampler_options_pass_through_and_unknown_ones_are_config_errors() -> None:
    space = SearchSpace.load(DEMO, sampler={"name": "nsga2", "seed": 0,
                                            "options": {"population_size": 6}})
    assert make_sampler(space, 8)._population_size == 6
    bad = SearchSpace.load(DEMO, sampler={"name": "random", "options": {"colour": 1}})
    with pytest.raises(UserError, match=r"sampler\.options"):
        make_sampler(bad, 8)


def test_reference_name_matches_with_float_tolerance() -> None:
    refs = [("sft_only", {"a": 1.0, "b": 8}), ("heuristic", {"a": 0.25, "b": 8})]
    assert reference_name({"a": 0.25 + 1e-15, "b": 8}, refs) == "heuristic"
    assert reference_name({"a": 0.25, "b": 32}, refs) is None


def test_journal_storage_path_opens(tmp_path: Path) -> None:
    from optuna.storages import JournalStorage

    assert isinstance(open_storage(str(tmp_path / "study.log")), JournalStorage)


class _Inner:
    """A stand-in searcher: hands out configs, remembers completions."""

    metric, mode = ["id_accuracy"], ["max"]

    def __init__(self) -> None:
        self.completed: list[str] = []

    def suggest(self, trial_id: str) -> dict:
        return {"x": 1}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        self.completed.append(trial_id)


def test_budget_limiter_counts_running_planned_and_finished_measured() -> None:
    inner = _Inner()
    lim = BudgetLimiter(inner, search_hours=0.3, per_trial_hours=0.1,  # type: ignore[arg-type]
                        planned_hours=lambda c: 0.1, prior_hours=0.05)
    assert lim.suggest("a") == {"x": 1}
    assert lim.suggest("b") == {"x": 1}           # 0.05 + 0.2 committed + 0.1 > 0.3
    assert lim.suggest("c") is None and lim.stopped_by_budget
    lim.on_trial_result("a", {"device_hours": 0.02})
    lim.on_trial_complete("a", error=True)        # failed: charged what it measured
    assert lim.committed_hours == pytest.approx(0.05 + 0.02 + 0.1)
    assert lim.suggest("d") == {"x": 1}           # 0.17 + 0.1 <= 0.3
    lim.on_trial_complete("b", {"device_hours": 0.09})
    lim.on_trial_complete("d", {"device_hours": 0.1})
    assert lim.suggest("e") == "FINISHED"         # nothing running and no room left
    assert inner.completed == ["a", "b", "d"]


# --- fake searches through real Ray and Optuna ---------------------------------------------
def test_fake_search_end_to_end(tmp_path: Path) -> None:
    space = write_space(tmp_path, trials=5, concurrency=2)
    run_dir = run_search(space, name="e2e", runs_dir=tmp_path / "runs", live=False, trial_fn=FAST)
    run = RunDir(run_dir)
    meta = run.read_meta()
    assert meta["study_name"].startswith("e2e-") and meta["trials_requested"] == 5
    assert meta["stopped_by_budget"] is False and meta["storage"].startswith("sqlite:///")
    assert meta["numerics"] == numerics()  # CPU kernels and versions, compared on --resume
    assert SearchSpace.load(run.space).trials == 5           # the saved space reloads
    study = study_of(run_dir)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 5
    # The references ran first, and the study, Tune and the records join on the Tune trial id.
    assert [t.user_attrs.get("reference") for t in study.trials[:3]] == [
        "sft_only", "rl_only", "heuristic"]
    records = {r.key: r for r in run.records()}
    for t in study.trials:
        rec = records[t.user_attrs["tune_trial_id"]]
        assert rec.status == "COMPLETE" and rec.params == t.params
        assert [rec.objectives["id_accuracy"], rec.objectives["ood_accuracy"]] == t.values
        assert rec.versions["optuna"] == optuna.__version__
        assert len(run.curves(rec.key)) == 2
    assert (run_dir / "tune").is_dir()


def test_searches_run_on_a_ray_the_caller_started_and_leave_it_running(tmp_path: Path) -> None:
    """A benchmark starts Ray once for many searches: each search uses it, records no session
    of its own (a resume must not end the caller's Ray) and does not shut it down."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        node = ray.get_runtime_context().get_node_id()
        for name in ("first", "second"):
            (tmp_path / name).mkdir()
            space = write_space(tmp_path / name, trials=3, concurrency=1)
            run_dir = run_search(space, name=name, runs_dir=tmp_path / "runs", live=False,
                                 trial_fn=FAST)
            assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node
            assert "ray_session_dir" not in RunDir(run_dir).read_meta()
            assert [t.state for t in study_of(run_dir).trials] == [
                optuna.trial.TrialState.COMPLETE] * 3
    finally:
        ray.shutdown()


def test_a_search_of_fewer_trials_than_references_leaves_none_waiting(tmp_path: Path) -> None:
    """Two trials run the first two references; the third is never enqueued, so the study
    holds no trial that will never be asked (optuna-dashboard would show it WAITING)."""
    space = write_space(tmp_path, trials=2, concurrency=1)
    run_dir = run_search(space, name="few", runs_dir=tmp_path / "runs", live=False, trial_fn=FAST)
    study = study_of(run_dir)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.user_attrs.get("reference") for t in study.trials] == ["sft_only", "rl_only"]


def test_search_budget_stops_new_trials_and_is_recorded(tmp_path: Path) -> None:
    # per-trial budget 0.008 h; 0.02 h leaves room for two trials, not a third.
    # (Also the journal-file storage path, end to end.)
    space = write_space(tmp_path, trials=6, concurrency=1, references=False,
                        budget={"per_trial_hours": 0.008})
    run_dir = run_search(space, name="budget", runs_dir=tmp_path / "runs", search_hours=0.02,
                         storage=str(tmp_path / "journal.log"), live=False, trial_fn=FAST)
    meta = RunDir(run_dir).read_meta()
    assert meta["stopped_by_budget"] is True and meta["search_budget_hours"] == 0.02
    assert meta["storage"] == "journal:" + str(tmp_path / "journal.log")
    study = study_of(run_dir)
    assert len(study.trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


# --- the real thing ------------------------------------------------------------------------
@pytest.mark.slow
def test_real_small_search_end_to_end(tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO.read_text())
    data.update(base_model="builtin:test", trials=2, concurrency=2, references=False,
                tasks={"source": "builtin", "n_train": 200, "n_id_test": 20, "n_ood_test": 20},
                budget={"per_trial_hours": 0.003})
    data["stages"]["sft"]["eval_interval"] = 10
    data["stages"]["rl"]["eval_interval"] = 10
    space = tmp_path / "real.yaml"
    space.write_text(yaml.safe_dump(data))
    run_dir = run_search(space, name="real", runs_dir=tmp_path / "runs", live=False)
    study = study_of(run_dir)
    assert len(study.trials) == 2
    for rec in RunDir(run_dir).records():
        assert rec.status == "COMPLETE", rec.error
        assert 0.0 <= rec.objectives["id_accuracy"] <= 1.0
        assert rec.ledger
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert json.loads((run_dir / "run.json").read_text())["stopped_by_budget"] is False
    # what Optuna's tools and TensorBoard see of real trials
    assert study.metric_names == ["id_accuracy", "ood_accuracy"]
    for t in study.trials:
        assert t.user_attrs["schedule"] and "/" in t.user_attrs["steps_ran"], t.user_attrs
    assert len([p for p in (run_dir / "tensorboard").iterdir() if p.is_dir()]) == 2
    for rec in RunDir(run_dir).records():  # every stage drew a curve: >= 3 points after its start
        schedule = Schedule.from_dict(rec.schedule)
        rows = RunDir(run_dir).curves(rec.key)
        for i, (stage, spent) in enumerate(zip(schedule.stages, rec.ledger["stages"], strict=True)):
            after = [r for r in rows if r["stage_index"] == i and r["step"] > 0]
            if spent["steps_done"] == stage.steps:  # (a stage the budget clock cut is shorter)
                assert len(after) >= min(3, stage.steps), (stage, after)


def test_live_stats_and_front_table_read_the_study() -> None:
    from rich.console import Console

    from stagebudget.searching.live import collect_stats, front_table, render_stats

    study = optuna.create_study(directions=["maximize", "maximize"])
    for values in ([0.9, 0.3], [0.3, 0.8], [0.5, 0.5], [0.4, 0.4]):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(trial, values)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    stats = collect_stats(study, ["id_accuracy", "ood_accuracy"], requested=8, running=1,
                          spent_hours=0.02, search_hours=0.1)
    assert (stats.done, stats.failed, stats.running, stats.front_size) == (5, 1, 1, 3)
    assert (stats.best_id, stats.best_ood) == (0.9, 0.8)
    assert "5/8 done, 1 running, 1 failed" in stats.line()
    console = Console(width=120, record=True)
    console.print(render_stats(stats))
    console.print(front_table(study, ["id_accuracy", "ood_accuracy"]))
    text = console.export_text()
    assert "0.02 of 0.1" in text and text.count("0.900") == 2  # best ID row + front row


def test_the_live_front_table_renders_the_front_rows_of_the_study() -> None:
    """The live panel's front comes from the one front-row builder: params and reference too."""
    from rich.console import Console

    from stagebudget.pareto import front_rows
    from stagebudget.searching.live import front_table, study_front

    study = optuna.create_study(directions=["maximize", "maximize"])
    for values, ref in (([0.9, 0.3], None), ([0.3, 0.8], "heuristic")):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        if ref:
            trial.set_user_attr("reference", ref)
        study.tell(trial, values)
    names = ["id_accuracy", "ood_accuracy"]
    rows = front_rows(study_front(study, names))
    assert [(r.number, r.reference) for r in rows] == [(1, "heuristic"), (0, None)]
    assert set(rows[0].params) == {"x"}
    console = Console(width=120, record=True)
    console.print(front_table(study, names))
    x = rows[0].params["x"]
    assert f"x={x:g} (heuristic)" in console.export_text()


def test_a_schedule_already_trained_in_the_run_is_reused_not_retrained(tmp_path, monkeypatch) -> None:
    """Different params that plan the same schedule (RL rank with no RL budget) train once."""
    from ray import tune

    from stagebudget.rundir import RunDir
    from stagebudget.searching.trainable import trial_trainable

    ids = iter(["t_00001", "t_00002", "t_00003"])

    class Ctx:
        def __init__(self) -> None:
            self.key = next(ids)

        def get_trial_id(self) -> str:
            return self.key

    reports: list[dict] = []
    trained: list[str] = []
    monkeypatch.setattr(tune, "report", reports.append)

    def fake(schedule, out_dir=None, *, report=None, **_):
        trained.append(schedule.describe())
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "curves.jsonl").write_text('{"stage": "sft", "step": 0}\n')
        return fake_trial_fn(schedule, out_dir, report=report, seconds=0.0)

    space = SearchSpace.load(DEMO)
    sft_only = {"sft.share": 1.0, "sft.lora_rank": 16, "sft.learning_rate": 5e-4}
    for params in ({**sft_only, "rl.lora_rank": 4}, {**sft_only, "rl.lora_rank": 16},
                   {**sft_only, "sft.learning_rate": 1e-3, "rl.lora_rank": 4}):
        ctx = Ctx()
        monkeypatch.setattr(tune, "get_context", lambda c=ctx: c)
        trial_trainable(params, space=space, run_dir=str(tmp_path), trial_fn=fake,
                        cost=space.cost_model(), device="cpu")
    assert len(trained) == 2  # the second trial planned the first one's schedule
    records = {r.key: r for r in RunDir(tmp_path).records()}
    assert records["t_00002"].reused_from == "t_00001"
    assert records["t_00002"].objectives == records["t_00001"].objectives
    assert records["t_00003"].reused_from is None
    assert (tmp_path / "trials" / "t_00002" / "curves.jsonl").read_text().startswith('{"stage"')
    finals = [r for r in reports if r.get("final")]
    assert len(finals) == 3


def test_a_trial_records_its_planned_cost_beside_the_measured_one(tmp_path, monkeypatch) -> None:
    """The nominal cost is what the cost model planned (load-free), recorded when the trial
    starts; the measured device-hours (a stopwatch, slowed by load) stay in the ledger."""
    from ray import tune

    from stagebudget.rundir import RunDir, planned_hours
    from stagebudget.schedule import Schedule
    from stagebudget.searching.trainable import trial_trainable

    class Ctx:
        def get_trial_id(self) -> str:
            return "t_00001"

    monkeypatch.setattr(tune, "report", lambda _: None)
    monkeypatch.setattr(tune, "get_context", Ctx)

    def slow(schedule, out_dir=None, *, report=None, **_):  # a busy machine: twice the time
        result = fake_trial_fn(schedule, out_dir, report=report, seconds=0.0)
        result.device_hours = 2 * schedule.budget_hours
        return result

    space = SearchSpace.load(DEMO)
    cost = space.cost_model()
    trial_trainable({"sft.share": 0.5, "sft.lora_rank": 16, "sft.learning_rate": 1e-3,
                     "rl.lora_rank": 4}, space=space, run_dir=str(tmp_path), trial_fn=slow,
                    cost=cost, device="cpu")
    [record] = RunDir(tmp_path).records()
    planned = cost.schedule_hours(Schedule.from_dict(record.schedule))
    assert record.planned_device_hours == pytest.approx(planned) == planned_hours(record)
    assert 0 < planned <= space.budget.per_trial_hours < record.objectives["device_hours"]


def test_a_cluster_that_refuses_at_connect_leaves_no_run_directory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the up-front probe, a refusal from ray.init still leaves nothing behind."""
    import ray

    import stagebudget.searching.preflight as checks_mod

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    probed: list[str] = []
    monkeypatch.setattr(checks_mod, "check_cluster", probed.append)
    monkeypatch.setattr(ray, "init", refuse)
    space = write_space(tmp_path, trials=1, concurrency=1, references=False)
    with pytest.raises(UserError, match=r"cannot connect to the Ray cluster at --address 10\.0\.0\.1:6379"):
        run_search(space, name="c", runs_dir=tmp_path / "runs", address="10.0.0.1:6379",
                   live=False, trial_fn=FAST)
    assert not (tmp_path / "runs" / "c").exists()
    assert probed == ["10.0.0.1:6379"]  # the up-front probe was the one patched


# --- twins: params that plan a schedule this search has trained, or is training -------------
SFT_ONLY = {"sft.share": 1.0, "sft.lora_rank": 16, "sft.learning_rate": 1e-3}
DISTINCT = {"sft.share": 0.5, "sft.lora_rank": 16, "sft.learning_rate": 1e-3, "rl.lora_rank": 4}


def _twin_search(tmp_path: Path) -> tuple[object, SearchSpace, object]:
    """A StudySearch over the demo space whose first three asks are: SFT only with RL rank 4,
    its twin with RL rank 16 (RL gets no budget, so the rank changes nothing), a new one."""
    from stagebudget.searching.tune_adapter import StudySearch, metric_names, modes, planned_schedule

    space = SearchSpace.load(DEMO)
    cost = space.cost_model()
    search = StudySearch(
        space=space.optuna_space(), metric=metric_names(space), mode=modes(space),
        points_to_evaluate=[{**SFT_ONLY, "rl.lora_rank": 4}, {**SFT_ONLY, "rl.lora_rank": 16},
                            DISTINCT],
        sampler=optuna.samplers.RandomSampler(seed=0), study_name="twins", run_dir=tmp_path,
        schedule_of=functools.partial(planned_schedule, space, cost))
    return search, space, cost


def _finish(run: RunDir, key: str, params: dict, space: SearchSpace, cost: object,
            objectives: dict | None) -> None:
    from stagebudget.rundir import TrialRecord

    schedule = space.schedule_from_params(params, cost, name=key).to_dict()  # type: ignore[arg-type]
    run.write_record(TrialRecord(key=key, params=params, schedule=schedule,
                                 status="COMPLETE" if objectives else "FAILED",
                                 objectives=objectives or {}))


def test_a_twin_of_a_finished_trial_is_told_its_result_and_takes_no_trial(tmp_path: Path) -> None:
    from stagebudget.searching.live import collect_stats, study_front
    from stagebudget.searching.resume import finished_trials

    search, space, cost = _twin_search(tmp_path)
    run = RunDir(tmp_path)
    first = {**SFT_ONLY, "rl.lora_rank": 4}
    assert search.suggest("a") == first  # type: ignore[attr-defined]
    scores = {"id_accuracy": 0.7, "ood_accuracy": 0.3}
    _finish(run, "a", first, space, cost, scores)
    search.on_trial_complete("a", result=scores)  # type: ignore[attr-defined]
    # the twin is told a's result; the same Tune trial gets the next, new schedule
    assert search.suggest("b") == DISTINCT  # type: ignore[attr-defined]
    study = search.study  # type: ignore[attr-defined]
    a, twin, b = study.get_trials(deepcopy=False)
    assert twin.state == optuna.trial.TrialState.COMPLETE and twin.values == a.values
    assert twin.user_attrs["twin_of"] == 0 and twin.params["rl.lora_rank"] == 16
    assert b.state == optuna.trial.TrialState.RUNNING and b.user_attrs["tune_trial_id"] == "b"
    record = run.read_record(twin.user_attrs["tune_trial_id"])
    assert record is not None and record.reused_from == "a" and record.objectives == scores
    # it took no slot (a resume counts one finished trial) and is on the live front once
    assert finished_trials(study) == 1
    names = ["id_accuracy", "ood_accuracy"]
    assert collect_stats(study, names, requested=3, running=1, spent_hours=0.0,
                         search_hours=None).done == 1
    assert len(study_front(study, names).points) == 1


@pytest.mark.parametrize("ends", ["COMPLETE", "FAIL"])
def test_a_twin_of_a_running_trial_waits_and_is_told_how_it_ended(tmp_path: Path,
                                                                  ends: str) -> None:
    search, space, cost = _twin_search(tmp_path)
    first = {**SFT_ONLY, "rl.lora_rank": 4}
    assert search.suggest("a") == first  # type: ignore[attr-defined]
    assert search.suggest("b") == DISTINCT  # type: ignore[attr-defined]  # not a second a
    study = search.study  # type: ignore[attr-defined]
    twin = study.get_trials(deepcopy=False)[1]
    assert twin.state == optuna.trial.TrialState.RUNNING and twin.user_attrs["twin_of"] == 0
    scores = {"id_accuracy": 0.7, "ood_accuracy": 0.3} if ends == "COMPLETE" else None
    _finish(RunDir(tmp_path), "a", first, space, cost, scores)
    search.on_trial_complete("a", result=scores, error=scores is None)  # type: ignore[attr-defined]
    twin = study.get_trials(deepcopy=False)[1]
    assert twin.state.name == ends
    if scores:
        assert twin.values == [0.7, 0.3]


def test_the_console_names_the_runs_tensorboard_folder_not_rays_nor_token_auth(
        tmp_path: Path) -> None:
    """Ray's "To visualize your results with TensorBoard" hint points into its temporary
    session folder and its token-auth notice is noise: neither is printed by a search (in a
    fresh process, as the CLI runs it); it names RUN/tensorboard instead, and Tune still writes
    its own JSON/CSV results."""
    import subprocess
    import sys

    space = write_space(tmp_path, trials=2, concurrency=1)
    script = ("import functools, sys; from stagebudget.testing.fakes import fake_trial_fn; "
              "from stagebudget.searching.driver import run_search; "
              "print(run_search(sys.argv[1], name='quiet', runs_dir=sys.argv[2], live=False, "
              "trial_fn=functools.partial(fake_trial_fn, seconds=0.1)))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([sys.executable, "-c", script, str(space), str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert "To visualize your results with TensorBoard" not in out
    assert "Token authentication is enabled" not in out
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in out
    tune_dir = run_dir / "tune"
    assert list(tune_dir.rglob("result.json")) and list(tune_dir.rglob("progress.csv"))
    assert not list(tune_dir.rglob("events.out.tfevents*"))
