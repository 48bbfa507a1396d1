"""Probe the stages on the embedded default: base, SFT short/long, RL after each, costs.

Run: ``python experiments/stage_probe.py [--out runs/probe] [--threads 1]``. Prints one JSON
summary (also written to ``OUT/summary.json``): base ID/OOD accuracy; ID/OOD after SFT for a
short and a long budget; after RL following each; seconds per step of every stage; RL mean reward
first vs last; calibrated vs analytic cost per step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

SFT = {"lora_rank": 16, "learning_rate": 5e-4, "batch_size": 32, "eval_interval": 50}
RL = {"lora_rank": 4, "learning_rate": 1e-3, "batch_size": 16, "num_generations": 8,
      "max_completion_length": 12, "beta": 0.0, "temperature": 1.0, "eval_interval": 25}


def _stage_summary(result: Any) -> list[dict[str, Any]]:
    keep = ("kind", "steps_done", "seconds_per_step", "planned_seconds", "measured_seconds",
            "train_loss_first", "train_loss", "reward_first", "reward_last", "mean_reward")
    return [{k: s.get(k) for k in keep if s.get(k) is not None} for s in result.metrics["stages"]]


def run_arm(name: str, base: str, sft_steps: int, rl_steps: int, out: Path,
            cost: Any) -> dict[str, Any]:
    """Train sft -> rl and return the accuracies at the end of each stage."""
    from stagebudget.pipeline import run_schedule
    from stagebudget.schedule import Schedule, StageSpec

    schedule = Schedule(base_model=base, stages=(StageSpec(kind="sft", steps=sft_steps, **SFT),
                                StageSpec(kind="rl", steps=rl_steps, **RL)), name=name)
    start = time.perf_counter()
    result = run_schedule(schedule, out / name, device="cpu", cost=cost)
    rows = result.curves
    end_of = {r["stage"]: r for r in rows}  # last row of each stage
    return {
        "schedule": schedule.describe(),
        "base": {k: rows[0][k] for k in ("id_accuracy", "ood_accuracy")},
        "after_sft": {k: end_of["sft"][k] for k in ("id_accuracy", "ood_accuracy")},
        "after_rl": {k: end_of["rl"][k] for k in ("id_accuracy", "ood_accuracy")},
        "sft_curve": [(r["step"], r["id_accuracy"], r["ood_accuracy"])
                      for r in rows if r["stage"] == "sft"],
        "rl_curve": [(r["step"], r["id_accuracy"], r["ood_accuracy"], r["reward"])
                     for r in rows if r["stage"] == "rl"],
        "stages": _stage_summary(result),
        "wall_seconds": time.perf_counter() - start,
    }


def cost_comparison(base: str, out: Path) -> list[dict[str, Any]]:
    """Calibrated vs analytic seconds per step for the probe's own stage settings."""
    from stagebudget.calibrate import calibrate
    from stagebudget.cost import CostModel, ModelShape
    from stagebudget.schedule import StageSpec

    start = time.perf_counter()
    calibrated = calibrate(base, device="cpu", ranks=(0, 4, 16, 64), steps=3,
                           out=out / "costtable.json")
    took = time.perf_counter() - start
    analytic = CostModel.analytic(ModelShape.builtin("tiny"))
    rows = []
    for entry in calibrated.table:
        extra = ({"num_generations": 8, "max_completion_length": 12, "batch_size": 16}
                 if entry["kind"] == "rl" else {"batch_size": 32})
        spec = StageSpec(kind=entry["kind"], steps=1, lora_rank=entry["rank"], **extra)
        rows.append({"kind": entry["kind"], "rank": entry["rank"],
                     "calibrated_s": round(entry["seconds_per_step"], 4),
                     "analytic_s": round(analytic.step_seconds(spec), 4)})
    return [{"calibrate_seconds": round(took, 1)}, *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/stage_probe"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base", default="builtin:tiny",
                        help="base model: builtin:tiny or a local model directory")
    parser.add_argument("--short", type=int, default=40)
    parser.add_argument("--long", type=int, default=300)
    parser.add_argument("--rl", type=int, default=50)
    parser.add_argument("--skip-calibrate", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from stagebudget.cost import CostModel, ModelShape

    cost = CostModel.analytic(ModelShape.builtin("tiny"))
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"threads": args.threads, "base": args.base}
    for name, steps in (("short", args.short), ("long", args.long)):
        summary[name] = run_arm(name, args.base, steps, args.rl, args.out, cost)
        print(json.dumps({name: summary[name]}), flush=True)
    if not args.skip_calibrate:
        summary["cost_per_step"] = cost_comparison(args.base, args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
