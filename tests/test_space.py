from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from stagebudget.errors import ConfigError
from stagebudget.space.dims import Dist, to_optuna
from stagebudget.space.schema import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))

BASE = {
    "name": "t",
    "budget": {"per_trial_hours": 0.01},
    "stages": {
        "sft": {"share": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25},
                "lora_rank": {"type": "categorical", "choices": [8, 32]},
                "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "rl": {"share": "rest", "lora_rank": 4, "batch_size": 16},
    },
}


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_spaces_load_and_fit(path):
    space = SearchSpace.load(path)
    cost = space.cost_model()
    cheap, dear = space.check_feasible(cost)
    assert cost.schedule_seconds(dear) <= space.per_trial_budget.seconds
    assert cost.schedule_seconds(cheap) <= cost.schedule_seconds(dear)


def test_paper_grid_is_the_published_design():
    space = SearchSpace.load(ROOT / "search_spaces" / "paper_grid.yaml")
    grid = space.grid_space()
    assert grid["sft.share"] == [i / 8 for i in range(8)]
    # the published ranks, scaled to the 64-wide built-in model (RL ranks a quarter of SFT's)
    assert grid["sft.lora_rank"] == [4, 16, 64]
    assert grid["rl.lora_rank"] == [1, 4, 16]
    assert space.trials == 8 * 3 * 3


def test_converter_matches_hand_written_space(tmp_path):
    """The same seeded sampler over the converted and a hand-written space suggests the same."""
    space = SearchSpace.load(write(tmp_path, BASE))
    converted = space.optuna_space()
    hand = {
        "sft.share": optuna.distributions.FloatDistribution(0.0, 1.0, step=0.25),
        "sft.lora_rank": optuna.distributions.CategoricalDistribution([8, 32]),
        "sft.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
    }
    assert converted == hand

    def suggestions(dists):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
        out = []
        for _ in range(10):
            trial = study.ask(dists)
            out.append(trial.params)
            study.tell(trial, 0.0)
        return out

    assert suggestions(converted) == suggestions(hand)


