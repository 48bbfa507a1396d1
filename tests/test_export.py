"""Export: picks, error messages, the re-runnable schedule and the TRL/PEFT mapping."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fake_run import FakeTrial, make_fake_run
from stagebudget.errors import RunError, UserError
from stagebudget.results.export import export, lora_kwargs, resolve_pick, trl_config_kwargs
from stagebudget.results.run import Run, load_run
from stagebudget.schedule import Schedule, StageSpec
from stagebudget.trlconfig import ALGORITHM, LORA_ALGORITHM


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return load_run(make_fake_run(tmp_path_factory.mktemp("runs") / "fake"))


@pytest.mark.parametrize(("pick", "number"), [
    ("knee", 3), ("max-ood", 4), ("max-id", 8), ("ood-at-id=0.9", 8), ("ood-at-id=0.8", 3),
    ("ood-at-id=0", 4), ("trial=5", 5), ("Trial=10", 10), (" max-id ", 8),
])
def test_picks(run: Run, pick: str, number: int) -> None:
    assert resolve_pick(run.front(curves=False), pick) == number


@pytest.mark.parametrize(("pick", "message"), [
    ("best", "allowed forms: knee, max-ood, max-id, ood-at-id=X"),
    ("ood-at-id=0.95", r"no completed trial reaches ID accuracy >= 0.95; the best ID accuracy "
                       r"is 0.92 \(trial 8\)"),
    ("ood-at-id=high", "not a number"),
    ("trial=6", "trial 6 is FAILED, not complete; completed trials: 0, 1, 2, 3, 4, 5, 8, 9, 10; "
                "the knee is trial 3"),
    ("trial=7", "trial 7 is RUNNING"),
    ("trial=42", "there is no trial 42"),
    ("trial=three", "give an Optuna trial number"),
])
def test_bad_picks_say_why(run: Run, pick: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        export(run, pick, tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_no_completed_trial_is_a_run_error(tmp_path: Path) -> None:
    trials = (FakeTrial(0.5, 8, 4, state="RUNNING"), FakeTrial(0.25, 8, 4, state="FAILED",
                                                               error="boom"))
    run = load_run(make_fake_run(tmp_path / "empty", trials=trials))
    with pytest.raises(RunError, match=r"no completed trial to export yet \(1 running, 1 failed\)"):
        export(run, "knee", tmp_path / "x.yaml")


def test_export_file_reruns_the_schedule(run: Run, tmp_path: Path) -> None:
    out = export(run, "knee", tmp_path / "knee.yaml")
    data = yaml.safe_load(out.read_text())
    view = next(t for t in run.trials() if t.number == 3)
    assert Schedule.load(out) == view.schedule
    assert data["objectives"] == {"id_accuracy": 0.85, "ood_accuracy": 0.5}
    assert data["source"]["trial"] == 3 and data["source"]["run"] == "fake"
    assert data["source"]["on_front"] is True and data["source"]["pick"] == "knee"
    sft, rl = data["trl"]
    assert (sft["stage"], sft["config"], rl["stage"], rl["config"]) == (
        "sft", "trl.SFTConfig", "rl", "trl.GRPOConfig")
    assert sft["args"]["max_steps"] == 40 and sft["peft"]["r"] == 8
    assert rl["args"]["max_steps"] == 20 and rl["peft"] == {
        "r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", **LORA_ALGORITHM}  # the adapter pinned
    # made on (and for) a CPU: fp32, no Trainer eval loop without an eval dataset
    assert data["device"] == "cpu" and sft["args"]["bf16"] is False and sft["args"]["use_cpu"]
    assert "eval_strategy" not in sft["args"] and "eval_strategy" not in rl["args"]
    script = out.with_suffix(".py").read_text()
    compile(script, str(out.with_suffix(".py")), "exec")
    assert "SFTTrainer" in script and "merge_and_unload" in script and "'max_steps': 40" in script


def test_export_into_a_directory_and_duplicate_params_join_in_order(run: Run,
                                                                    tmp_path: Path) -> None:
    first = yaml.safe_load(export(run, "trial=5", tmp_path).read_text())
    second = yaml.safe_load(export(run, "trial=10", tmp_path).read_text())
    assert (tmp_path / "fake-trial5.yaml").is_file() and (tmp_path / "fake-trial10.yaml").is_file()
    assert first["source"]["record"] == "fake_00005"
    assert second["source"]["record"] == "fake_00010"
    assert second["objectives"]["ood_accuracy"] == 0.36


def test_trl_kwargs_sft_and_rl() -> None:
    sft = trl_config_kwargs(StageSpec(kind="sft", steps=40, learning_rate=3e-4, batch_size=8,
                                      max_length=128), seed=1)
    assert sft == {"max_steps": 40, "learning_rate": 3e-4, "per_device_train_batch_size": 8,
                   "gradient_accumulation_steps": 1, "lr_scheduler_type": "constant",
                   "warmup_steps": 0, "logging_steps": 1, "save_strategy": "no",
                   "report_to": "none", "gradient_checkpointing": False,
                   "dataloader_num_workers": 0, "seed": 1, "data_seed": 1,
                   "max_length": 128, "packing": False, "completion_only_loss": True,
                   **ALGORITHM["trl.SFTConfig"]}  # the pinned algorithm (test_trlconfig.py)
    rl = trl_config_kwargs(StageSpec(kind="rl", steps=20, batch_size=4, num_generations=6,
                                     beta=0.01))
    assert rl["per_device_train_batch_size"] == 24  # 4 prompts x 6 completions
    assert (rl["num_generations"], rl["beta"], rl["temperature"], rl["max_completion_length"]) == (
        6, 0.01, 1.0, 12)
    assert "max_length" not in rl and "seed" not in rl
    cpt = trl_config_kwargs(StageSpec(kind="cpt", steps=5))
    assert cpt["completion_only_loss"] is False and cpt["dataset_text_field"] == "text"


def test_lora_kwargs() -> None:
    assert lora_kwargs(StageSpec(kind="sft", steps=1, lora_rank=0)) is None
    assert lora_kwargs(StageSpec(kind="sft", steps=1, lora_rank=32, lora_alpha=16))[
        "lora_alpha"] == 16
    assert lora_kwargs(StageSpec(kind="rl", steps=1, lora_rank=4))["lora_alpha"] == 8


@pytest.mark.slow
def test_kwargs_are_real_trl_and_peft_arguments() -> None:
    import peft
    import trl

    for kind, cls in (("cpt", trl.SFTConfig), ("sft", trl.SFTConfig), ("rl", trl.GRPOConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(trl_config_kwargs(StageSpec(kind=kind, steps=3), seed=0)) <= fields
    config = peft.LoraConfig(**lora_kwargs(StageSpec(kind="sft", steps=1, lora_rank=8)))
    assert config.r == 8 and config.lora_alpha == 16
