"""Print the embedded default's landscape: base, SFT-only at several lengths, RL-only, SFT then RL.

Run: ``python experiments/landscape_probe.py [--seeds 0 1] [--arms sft rl sft_rl] [--out DIR]``.

Each arm is one schedule trained with the real pipeline (TRL + PEFT) on the built-in suite at
the demo's settings (search_spaces/demo.yaml: its test sizes and stage settings), evaluated on
the held-out ID and OOD sets at every evaluation point. Every accuracy is printed with its
standard error. For RL stages it also prints the mean reward of the first and last quarter of
the stage (the whole reward, and its task-score part alone: exact match without the format
term and partial credit) and the share of GRPO groups whose completions all got the same
reward (TRL's ``frac_reward_zero_std``): those groups give GRPO no signal. A JSON summary is written to
``OUT/landscape.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def demo_settings() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Task sizes, SFT settings and RL settings of the demo space (fixed values only)."""
    import yaml

    space = yaml.safe_load(DEMO.read_text())
    fixed = {kind: {k: v for k, v in dims.items() if not isinstance(v, dict) and k != "share"}
             for kind, dims in space["stages"].items()}
    tasks = {k: v for k, v in space["tasks"].items() if k.startswith("n_")}
    return tasks, fixed["sft"], fixed["rl"]


# searched dimensions of the demo, at one value each
SFT = {"lora_rank": int(os.environ.get("SFT_RANK", 16)), "batch_size": int(os.environ.get("SFT_BATCH", 32)),
       "learning_rate": float(os.environ.get("SFT_LR", 1e-3))}
RL = {"lora_rank": int(os.environ.get("RL_RANK", 4)),
      "learning_rate": float(os.environ.get("RL_LR", 1e-3)),
      **json.loads(os.environ.get("RL_EXTRA", "{}"))}

ARMS: dict[str, list[tuple[str, int, dict[str, Any]]]] = {
    # name -> stages as (kind, steps, overrides); lengths chosen to span the demo's budget
    "sft": [("sft", int(os.environ.get("SFT_STEPS", 400)), {"eval_interval": 50, **SFT})],
    "rl": [("rl", 120, {"eval_interval": 30, **RL})],
    "sft_rl": [("sft", 60, {"eval_interval": 30, **SFT}), ("rl", 100, {"eval_interval": 25, **RL})],
    "sft_long_rl": [("sft", 200, {"eval_interval": 50, **SFT}),
                    ("rl", 100, {"eval_interval": 25, **RL})],
}


def run_arm(name: str, seed: int, out: Path, sft: dict[str, Any], rl: dict[str, Any],
            tasks: dict[str, Any]) -> dict[str, Any]:
    """Train one arm with ``seed`` and return its curve rows and RL statistics."""
    from stagebudget.schedule import Schedule, StageSpec, TasksRef
    from stagebudget.training.pipeline import run_schedule

    stages = []
    for kind, steps, overrides in ARMS[name]:
        settings = {**(sft if kind == "sft" else rl), **overrides}
        stages.append(StageSpec(kind=kind, steps=steps, **settings))
    schedule = Schedule(stages=tuple(stages), seed=seed, tasks=TasksRef(**tasks),
                        name=f"{name}-s{seed}")
    start = time.perf_counter()
    result = run_schedule(schedule, out / f"{name}-s{seed}", device="cpu")
    wall = time.perf_counter() - start
    stats = [{k: s.get(k) for k in ("kind", "steps_done", "seconds_per_step", "reward_first",
                                     "reward_last", "reward_gain", "reward_gain_matched",
                                     "score_first", "score_last", "score_gain",
                                     "score_gain_matched", "zero_std_share")}
             for s in result.metrics["stages"]]
    return {"arm": name, "seed": seed, "schedule": schedule.describe(), "curve": result.curves,
            "stages": stats, "wall_seconds": round(wall, 1),
            "eval_seconds": round(result.metrics["eval_seconds"], 1)}


def _fmt(row: dict[str, Any]) -> str:
    return (f"{row['stage']:>3} step {row['step']:>4}: ID {row['id_accuracy']:.3f} "
            f"± {row.get('id_accuracy_se', 0):.3f}  OOD {row['ood_accuracy']:.3f} "
            f"± {row.get('ood_accuracy_se', 0):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path("runs/landscape"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    tasks, sft, rl = demo_settings()
    results = []
    for seed in args.seeds:
        for arm in args.arms:
            res = run_arm(arm, seed, args.out, sft, rl, tasks)
            results.append(res)
            print(f"\n== {res['schedule']} seed {seed}: {res['wall_seconds']} s wall, "
                  f"{res['eval_seconds']} s evaluating", flush=True)
            for row in res["curve"]:
                print("   " + _fmt(row), flush=True)
            for st in res["stages"]:
                print("   ", {k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in st.items() if v is not None}, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "landscape.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
