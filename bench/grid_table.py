"""Make a replay table: every schedule of a grid space, really trained, for several seeds.

    python bench/grid_table.py [--space search_spaces/paper_grid.yaml] [--seeds 0 1]
                               [--out bench/data/paper_grid.jsonl] [--threads 1]

Plans every point of the space's grid (each dimension's grid values: choices, or a float range
with a step), trains each schedule once per seed with :func:`stagebudget.pipeline.run_schedule`
and appends one JSON line per (schedule, seed): the schedule, seed, ID/OOD with standard
errors, nominal device-hours (the schedule trained alone), spent device-hours (what was
trained with stage-prefix reuse) and the trial's curve rows. Schedules are trained in an order
that lets each reuse its predecessor's prefix (by SFT settings, then ascending SFT steps). Rows
already in ``--out`` are kept and skipped, so an interrupted build continues.
``stagebudget.replay`` reads the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any


def grid_points(space: Any) -> list[dict[str, Any]]:
    """Every combination of the space's grid values."""
    grid = space.grid_space()
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]


def _order(schedule: Any) -> tuple[Any, ...]:
    """Sort key: schedules sharing earlier stages next to each other, shorter first."""
    return tuple((s.kind, s.lora_rank, s.learning_rate, s.steps) for s in schedule.stages)


def spend_by_share(rows: list[dict[str, Any]]) -> list[tuple[float, int, float, float]]:
    """Per SFT share: rows, mean measured training seconds of a schedule trained alone
    (nominal) and mean planned seconds. A compute-matched grid spends alike at every share."""
    from stagebudget.searching.replay import NOMINAL

    by: dict[float, list[dict[str, Any]]] = {}
    for row in rows:
        by.setdefault(float(row["params"].get("sft.share", 0.0)), []).append(row)
    out = []
    for share, group in sorted(by.items()):
        measured = sum(r[NOMINAL] for r in group) / len(group) * 3600
        planned = [r["planned_hours"] * 3600 for r in group if r.get("planned_hours")]
        out.append((share, len(group), measured,
                    sum(planned) / len(planned) if planned else float("nan")))
    return out


