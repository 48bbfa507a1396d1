"""Which Optuna sampler should the demo space default to? Measure, don't guess.

    python experiments/compare_samplers.py [--samplers tpe random nsga2 gp] [--trials 10]

Runs the demo search once per sampler (same space, same seed, same per-trial budget, the same
reference schedules enqueued first) and prints, per sampler: wall time, completed trials,
distinct schedules tried, front size and hypervolume (reference point (0, 0)). One seed per
sampler: differences of a few hypervolume points are within the noise of 200-prompt test sets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", type=Path, default=Path("search_spaces/demo.yaml"))
    ap.add_argument("--samplers", nargs="+", default=["tpe", "random", "nsga2", "gp"])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/sampler_comparison"))
    args = ap.parse_args()

    from stagebudget.results.run import load_run
    from stagebudget.searching.driver import run_search

    data = yaml.safe_load(args.space.read_text())
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.samplers:
        space_file = args.runs_dir / f"space-{name}.yaml"
        space_file.write_text(yaml.safe_dump({**data, "name": f"demo-{name}",
                                              "sampler": {"name": name, "seed": 0}}))
        start = time.perf_counter()
        run_dir = run_search(space_file, runs_dir=args.runs_dir, trials=args.trials, live=False)
        wall = time.perf_counter() - start
        front = load_run(run_dir).front(curves=False)
        distinct = {json.dumps((p.schedule or {}).get("stages"), sort_keys=True)
                    for p in front.points.values()}
        row = {"sampler": name, "wall_s": round(wall, 1), "completed": len(front.points),
               "distinct": len(distinct), "front": len(front.front),
               "hypervolume": round(front.hypervolume, 4)}
        results.append(row)
        print(json.dumps(row), flush=True)
    (args.runs_dir / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
