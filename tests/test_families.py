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


@pytest.fixture(scope="module")
def one_ray():
    """One local Ray for the module's searches: a search that finds Ray started keeps it, so the
    twelve searches pay Ray's start once."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_searches_exports_and_reproduces(family: str, tmp_path: Path,
                                                      one_ray: None) -> None:
    """The whole path a user takes with their own model, in every family: validate -> a search
    (one SFT -> RL trial, LoRA on all linear layers, both stages trained) -> export -> ``train``
    -> the exported ``best.py``; the three measure the same ID/OOD. (Qwen3-MoE's trials all
    failed, and ``best.py`` failed on every chat-format task.)"""
    import math
    import os
    import subprocess
    import sys

    from stagebudget import cli
    from stagebudget.rundir import RunDir
    from stagebudget.searching.driver import run_search

    space = _user_folder(family, tmp_path)
    data = yaml.safe_load(space.read_text())
    data.update(trials=1, budget={"per_trial_hours": 0.001})
    space.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit) as done:
        cli.main(["validate", str(space)])
    assert done.value.code == 0
    run_dir = run_search(space, runs_dir=tmp_path / "runs", live=False)
    (record,) = RunDir(run_dir).records()
    assert record.status == "COMPLETE", record.error
    metrics = json.loads((run_dir / "trials" / record.key / "metrics.json").read_text())
    assert [s["kind"] for s in metrics["stages"]] == ["sft", "rl"]
    assert all(s["steps_done"] > 0 and s["peft"] for s in metrics["stages"]), metrics["stages"]
    exported = tmp_path / "best.yaml"
    with pytest.raises(SystemExit) as done:
        cli.main(["export", str(run_dir), "--pick", "max-id", "-o", str(exported)])
    assert done.value.code == 0
    searched = yaml.safe_load(exported.read_text())["objectives"]  # the trial's, as recorded
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # ``train`` and the plain script side by side, one core each
    ours = subprocess.Popen([sys.executable, "-m", "stagebudget.cli", "train", str(exported),
                             "-o", str(tmp_path / "ours"), "--no-save"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    plain = subprocess.Popen([sys.executable, str(exported.with_suffix(".py")), "--out",
                              str(tmp_path / "plain")], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for proc in (ours, plain):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    trained = json.loads((tmp_path / "ours" / "metrics.json").read_text())["objectives"]
    script = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    for key in ("id_accuracy", "ood_accuracy"):
        assert math.isfinite(searched[key]), key
        assert trained[key] == searched[key] == script[key], key
