"""Every common architecture family through stagebudget's evaluation: the fast greedy decoder
(key/value cache, rows leaving the batch as they stop) gives ``model.generate``'s tokens on MoE
routing, sliding-window and hybrid caches alike (a Qwen3-MoE model failed in its load-balancing
loss at the first evaluation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from families import EOS, FAMILIES, PAD, TOKENS, build_family_model, tiny_model
from stagebudget.training.evaluate import _decode_batch

# Prompts longer than the sliding window (4), of several lengths (left padding), and a stop
# token that some rows reach early (they leave the batch) while others run to the limit.
ROWS = [[5, 9, 14, 3, 22, 8, 40, 11], [7, 30], [12, 12, 60, 4, 19], [33, 42, 17, 9, 5, 71]]
NEW = 10


def _generate(model, rows, stops):
    import torch

    want = []
    for row in rows:  # one row at a time: no padding, the reference decoding
        out = model.generate(torch.tensor([row]), max_new_tokens=NEW, do_sample=False,
                             attention_mask=torch.ones(1, len(row), dtype=torch.long),
                             eos_token_id=stops, pad_token_id=PAD)
        new = out[0, len(row):].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
        want.append(new[:cut])
    return want


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_greedy_decoder_matches_generate_in_every_family(family: str) -> None:
    import torch

    model = tiny_model(family)
    with torch.inference_mode():
        free = _generate(model, ROWS, [EOS])
        # stop on a token the model emits mid-way, so that rows leave the batch at different steps
        stops = [EOS, free[0][min(2, len(free[0]) - 1)]]
        want = _generate(model, ROWS, stops)
        got = _decode_batch(model, ROWS, NEW, PAD, stops)
    assert got == want


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model"
SIZES = {"train": 48, "id_test": 16, "ood_test": 16}


def _user_folder(family: str, folder: Path) -> Path:
    """A user's folder for ``family``: its tiny model, a task file (chat messages, or plain
    text prompts for a family without a chat template) cut from the own-model example, the
    example's scorer and a space that searches SFT then RL with LoRA on all linear layers."""
    rows, seen = [], dict.fromkeys(SIZES, 0)
    for line in (EXAMPLE / "tasks.jsonl").read_text().splitlines():
        row = json.loads(line)
        if seen[row["split"]] < SIZES[row["split"]]:
            seen[row["split"]] += 1
            if TOKENS[family][1] is None:  # no chat template: the user writes text prompts
                row["prompt"] = "\n".join(m["content"] for m in row["prompt"]) + "\n"
            rows.append(row)
    (folder / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(EXAMPLE / "my_scorer.py", folder / "my_scorer.py")
    texts = [r["completion"] for r in rows]
    for r in rows:
        texts += [m["content"] for m in r["prompt"]] if isinstance(r["prompt"], list) else [r["prompt"]]
    build_family_model(family, folder / "model", texts)
    space = yaml.safe_load((EXAMPLE / "space.yaml").read_text())
    space.update(name=f"family-{family}", trials=2, budget={"per_trial_hours": 0.01})
    space["tasks"]["max_new_tokens"] = 12
    space["stages"]["sft"].update(lora_rank=4, batch_size=8, eval_interval=4, max_length=None,
                                  share={"type": "float", "low": 0.4, "high": 0.6})
    space["stages"]["rl"].update(lora_rank=2, batch_size=2, num_generations=4,
                                 max_completion_length=12, eval_interval=4)
    space["stages"] = {k: {f: v for f, v in d.items() if v is not None}
                       for k, d in space["stages"].items()}
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    return folder / "space.yaml"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_validates_and_trains_sft_then_rl_with_lora(family: str,
                                                                  tmp_path: Path) -> None:
    """validate, then one trial's schedule (SFT then RL, LoRA on all linear layers) trained and
    measured by the pipeline a search runs; both stages train and ID/OOD are measured."""
    import math

    from stagebudget.searching.preflight import check_space
    from stagebudget.training.pipeline import run_schedule

    space = check_space(_user_folder(family, tmp_path))
    cost = space.cost_model()
    schedule = space.schedule_from_params({"sft.share": 0.5, "rl.lora_rank": 4}, cost)
    assert [s.kind for s in schedule.stages] == ["sft", "rl"]
    steps = [s.model_copy(update={"steps": n}) for s, n in zip(schedule.stages, (4, 2), strict=True)]
    result = run_schedule(schedule.model_copy(update={"stages": tuple(steps)}), tmp_path / "trial",
                          device="cpu", cost=cost, base_dir=tmp_path)
    assert [s["steps_done"] for s in result.metrics["stages"]] == [4, 2]
    for key in ("id_accuracy", "ood_accuracy", "id_accuracy_se"):
        assert math.isfinite(result.objectives()[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe"])
def test_a_family_searches_exports_and_reproduces(family: str, tmp_path: Path) -> None:
    """The whole path a user takes with their own model (the family whose trials all failed):
    validate -> a 2-trial search -> export -> ``train`` -> the exported ``best.py``; the three
    measure the same ID/OOD."""
    import os
    import subprocess
    import sys

    from stagebudget import cli
    from stagebudget.rundir import RunDir
    from stagebudget.searching.driver import run_search

    space = _user_folder(family, tmp_path)
    data = yaml.safe_load(space.read_text())
    data["budget"]["per_trial_hours"] = 0.003
    space.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit) as done:
        cli.main(["validate", str(space)])
    assert done.value.code == 0
    run_dir = run_search(space, runs_dir=tmp_path / "runs", live=False)
    records = RunDir(run_dir).records()
    assert len(records) == 2 and all(r.status == "COMPLETE" for r in records), \
        [r.error for r in records]
    exported = tmp_path / "best.yaml"
    with pytest.raises(SystemExit) as done:
        cli.main(["export", str(run_dir), "--pick", "max-id", "-o", str(exported)])
    assert done.value.code == 0
    searched = yaml.safe_load(exported.read_text())["objectives"]  # the picked trial's
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ours = subprocess.run([sys.executable, "-m", "stagebudget.cli", "train", str(exported),
                           "-o", str(tmp_path / "ours"), "--no-save"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-3000:]
    plain = subprocess.run([sys.executable, str(exported.with_suffix(".py")), "--out",
                            str(tmp_path / "plain")], env=env, capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    trained = json.loads((tmp_path / "ours" / "metrics.json").read_text())["objectives"]
    script = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    for key in ("id_accuracy", "ood_accuracy"):
        assert trained[key] == searched[key] == script[key], key