@pytest.mark.parametrize(
    "dist",
    [
        {"type": "float", "low": 0.1, "high": 2.0},
        {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        {"type": "float", "low": 0.0, "high": 1.0, "step": 0.125},
        {"type": "int", "low": 1, "high": 9, "step": 2},
        {"type": "int", "low": 1, "high": 1024, "log": True},
        {"type": "categorical", "choices": [4, 16, 64]},
        {"type": "categorical", "choices": ["all-linear", "q_proj,v_proj"]},
    ],
)
def test_every_domain_round_trips(dist):
    d = Dist.model_validate(dist)
    assert Dist.model_validate(d.model_dump(exclude_none=True)) == d
    od = to_optuna(d)
    again = optuna.distributions.json_to_distribution(optuna.distributions.distribution_to_json(od))
    assert again == od


def test_params_to_schedule_uses_rest_share(tmp_path):
    space = SearchSpace.load(write(tmp_path, BASE))
    cost = space.cost_model()
    s = space.schedule_from_params({"sft.share": 0.25, "sft.lora_rank": 32,
                                    "sft.learning_rate": 1e-3}, cost)
    sft, rl = s.stages
    assert (sft.kind, sft.lora_rank, sft.learning_rate, rl.kind, rl.lora_rank) == ("sft", 32, 1e-3, "rl", 4)
    assert cost.schedule_seconds(s) <= space.per_trial_budget.seconds
    only_sft = space.schedule_from_params({"sft.share": 1.0, "sft.lora_rank": 8,
                                           "sft.learning_rate": 1e-3}, cost)
    assert [st.kind for st in only_sft.stages] == ["sft"]


def test_a_cpt_corpus_is_fixed_or_searched_like_any_stage_setting(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["stages"] = {"cpt": {"share": 0.25, "corpus": "raw", "lora_rank": 8}, **data["stages"]}
    data["stages"]["sft"]["share"] = {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25}
    space = SearchSpace.load(write(tmp_path, data))
    params = {"sft.share": 0.25, "sft.lora_rank": 8, "sft.learning_rate": 1e-3}
    cpt = space.schedule_from_params(params, space.cost_model()).stages[0]
    assert (cpt.kind, cpt.corpus) == ("cpt", "raw")
    data["stages"]["cpt"]["corpus"] = {"type": "categorical", "choices": ["mixture", "raw"]}
    space = SearchSpace.load(write(tmp_path, data))
    assert "cpt.corpus" in space.dimensions()
    data["stages"]["cpt"]["corpus"] = "tasks"
    with pytest.raises(ConfigError, match=r"mixture.*raw"):
        SearchSpace.load(write(tmp_path, data))


def test_reference_points_are_inside_the_space(tmp_path):
    space = SearchSpace.load(write(tmp_path, BASE))
    refs = dict(space.reference_points())
    assert set(refs) == {"sft_only", "rl_only", "heuristic"}
    dists = space.optuna_space()
    for params in refs.values():
        for name, value in params.items():
            assert dists[name]._contains(dists[name].to_internal_repr(value)), (name, value)
    assert refs["heuristic"]["sft.share"] == 0.25
    assert refs["heuristic"]["sft.lora_rank"] == 32


def bad(**changes):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        (bad(colour="red"), ["unknown key `colour`", "allowed keys"]),
        (bad(trials="many"), ["trials"]),
        (bad(stages__sft__lora_rank={"type": "categorical", "choices": []}), ["non-empty"]),
        (bad(stages__sft__lora_rank={"type": "categorical", "choices": [8, 8]}), ["must not repeat"]),
        (bad(stages__sft__learning_rate={"type": "float", "low": 5, "high": 2}), ["low <= high", "low=5"]),
        (bad(stages__sft__learning_rate={"type": "float", "low": 0, "high": 1, "log": True}), ["low > 0"]),
        (bad(budget={"per_trial_hours": -1}), ["budget.per_trial_hours", "greater than 0"]),
        (bad(budget={"per_trial_hours": 1e-6}), ["would fit one step"]),
        (bad(sampler={"name": "cmaes"}), ["unknown sampler", "tpe"]),
        (bad(objectives=[{"name": "bleu"}]), ["unknown objective", "ood_accuracy"]),
        (bad(objectives=[{"name": "id_accuracy"}, {"name": "id_accuracy"}]), ["must not repeat"]),
        (bad(stages__sft__lora_rank={"type": "categorical", "choices": [8, 2.5]}), ["an integer >= 0"]),
        (bad(stages__sft__lora_rank=-4), ["lora_rank"]),
        (bad(stages__ppo={"share": 0.1}), ["unknown stage 'ppo'"]),
        (bad(stages__sft__num_generations=4), ["only to the rl stage"]),
        (bad(stages__sft__corpus="raw"), ["only to the cpt stage"]),
        (bad(stages__rl__share=0.5), ["add up"]),
        (bad(concurrency=0), ["concurrency"]),
    ],
)
def test_bad_spaces_are_clear_errors(tmp_path, data, needles):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        SearchSpace.load(path)
    text = str(err.value)
    assert str(path) in text
    for needle in needles:
        assert needle in text


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\nstages: [1,\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        SearchSpace.load(p)


def test_grid_needs_steps(tmp_path):
    with pytest.raises(ConfigError, match="needs `step`"):
        SearchSpace.load(write(tmp_path, {**BASE, "sampler": {"name": "grid"}}))


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "..", "x" * 101])
def test_run_names_cannot_escape_the_runs_folder(tmp_path, name):
    with pytest.raises(ConfigError, match="run name"):
        SearchSpace.load(write(tmp_path, {**BASE, "name": name}))


def test_relative_paths_resolve_inside_the_space_folder(tmp_path):
    (tmp_path / "tasks.jsonl").write_text("")
    space = SearchSpace.load(write(tmp_path, {**BASE, "tasks": {"source": "tasks.jsonl", "scorer": "exact"}}))
    assert space.tasks.source == str((tmp_path / "tasks.jsonl").resolve())
    with pytest.raises(ConfigError, match="leaves the space file's folder"):
        SearchSpace.load(write(tmp_path, {**BASE, "tasks": {"source": "../../etc/passwd"}}))


def test_bad_task_rows_and_missing_models_are_caught_before_compute(tmp_path):
    rows = ['{"prompt": "a=", "answer": "b", "split": "train"}',
            '{"prompt": "c=", "answer": "", "split": "train"}',
            '{"prompt": "d=", "answer": "e", "split": "id_test"}',
            '{"prompt": "f=", "answer": "g", "split": "ood_test"}']
    (tmp_path / "tasks.jsonl").write_text("\n".join(rows) + "\n")
    space = SearchSpace.load(write(tmp_path, {**BASE, "tasks": {"source": "tasks.jsonl", "scorer": "exact"}}))
    with pytest.raises(ConfigError, match="line 2"):
        space.check_inputs()
    (tmp_path / "tasks.jsonl").write_text("\n".join(rows[:1] + rows[2:]) + "\n")
    space.check_inputs()  # the fixed file passes
    missing = SearchSpace.load(write(tmp_path, {**BASE, "base_model": "/nonexistent/model"}))
    with pytest.raises(ConfigError, match="base_model"):
        missing.check_inputs()


