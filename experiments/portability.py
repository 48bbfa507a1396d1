"""Is the default's landscape the same on every CPU? The demo from the shipped base under each
kernel set torch can choose, then the landscape criteria the default was designed for.

    python experiments/portability.py [--caps default avx2 avx512] [--runs-dir runs/portability]
    python experiments/portability.py --only-report RUN [RUN ...]

Each capability runs ``stagebudget search search_spaces/demo.yaml`` in its own process with
``ATEN_CPU_CAPABILITY`` set and its own empty prefix cache (a cache entry is keyed by the CPU
capability anyway). Per run it prints: the trials' ID and OOD span, the front's size, whether
the front's extremes (highest ID, highest OOD) are more than 3 standard errors apart in both
objectives, and the hypervolume against (0, 0). The criteria: ID span >= .15, OOD span >= .25,
a front of >= 4 distinct schedules with extremes > 3 SE apart; hypervolumes within .03.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def landscape(run_dir: Path) -> dict[str, Any]:
    """The landscape criteria of one finished demo run, from its study and records."""
    from stagebudget.results.run import load_run

    run = load_run(run_dir)
    front = run.front(ref_point=(0.0, 0.0), curves=False)
    points = front.points
    ids = [p.values[0] for p in points.values()]
    oods = [p.values[1] for p in points.values()]
    schedules = {json.dumps({k: v for k, v in (points[n].schedule or {}).items() if k != "name"},
                            sort_keys=True) for n in front.front}  # a twin counts once
    hi_id = max(front.front, key=lambda n: points[n].values[0])
    hi_ood = max(front.front, key=lambda n: points[n].values[1])

    def apart(k: int, name: str) -> float:
        a, b = points[hi_id], points[hi_ood]
        se = math.hypot(a.errors.get(name, 0.0), b.errors.get(name, 0.0)) or float("nan")
        return abs(a.values[k] - b.values[k]) / se

    out = {"run": str(run_dir), "trials": len(points), "id_span": max(ids) - min(ids),
           "ood_span": max(oods) - min(oods), "front": len(schedules),
           "extremes_id_se": apart(0, "id_accuracy"), "extremes_ood_se": apart(1, "ood_accuracy"),
           "hypervolume": front.hypervolume,
           "max_id": points[hi_id].values, "max_ood": points[hi_ood].values}
    out["criteria_hold"] = (out["id_span"] >= 0.15 and out["ood_span"] >= 0.25
                            and out["front"] >= 4 and out["extremes_id_se"] > 3
                            and out["extremes_ood_se"] > 3)
    return out


def run_demo(cap: str, runs_dir: Path) -> tuple[Path, float]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap,
           "STAGEBUDGET_PREFIX_CACHE": str(runs_dir / f"cache-{cap}")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stagebudget.cli", "search",
                    str(ROOT / "search_spaces" / "demo.yaml"), "--name", f"demo-{cap}",
                    "--runs-dir", str(runs_dir)], env=env, check=True)
    return runs_dir / f"demo-{cap}", time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", nargs="+", default=["default", "avx2", "avx512"])
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/portability"))
    ap.add_argument("--only-report", nargs="+", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    if args.only_report:
        rows = [landscape(p) for p in args.only_report]
    else:
        args.runs_dir.mkdir(parents=True, exist_ok=True)
        for cap in args.caps:
            run_dir, seconds = run_demo(cap, args.runs_dir)
            rows.append({"cap": cap, "wall_s": round(seconds), **landscape(run_dir)})
    print("| run | trials | ID span | OOD span | front | extremes apart (ID, OOD; SE) | HV | criteria |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.get('cap', r['run'])} | {r['trials']} | {r['id_span']:.3f} | {r['ood_span']:.3f} "
              f"| {r['front']} | {r['extremes_id_se']:.1f}, {r['extremes_ood_se']:.1f} "
              f"| {r['hypervolume']:.4f} | {'hold' if r['criteria_hold'] else 'FAIL'} |")
    hvs = [r["hypervolume"] for r in rows]
    print(f"hypervolume range: {max(hvs) - min(hvs):.4f} (criterion <= .03)")
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
