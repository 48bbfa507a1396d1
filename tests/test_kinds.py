"""A stage kind is one registration: schedules, spaces, the cost model, the planner, export and
the exported script, the stage lookup, the curves' training signal, the reference points, the run
view's SFT share and the fakes all follow it (shown with a toy kind)."""

from __future__ import annotations

import pytest
import yaml

from stagebudget.errors import ConfigError
from stagebudget.kinds import (
    IMITATION,
    REINFORCEMENT,
    StageKindInfo,
    get_kind,
    kind_only_fields,
    kinds_with_role,
    register_stage_kind,
    signal_columns,
    stage_kinds,
    unregister_stage_kind,
)
from stagebudget.plan.cost import Budget, CostModel, ModelShape, plan_schedule
from stagebudget.results.export import stage_export
from stagebudget.results.exportscript import render_script
from stagebudget.results.run import TrialView
from stagebudget.rundir import RunDir
from stagebudget.schedule import Schedule, StageSpec
from stagebudget.searching.tbcurves import scalar_tags
from stagebudget.space.schema import SearchSpace
from stagebudget.testing.fakes import fake_trial_fn
from stagebudget.training.pipeline import _latest_signal
from stagebudget.training.stages import get_stage
from stagebudget.trlconfig import config_class, corpus_size, lora_kwargs, trl_config_kwargs


def toy_runner(ctx):  # pragma: no cover - looked up, not run
    return None


TOY_DATA = '''texts = pretrain_corpus(seed=SEED, n=stage["corpus_size"])
return Dataset.from_list([{"text": t.upper()} for t in texts])'''


@pytest.fixture
def toy_kind():
    info = register_stage_kind(StageKindInfo(
        name="toy", order=15, runner=toy_runner, trl_config="trl.SFTConfig",
        trl_args={"completion_only_loss": True, "packing": False},
        text_corpus=True, signal="toy_score", signal_log="toy", role=IMITATION,
        script_data=TOY_DATA, script_doc="upper-case text"))
    yield info
    unregister_stage_kind("toy")


def test_builtin_kinds_in_stage_order():
    assert stage_kinds() == ("cpt", "sft", "rl")
    assert set(kind_only_fields()) == {"num_generations", "max_completion_length", "beta",
                                       "temperature", "corpus"}
    assert get_kind("cpt").data_fields == ("corpus",)
    assert kinds_with_role(IMITATION) == ("sft",) and kinds_with_role(REINFORCEMENT) == ("rl",)
    assert signal_columns() == ("train_loss", "reward")
    assert [k for k in stage_kinds() if get_kind(k).text_corpus] == ["cpt"]


def test_an_unknown_role_is_refused():
    with pytest.raises(ValueError, match="role must be one of imitation, reinforcement"):
        register_stage_kind(StageKindInfo(name="odd", order=1, runner="x:y", trl_config="z",
                                          role="teacher"))
    assert "odd" not in stage_kinds()


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
    assert get_stage("toy") is toy_runner
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


def test_a_toy_kinds_facts_reach_their_readers(tmp_path, toy_kind):
    spec = StageSpec(kind="toy", steps=50, lora_rank=4, batch_size=8)
    # the pipeline's curves carry its training signal, and TensorBoard writes it
    logs = [{"toy": 0.5, "loss": 2.0}, {"loss": 1.0}]
    assert _latest_signal("toy", logs) == {"toy_score": 0.5}
    assert _latest_signal("sft", logs) == {"train_loss": 1.0}
    assert "toy_score" in signal_columns() and "toy_score" in scalar_tags()
    # it trains on a text corpus: the export says how many texts a pass
    assert stage_export(spec, 0, 1, "cpu")["corpus_size"] == corpus_size(spec) == 400
    assert "corpus_size" not in stage_export(StageSpec(kind="sft", steps=5), 0, 1, "cpu")
    # which corpus: cpt's own option, else the base's pre-training mixture
    assert stage_export(StageSpec(kind="cpt", steps=5, corpus="raw"), 0, 1, "cpu")["corpus"] == "raw"
    assert stage_export(spec, 0, 1, "cpu")["corpus"] == "mixture"
    # the exported script builds its data from its own code and trains it with SFTTrainer
    schedule = Schedule(stages=(StageSpec(kind="sft", steps=5), spec, StageSpec(kind="rl", steps=5)))
    script = render_script({"schedule": schedule.to_dict(), "source": {}, "trl": [
        stage_export(s, i, 0, "cpu") for i, s in enumerate(schedule.stages)]})
    compile(script, "best.py", "exec")
    assert ('    if stage["stage"] == "toy":\n'
            '        texts = pretrain_corpus(seed=SEED, n=stage["corpus_size"])\n'
            '        return Dataset.from_list([{"text": t.upper()} for t in texts])\n') in script
    assert "toy: upper-case text" in script and 'if stage["stage"] == "rl":' in script
    # it imitates: its budget is the run view's SFT share, and the fake scores it as SFT
    view = TrialView(number=0, state="COMPLETE", params={"toy.share": 0.3}, values={},
                     record=None, run_dir=RunDir(tmp_path))
    assert view.sft_share == 0.3
    toy_rl = Schedule(stages=(StageSpec(kind="toy", steps=30), StageSpec(kind="rl", steps=10)))
    rl_only = Schedule(stages=(StageSpec(kind="rl", steps=40),))
    assert fake_trial_fn(toy_rl, seconds=0).id_accuracy > fake_trial_fn(rl_only, seconds=0).id_accuracy
    # the reference recipes take it as the SFT stage of a space without sft
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"budget": {"per_trial_hours": 0.05}, "stages": {
        "toy": {"share": {"type": "float", "low": 0.0, "high": 1.0}}, "rl": {"share": "rest"}}}))
    refs = dict(SearchSpace.load(path).reference_points())
    assert {n: p["toy.share"] for n, p in refs.items()} == {"sft_only": 1.0, "rl_only": 0.0,
                                                             "heuristic": 0.25}


def test_the_script_refuses_a_kind_it_cannot_train():
    register_stage_kind(StageKindInfo(name="mute", order=15, runner=toy_runner,
                                      trl_config="trl.SFTConfig"))
    try:
        schedule = Schedule(stages=(StageSpec(kind="mute", steps=5),))
        document = {"schedule": schedule.to_dict(), "source": {},
                    "trl": [stage_export(schedule.stages[0], 0, 0, "cpu")]}
        with pytest.raises(ValueError, match="cannot train a 'mute' stage"):
            render_script(document)
    finally:
        unregister_stage_kind("mute")


def test_unregistered_kind_is_named(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"budget": {"per_trial_hours": 0.05},
                                    "stages": {"toy": {"share": 1.0}}}))
    with pytest.raises(ConfigError, match="unknown stage 'toy'; allowed: cpt, sft, rl"):
        SearchSpace.load(path)