# --- stage settings carry StageSpec's own bounds (issue 14: no raw pydantic traceback) ---------
LOG_LR = {"type": "float", "low": 1e-4, "high": 2.0, "log": True}


@pytest.mark.parametrize(
    ("stage", "field", "value", "allowed"),
    [
        ("sft", "learning_rate", 2.0, "> 0 and <= 1.0"),
        ("sft", "learning_rate", -1e-3, "> 0 and <= 1.0"),
        ("sft", "learning_rate", LOG_LR, "> 0 and <= 1.0"),
        ("sft", "batch_size", 0, "an integer >= 1"),
        ("sft", "eval_interval", 0, "an integer >= 1"),
        ("sft", "max_length", 2, "an integer >= 8"),
        ("rl", "num_generations", 1, "an integer >= 2"),
        ("rl", "num_generations", {"type": "int", "low": 1, "high": 8}, "an integer >= 2"),
        ("sft", "lora_alpha", 0, "an integer >= 1"),
        ("rl", "temperature", 0.0, "a number > 0"),
        ("rl", "beta", -0.1, "a number >= 0"),
        ("sft", "lora_dropout", 1.5, "a number >= 0 and < 1"),
        ("sft", "batch_size", {"type": "categorical", "choices": [8, "16"]}, "one type"),
        ("sft", "batch_size", {"type": "float", "low": 4, "high": 8}, "not float"),
        ("sft", "lora_target_modules", "q_proj;v_proj", "comma-separated"),
    ],
)
def test_out_of_range_stage_values_name_file_field_value_and_range(
        tmp_path, stage, field, value, allowed):
    path = write(tmp_path, bad(**{f"stages__{stage}__{field}": value}))
    with pytest.raises(ConfigError) as err:
        SearchSpace.load(path)
    text = str(err.value)
    assert str(path) in text and f"stages.{stage}.{field}" in text and allowed in text
    shown = value["high"] if isinstance(value, dict) and "high" in value else value
    if not isinstance(value, dict):
        assert repr(shown) in text
    assert "\n" not in text


def test_out_of_range_values_exit_2_from_the_cli_without_traceback(tmp_path):
    from stagebudget.cli import main

    path = write(tmp_path, bad(stages__sft__learning_rate=LOG_LR))
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(path)])
    assert exit_.value.code == 2


def test_steps_must_be_whole_and_not_negative(tmp_path):
    data = {"budget": {"per_trial_hours": 0.01}, "stages": {
        "sft": {"steps": {"type": "int", "low": -5, "high": 20}}}}
    with pytest.raises(ConfigError, match="whole numbers >= 0"):
        SearchSpace.load(write(tmp_path, data))


def test_lora_settings_per_stage_fixed_or_searched(tmp_path):
    from stagebudget.plan.cost import CostModel, ModelShape
    from stagebudget.trlconfig import LORA_ALGORITHM, lora_kwargs

    data = bad(stages__sft__lora_target_modules={"type": "categorical",
                                                 "choices": ["all-linear", "q_proj,v_proj"]},
               stages__sft__lora_dropout={"type": "float", "low": 0.0, "high": 0.2},
               stages__rl__lora_alpha=16)
    space = SearchSpace.load(write(tmp_path, data))
    dims = space.dimensions()
    assert {"sft.lora_target_modules", "sft.lora_dropout"} <= set(dims)
    cost = CostModel.analytic(ModelShape.builtin("tiny"))
    schedule = space.schedule_from_params(
        {"sft.share": 0.5, "sft.lora_rank": 8, "sft.learning_rate": 1e-3,
         "sft.lora_target_modules": "q_proj,v_proj", "sft.lora_dropout": 0.1}, cost)
    sft, rl = schedule.stage("sft"), schedule.stage("rl")
    assert lora_kwargs(sft)["target_modules"] == ["q_proj", "v_proj"]
    assert lora_kwargs(sft)["lora_dropout"] == 0.1
    assert lora_kwargs(rl) == {"r": 4, "lora_alpha": 16, "target_modules": "all-linear",
                               "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
                               **LORA_ALGORITHM}  # the pinned adapter (test_trlconfig.py)