def print_spend(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    table = spend_by_share(rows)
    print("| SFT share | rows | measured training s | planned s |")
    print("| --- | --- | --- | --- |")
    for share, n, measured, planned in table:
        print(f"| {share:.3f} | {n} | {measured:.1f} | {planned:.1f} |")
    spread = [m for _, _, m, _ in table]
    print(f"measured spread: max/min = {max(spread) / min(spread):.3f}")


def check_spend(space: Any, cost: Any, base_dir: Path, ranks: tuple[int, int]) -> None:
    """Train one schedule per SFT share alone (no prefix cache, seed 0, SFT/RL ranks ``ranks``)
    and print its measured training seconds (stopwatch and CPU time per thread) beside the
    planned ones: whether trials of every share spend their budget alike."""
    import os

    from stagebudget.training.pipeline import run_schedule

    seen = {}
    for params in grid_points(space):
        if (params.get("sft.lora_rank"), params.get("rl.lora_rank")) == ranks:
            seen.setdefault(params["sft.share"], params)
    print("| SFT share | schedule | planned s | stopwatch s | CPU s per thread | stopwatch / planned "
          "| CPU s per step, planned s per step (per stage) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for share, params in sorted(seen.items()):
        schedule = space.schedule_from_params(params, cost)
        load = os.getloadavg()[0]
        result = run_schedule(schedule, base_dir=base_dir, device="cpu", cost=cost)
        planned = cost.schedule_seconds(schedule)
        wall = sum(s["train_seconds"] for s in result.ledger["stages"])
        cpu = sum(s["cpu_seconds"] for s in result.ledger["stages"])
        per_step = ", ".join(
            f"{spec.kind} {stage['cpu_seconds'] / max(1, stage['steps_done']):.3f}/"
            f"{cost.step_seconds(spec):.3f}"
            for spec, stage in zip(schedule.stages, result.ledger["stages"], strict=True))
        print(f"| {share:.3f} | {schedule.describe()} | {planned:.1f} | {wall:.1f} | {cpu:.1f} "
              f"| {wall / planned:.2f} (load {load:.1f}) | {per_step} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=Path("search_spaces/paper_grid.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("bench/data/paper_grid.jsonl"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--cache", type=Path, default=None,
                        help="prefix cache directory (default: beside --out)")
    parser.add_argument("--summary", action="store_true",
                        help="only print the measured training seconds per SFT share of --out")
    parser.add_argument("--check-spend", nargs=2, type=int, metavar=("SFT_RANK", "RL_RANK"),
                        help="train one schedule per SFT share alone and print its spend")
    args = parser.parse_args()
    if args.summary:
        print_spend(args.out)
        return

    import torch

    from stagebudget.names import (
        ID_ACCURACY,
        ID_ACCURACY_SE,
        OOD_ACCURACY,
        OOD_ACCURACY_SE,
        SPENT_DEVICE_HOURS,
    )
    from stagebudget.prefixcache import PrefixCache
    from stagebudget.searching.replay import NOMINAL, replay_key
    from stagebudget.space.schema import SearchSpace
    from stagebudget.training.pipeline import run_schedule

    torch.set_num_threads(args.threads)
    space = SearchSpace.load(args.space)
    cost = space.cost_model("cpu")
    base_dir = args.space.resolve().parent
    if args.check_spend:
        check_spend(space, cost, base_dir, tuple(args.check_spend))
        return
    cache = PrefixCache(args.cache or args.out.with_suffix(".cache"))
    done = set()
    if args.out.is_file():
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            done.add((replay_key(row["schedule"]), row["seed"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    planned = {}
    for params in grid_points(space):
        schedule = space.schedule_from_params(params, cost)
        planned.setdefault(replay_key(schedule.to_dict()), (schedule, params))
    jobs = sorted(planned.values(), key=lambda sp: _order(sp[0]))
    print(f"{len(grid_points(space))} grid points, {len(jobs)} distinct schedules, seeds "
          f"{args.seeds}; {len(done)} rows already in {args.out}", flush=True)
    start = time.perf_counter()
    for seed in args.seeds:
        for schedule, params in jobs:
            trial = schedule.model_copy(update={"seed": seed})
            if (replay_key(trial.to_dict()), seed) in done:
                continue
            result = run_schedule(trial, prefix_cache=cache, base_dir=base_dir, device="cpu",
                                  cost=cost)
            objectives = result.objectives()
            row = {"schedule": trial.to_dict(), "params": params, "seed": seed,
                   ID_ACCURACY: objectives[ID_ACCURACY], OOD_ACCURACY: objectives[OOD_ACCURACY],
                   ID_ACCURACY_SE: objectives.get(ID_ACCURACY_SE),
                   OOD_ACCURACY_SE: objectives.get(OOD_ACCURACY_SE),
                   NOMINAL: result.ledger["device_hours"],
                   # what the cost model planned (load-free): measured / planned per SFT share
                   # says whether the grid is compute-matched
                   "planned_hours": cost.schedule_seconds(trial) / 3600.0,
                   SPENT_DEVICE_HOURS: result.ledger[SPENT_DEVICE_HOURS],
                   "eval_seconds": result.ledger["eval_seconds"],
                   # every measured point, so a replayed trial can be stopped early where it
                   # would have been (stagebudget.replay)
                   "curves": list(result.curves)}
            with args.out.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"seed {seed} {trial.describe():34s} ID {row[ID_ACCURACY]:.3f} "
                  f"OOD {row[OOD_ACCURACY]:.3f}  nominal {row[NOMINAL] * 3600:.1f}s spent "
                  f"{row[SPENT_DEVICE_HOURS] * 3600:.1f}s  ({time.perf_counter() - start:.0f}s)",
                  flush=True)
    print_spend(args.out)


if __name__ == "__main__":
    main()
