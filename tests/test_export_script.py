"""Exports that run where they are taken: the exported TRL configs construct on this (CPU)
machine, and the exported stand-alone script (plain TRL + PEFT) trains a tiny schedule to the
same ID/OOD, and the same weights, as ``stagebudget train`` with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stagebudget.results.export import stage_export
from stagebudget.results.exportscript import render_script
from stagebudget.schedule import Schedule, StageSpec, TasksRef

SCHEDULE = Schedule(
    base_model="builtin:test", seed=3,
    tasks=TasksRef(n_train=64, n_id_test=16, n_ood_test=16),
    stages=(
        # raw sequences: the exported script builds the same cpt corpus as the trial
        StageSpec(kind="cpt", steps=2, lora_rank=0, batch_size=8, eval_interval=5, corpus="raw"),
        StageSpec(kind="sft", steps=4, lora_rank=4, batch_size=8, eval_interval=2,
                  learning_rate=1e-2),
        StageSpec(kind="rl", steps=3, lora_rank=2, batch_size=2, num_generations=4,
                  max_completion_length=8, eval_interval=2, learning_rate=1e-2),
    ),
)


def _document(schedule: Schedule, device: str = "cpu") -> dict:
    return {"schedule": schedule.to_dict(), "device": device, "source": {},
            "trl": [stage_export(s, i, schedule.seed, device) for i, s in enumerate(schedule.stages)]}


@pytest.mark.slow
def test_exported_configs_construct_on_cpu(tmp_path: Path) -> None:
    import trl

    for stage in _document(SCHEDULE)["trl"]:
        cls = getattr(trl, stage["config"].removeprefix("trl."))
        config = cls(output_dir=str(tmp_path), **stage["args"])
        assert config.bf16 is False and config.eval_strategy.value == "no"
        assert config.max_steps == SCHEDULE.stages[stage["index"]].steps


def test_cuda_exports_ask_for_bf16() -> None:
    (stage, *_) = _document(SCHEDULE, device="cuda")["trl"]
    assert stage["args"]["bf16"] is True and stage["args"]["use_cpu"] is False


def _env(tiny_base: Path) -> dict[str, str]:
    # One torch thread in both processes: float sums are then ordered the same.
    return {**os.environ, "STAGEBUDGET_CACHE": str(tiny_base.parent), "OMP_NUM_THREADS": "1"}


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_exported_script_trains_like_stagebudget_train(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    schedule_file = tmp_path / "best.yaml"
    SCHEDULE.save(schedule_file)
    script = tmp_path / "best.py"
    script.write_text(render_script(_document(SCHEDULE)))
    env = _env(tiny_base)
    ours = subprocess.run([sys.executable, "-m", "stagebudget.cli", "train", str(schedule_file),
                           "-o", str(tmp_path / "ours"), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-3000:]
    plain = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "plain"),
                            "--save-model"], env=env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    for out in (ours, plain):  # TRL's arguments under the names this transformers takes
        assert "`gradient_checkpointing` is deprecated" not in out.stderr
    expected = json.loads((tmp_path / "ours" / "metrics.json").read_text())["objectives"]
    got = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert got["id_accuracy"] == expected["id_accuracy"]
    assert got["ood_accuracy"] == expected["ood_accuracy"]
    a, b = _weights(tmp_path / "ours" / "model"), _weights(tmp_path / "plain" / "model")
    assert a.keys() == b.keys()
    base = _weights(tiny_base)
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base)  # it trained
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model"


@pytest.mark.slow
def test_exported_script_trains_like_stagebudget_train_on_a_chat_task(tmp_path: Path) -> None:
    """A user's own chat model and chat-message task file (``<answer>`` extraction, a scorer
    file, its own generation length): the script's rows, decoding and scoring are the trials'
    own, so it measures what ``stagebudget train`` measures. It raised a TypeError in TRL on
    every chat task when it built its own ``{"prompt": messages, "completion": str}`` rows."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("own_make_model", EXAMPLE / "make_model.py")
    make_model = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(make_model)  # type: ignore[union-attr]
    for name in ("tasks.jsonl", "my_scorer.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    make_model.build_model(tmp_path / "model", tmp_path / "tasks.jsonl")
    schedule = Schedule(
        base_model=str(tmp_path / "model"), seed=1,
        tasks=TasksRef(source=str(tmp_path / "tasks.jsonl"),
                       scorer=f"{tmp_path / 'my_scorer.py'}:base_match", answer="answer_tag",
                       format_reward=0.1, max_new_tokens=24),
        stages=(StageSpec(kind="sft", steps=6, lora_rank=4, batch_size=8, eval_interval=3,
                          learning_rate=1e-2),
                StageSpec(kind="rl", steps=2, lora_rank=2, batch_size=2, num_generations=4,
                          max_completion_length=12, eval_interval=2, learning_rate=1e-2)))
    schedule_file = tmp_path / "best.yaml"
    schedule.save(schedule_file)
    script = tmp_path / "best.py"
    script.write_text(render_script(_document(schedule)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ours = subprocess.run([sys.executable, "-m", "stagebudget.cli", "train", str(schedule_file),
                           "-o", str(tmp_path / "ours"), "--device", "cpu", "--no-save"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-3000:]
    plain = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "plain")],
                           env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    expected = json.loads((tmp_path / "ours" / "metrics.json").read_text())["objectives"]
    got = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    for key in ("id_accuracy", "ood_accuracy", "id_accuracy_se", "ood_accuracy_se"):
        assert got[key] == expected[key], key