def test_validate_plans_every_grid_point_and_names_the_ones_that_cannot_fit(tmp_path):
    """Issue 12: the corners alone passed, a mid-space point (a small RL share with long
    completions) failed at run time. Now every grid value is planned and the bad ones named."""
    data = bad(stages__rl__max_completion_length=256, budget__per_trial_hours=0.003)
    with pytest.raises(ConfigError) as err:
        SearchSpace.load(write(tmp_path, data))
    text = str(err.value)
    assert "cannot fit the budget" in text and "sft.share=0.75" in text  # mid-space, not an end
    assert "budget.per_trial_hours" in text and str(tmp_path) in text
    # the old check (both ends of every range) saw nothing wrong with this space
    space = SearchSpace.model_validate(data)
    cost = space.cost_model()
    for params in ({**p, "sft.share": s} for p in space.feasibility_params() for s in (0.0, 1.0)):
        space.schedule_from_params(params, cost)


def test_probe_values_cover_grid_and_edges():
    assert Dist(type="float", low=0, high=1, step=0.25).probe_values() == [0, 0.25, 0.5, 0.75, 1]
    assert Dist(type="int", low=1, high=10**9).probe_values() == [1, 2, 10**9 - 1, 10**9]
    assert Dist(type="float", low=1e-4, high=1e-2, log=True).probe_values() == [1e-4, 1e-2]


def test_task_file_sizes_and_scorer_file_are_resolved_at_load(tmp_path):
    rows = [{"prompt": f"{i}=", "answer": "b", "split": s}
            for i, s in enumerate(("train", "train", "id_test", "ood_test"))]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "score.py").write_text("def f(prediction, answer):\n    return 1.0\n")
    space = SearchSpace.load(write(tmp_path, {**BASE, "tasks": {
        "source": "tasks.jsonl", "scorer": "score.py:f", "answer": "last_line"}}))
    t = space.tasks
    assert (t.n_train, t.n_id_test, t.n_ood_test) == (2, 1, 1)
    assert t.scorer == f"{tmp_path / 'score.py'}:f"
    assert space.check_inputs() == []
    schedule = space.schedule_from_params(next(space.feasibility_params()), space.cost_model())
    assert schedule.tasks.n_train == 2 and schedule.tasks.answer == "last_line"


def test_chat_tasks_with_the_builtin_model_are_refused_before_compute(tmp_path):
    chat = [{"role": "user", "content": "a"}]
    rows = [{"prompt": chat, "answer": "b", "split": s} for s in ("train", "id_test", "ood_test")]
    rows[1]["answer"] = "c"
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    space = SearchSpace.load(write(tmp_path, {**BASE, "tasks": {"source": "tasks.jsonl"}}))
    with pytest.raises(ConfigError, match="no chat template"):
        space.check_inputs()


def test_relative_and_absolute_model_paths_share_one_cost_table(tmp_path, monkeypatch):
    from stagebudget.plan.costtable import default_table_path

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert default_table_path("m", "cpu") == default_table_path("./m", "cpu") == \
        default_table_path(str(tmp_path / "m"), "cpu")


def test_the_overrun_guard_is_a_budget_setting(tmp_path):
    """budget.overrun_guard reaches the trial (default ledger.OVERRUN_GUARD); below 1 is refused
    with the field named."""
    from stagebudget.plan.cost import OVERRUN_GUARD

    assert SearchSpace.load(write(tmp_path, BASE)).budget.overrun_guard == OVERRUN_GUARD
    data = json.loads(json.dumps(BASE))
    data["budget"]["overrun_guard"] = 0.5
    with pytest.raises(ConfigError, match="overrun_guard"):
        SearchSpace.load(write(tmp_path, data))


def test_a_relative_prefix_cache_dir_is_resolved_once_against_the_space_file(tmp_path):
    """Resolved at load, so the run's saved space, the checks and every trial agree on one
    folder; it is an output, so it may lie outside the space file's folder."""
    folder = tmp_path / "spaces"
    folder.mkdir()
    for given, want in (("prefixes", folder / "prefixes"), ("../cache", tmp_path / "cache"),
                        (str(tmp_path / "abs"), tmp_path / "abs")):
        space = SearchSpace.load(write(folder, {**BASE, "reuse": {"cache_dir": given}}))
        assert space.reuse.cache_dir == str(want)
        assert space.reuse.cache().root == want
    assert SearchSpace.load(write(folder, {**BASE, "reuse": {"enabled": False}})).reuse.cache() \
        is None


def test_a_space_names_its_file_and_keeps_it_with_another_search_budget(tmp_path):
    path = write(tmp_path, BASE)
    space = SearchSpace.load(path)
    assert space.source_file == str(path)
    wider = space.with_search_hours(5.0)
    assert wider.budget.search_hours == 5.0 and wider.source_file == str(path)
    assert space.budget.search_hours is None  # the loaded space is left as it was
    assert SearchSpace.model_validate(BASE).source_file is None
