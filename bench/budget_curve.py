"""What a smaller budget buys, on the replay table: every row of `bench/data/paper_grid.jsonl` is
a trained trial with its curves, so its evaluated checkpoints are candidates exactly as in a
run (stagebudget.results.budgetcurve). Prints, per training seed, the hypervolume of the
checkpoint front at each eighth of the per-trial budget (± delta-method SE), the trials' own
front, and the smallest fraction that keeps 95% of the full budget's hypervolume.

    .venv/bin/python bench/budget_curve.py [--table bench/data/paper_grid.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from stagebudget.names import COMPLETE
from stagebudget.pareto import compute_front
from stagebudget.results.budgetcurve import (
    CURVE_DIRECTIONS,
    CURVE_OBJECTIVES,
    CURVE_REF,
    DEFAULT_FRACTIONS,
    KEEP,
    budget_point,
    checkpoint_candidates,
    fraction_text,
)
from stagebudget.schedule import Schedule

TABLE = Path(__file__).resolve().parent / "data" / "paper_grid.jsonl"


def views_of(rows: list[dict]) -> list[SimpleNamespace]:
    """Table rows as the trial views checkpoint_candidates reads."""
    return [SimpleNamespace(state=COMPLETE, number=i, schedule=Schedule.from_dict(r["schedule"]),
                            curves=lambda r=r: r["curves"], label_fields=frozenset())
            for i, r in enumerate(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=TABLE)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        budget = float(mine[0]["schedule"]["budget_hours"])
        candidates = checkpoint_candidates(views_of(mine))
        ends = [c.point() for c in candidates if c.final]
        trials_hv = compute_front(ends, CURVE_OBJECTIVES, CURVE_DIRECTIONS, CURVE_REF).hypervolume
        points = [budget_point(candidates, f, budget, 0.0, 0.0) for f in DEFAULT_FRACTIONS]
        full = points[-1].hypervolume
        keep = min((p.fraction for p in points if p.hypervolume >= KEEP * full - 1e-12),
                   default=None)
        print(f"seed {seed}: {len(mine)} trials, {len(candidates)} checkpoints; the trials' own "
              f"front: hypervolume {trials_hv:.4f}")
        for p in points:
            print(f"  {fraction_text(p.fraction):>4} of the budget: {p.fitting:3d} fit, "
                  f"{len(p.front.front):2d} on the front, hypervolume {p.hypervolume:.4f} "
                  f"± {p.hypervolume_se:.4f}")
        print(f"  {KEEP:.0%} of the full budget's hypervolume from "
              f"{fraction_text(keep) if keep is not None else '-'} of it")


if __name__ == "__main__":
    main()
