"""GRPO generation through vLLM (issue 24, part 2): a validated, exported, priced stage setting,
refused before any compute where it cannot run (this CPU machine has no CUDA GPU and no vLLM).
The GPU path itself runs in bench/gpu.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from stagebudget.cli import main
from stagebudget.errors import ConfigError, UserError
from stagebudget.plan.cost import CostModel, ModelShape
from stagebudget.results.export import stage_export
from stagebudget.schedule import Schedule, StageSpec, VLLMSpec
from stagebudget.searching.driver import run_search
from stagebudget.searching.preflight import check_space
from stagebudget.space.schema import SearchSpace
from stagebudget.training import vllmcheck
from stagebudget.training.stages.rl import generation_record
from stagebudget.trlconfig import NOT_ALGORITHM, VLLM_ALGORITHM, trl_config_kwargs

RL_VLLM = {"share": "rest", "vllm": {"gpu_memory_utilization": 0.4}}


def space_file(tmp_path: Path, rl: dict | None = None, **top) -> Path:
    data = {"name": "v", "budget": {"per_trial_hours": 0.01},
            "resources_per_trial": {"cpu": 1, "gpu": 1},
            "stages": {"sft": {"share": {"type": "categorical", "choices": [0.0, 0.5]}},
                       "rl": RL_VLLM if rl is None else rl}, **top}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fake_fn(*args, **kwargs):  # pragma: no cover - never reached: the search is refused first
    raise AssertionError("a trial started")


# --- the setting: validated, planned, mapped to TRL -------------------------------------------
def test_a_space_plans_the_vllm_setting_into_its_rl_stages(tmp_path):
    space = SearchSpace.load(space_file(tmp_path))
    sched = space.schedule_from_params({"sft.share": 0.5}, space.cost_model())
    rl = sched.stage("rl")
    assert rl is not None and rl.vllm == VLLMSpec(gpu_memory_utilization=0.4)
    assert sched.stage("sft").vllm is None
    assert "rl.vllm" not in space.dimensions()  # fixed, never searched
    assert Schedule.from_dict(yaml.safe_load(yaml.safe_dump(sched.to_dict()))) == sched


def test_a_schedule_without_vllm_keeps_its_identity():
    """Unset, the field is not written: every schedule trained before keeps its digest (prefix
    cache keys, twins and resumes stay valid); set, it makes another schedule."""
    plain = Schedule(stages=(StageSpec(kind="rl", steps=3),))
    assert "vllm" not in plain.to_dict()["stages"][0]
    with_vllm = Schedule(stages=(StageSpec(kind="rl", steps=3, vllm=VLLMSpec()),))
    assert with_vllm.digest() != plain.digest()


@pytest.mark.parametrize("stage, match", [
    ({"kind": "sft", "steps": 2, "vllm": {}}, r"`vllm` applies only to stages that generate \(rl\)"),
    ({"kind": "rl", "steps": 2, "vllm": {"mode": "server"}}, r"colocate"),
    ({"kind": "rl", "steps": 2, "vllm": {"gpu_memory_utilization": 1.5}}, r"gpu_memory_utilization"),
    ({"kind": "rl", "steps": 2, "vllm": {"tensor_paralel_size": 2}}, r"tensor_paralel_size"),
])
def test_bad_vllm_settings_in_a_schedule_name_the_field(stage, match):
    with pytest.raises(ConfigError, match=match) as err:
        Schedule.from_dict({"stages": [stage]}, source="s.yaml")
    assert "s.yaml" in str(err.value)


@pytest.mark.parametrize("changes, match", [
    ({"rl": {"share": "rest"}, "stages_sft_vllm": True}, r"`sft\.vllm` applies only to stages that generate"),
    ({"device": "cpu"}, r"device is 'cpu'"),
    ({"resources_per_trial": {"cpu": 1, "gpu": 0}}, r"resources_per_trial\.gpu"),
    ({"rl": {"share": "rest", "vllm": {"tensor_parallel_size": 2}}}, r"tensor_parallel_size` = 2 must divide"),
])
def test_a_space_refuses_vllm_where_it_cannot_apply(tmp_path, changes, match):
    changes = dict(changes)
    rl = changes.pop("rl", None)
    path = space_file(tmp_path, rl=rl, **{k: v for k, v in changes.items() if k != "stages_sft_vllm"})
    if "stages_sft_vllm" in changes:
        data = yaml.safe_load(path.read_text())
        data["stages"]["sft"]["vllm"] = {}
        path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match) as err:
        SearchSpace.load(path)
    assert str(path) in str(err.value)


def test_the_trl_config_carries_the_setting_and_pins_what_vllm_changes():
    import trl

    args = trl_config_kwargs(StageSpec(kind="rl", steps=4, vllm=VLLMSpec(enable_sleep_mode=True)))
    assert args["use_vllm"] is True and args["vllm_mode"] == "colocate"
    assert args["vllm_enable_sleep_mode"] is True and args["vllm_gpu_memory_utilization"] == 0.3
    assert {k: args[k] for k in VLLM_ALGORITHM} == VLLM_ALGORITHM
    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    assert {k: defaults[k] for k in VLLM_ALGORITHM} == VLLM_ALGORITHM  # TRL's own defaults
    assert set(VLLM_ALGORITHM) <= NOT_ALGORITHM  # read only with vLLM on: inert when off
    assert "use_vllm" not in trl_config_kwargs(StageSpec(kind="rl", steps=4))


def test_the_export_writes_it_into_the_grpo_config(tmp_path):
    entry = stage_export(StageSpec(kind="rl", steps=4, vllm=VLLMSpec()), 1, seed=0, device="cuda")
    assert entry["config"] == "trl.GRPOConfig"
    assert entry["args"]["use_vllm"] is True and entry["args"]["vllm_tensor_parallel_size"] == 1
    import trl  # the exported arguments construct TRL's config as they stand

    config = trl.GRPOConfig(output_dir=str(tmp_path), **stage_export(
        StageSpec(kind="rl", steps=4, vllm=VLLMSpec()), 1, seed=0, device="cpu")["args"])
    assert config.use_vllm and config.vllm_mode == "colocate"


def test_each_rl_stage_records_its_engine_and_whether_it_reproduces():
    assert generation_record(StageSpec(kind="rl", steps=1)) == {
        "engine": "transformers", "bit_reproducible": True}
    rec = generation_record(StageSpec(kind="rl", steps=1, vllm=VLLMSpec()))
    assert rec["engine"] == "vllm" and rec["bit_reproducible"] is False
    assert rec["mode"] == "colocate" and "trial seed" in rec["sampler_seed"]


# --- priced apart -------------------------------------------------------------------------------
def _table(*engines: bool) -> CostModel:
    entries = [{"kind": "rl", "rank": 4, "batch": 8, "num_generations": 8,
                "max_completion_length": 12, "vllm": v, "seconds_per_step": 1.0 if v else 3.0}
               for v in engines]
    return CostModel(shape=ModelShape.builtin("tiny"), device="cuda", table=entries)


def test_calibrated_vllm_steps_are_priced_apart_from_transformers_steps():
    plain = StageSpec(kind="rl", steps=1, lora_rank=4, batch_size=8, max_completion_length=12)
    fast = plain.model_copy(update={"vllm": VLLMSpec()})
    both = _table(False, True)
    assert both.step_seconds(fast) < both.step_seconds(plain)
    only_plain = _table(False)  # no vLLM entry: priced as transformers (never an overrun)
    assert only_plain.step_seconds(fast) == only_plain.step_seconds(plain)
    only_vllm = _table(True)  # a transformers stage never takes a vLLM price
    assert only_vllm.step_seconds(plain) == CostModel(
        shape=ModelShape.builtin("tiny"), device="cuda").step_seconds(plain)


# --- refused on this machine, before anything is written ---------------------------------------
def test_search_and_validate_refuse_vllm_here_before_writing(tmp_path):
    path = space_file(tmp_path)
    with pytest.raises(UserError) as validated:
        check_space(path)
    message = str(validated.value)
    assert str(path) in message and "`rl.vllm`" in message
    assert "no CUDA GPU" in message and "stagebudget[vllm]" in message
    assert vllmcheck.supported_vllm() in message and "\n" not in message
    runs = tmp_path / "runs"
    with pytest.raises(UserError) as searched:
        run_search(path, runs_dir=runs, live=False, trial_fn=fake_fn)
    assert str(searched.value) == message
    assert not runs.exists()


def test_train_refuses_a_vllm_schedule_here_before_writing(tmp_path, capsys):
    sched = tmp_path / "s.yaml"
    Schedule(stages=(StageSpec(kind="rl", steps=2, vllm=VLLMSpec()),)).save(sched)
    out = tmp_path / "trained"
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(sched), "-o", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 2 and not out.exists()
    assert f"{sched}: field `rl.vllm`" in err and "no CUDA GPU" in err


def test_calibrate_refuses_a_vllm_space_here(tmp_path):
    from stagebudget.training.calibrate import calibrate_space

    out = tmp_path / "cost.json"
    with pytest.raises(UserError, match=r"`rl\.vllm`"):
        calibrate_space(space_file(tmp_path), out=out)
    assert not out.exists()


def test_the_stage_itself_refuses_when_run_through_the_api(monkeypatch):
    """A trial on a cluster node is not checked by the driver: its stage checks at start."""
    from stagebudget.training.stages.rl import run_rl

    class Ctx:
        spec = StageSpec(kind="rl", steps=1, vllm=VLLMSpec())

    with pytest.raises(UserError, match="no CUDA GPU"):
        run_rl(Ctx())  # type: ignore[arg-type]


def test_what_vllm_needs_is_checked_piece_by_piece(monkeypatch):
    import importlib.metadata
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.40.0")
    assert vllmcheck.vllm_problem() == "vllm 0.40.0 is installed, but TRL supports >=0.22.0,<=0.31.0"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.30.1")
    assert vllmcheck.vllm_problem() is None
    vllmcheck.check_vllm([("rl", StageSpec(kind="rl", steps=1, vllm=VLLMSpec()))], "s.yaml")
