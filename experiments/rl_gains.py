"""What the RL stages of a finished search learned: per RL stage, the mean reward of its first and
last quarter, the gain compared within prompts of the same task and answer length, the share of
GRPO groups with identical rewards, the trial's evaluation share of its wall time, and held-out
ID and OOD accuracy (greedy, with standard errors) where the RL stage starts and where it ends:
whether RL after SFT recovers OOD, as it falls.

    python experiments/rl_gains.py runs/demo [runs/demo_seed1 ...]

The summary line averages the RL stages that follow SFT (the issue's target: a rise of at least
.05 on average, on 2 seeds, with under 30% zero-variance groups).
"""

from __future__ import annotations

import argparse
import json
from math import hypot
from pathlib import Path
from statistics import mean


def rl_span(curves: Path, stage_index: int) -> dict[str, tuple[float, float, float]]:
    """ID and OOD at the first and the last evaluation point of one stage, with the change and
    its standard error: ``{"id": (start, end, se_of_change), "ood": ...}``."""
    points = [row for row in map(json.loads, curves.read_text().splitlines())
              if row.get("stage_index") == stage_index]
    first, last = points[0], points[-1]
    return {name: (first[f"{name}_accuracy"], last[f"{name}_accuracy"],
                   hypot(first[f"{name}_accuracy_se"], last[f"{name}_accuracy_se"]))
            for name in ("id", "ood")}


def stage_rows(run: Path) -> list[dict]:
    """One row per RL stage of every finished trial in ``run`` (twins that reused another
    trial's results are left out)."""
    rows = []
    for metrics_file in sorted(run.glob("trials/*/metrics.json")):
        record = metrics_file.parent / "record.json"
        if record.is_file() and json.loads(record.read_text()).get("reused_from"):
            continue  # a twin that reused another trial's measurements: counted once
        metrics = json.loads(metrics_file.read_text())
        ledger = json.loads((metrics_file.parent / "ledger.json").read_text())
        wall = ledger["train_seconds"] + ledger["eval_seconds"] + ledger["setup_seconds"]
        spent = ledger["spent_train_seconds"] + ledger["eval_seconds"] + ledger["setup_seconds"]
        kinds = [s["kind"] for s in metrics["stages"]]
        for index, stage in enumerate(metrics["stages"]):
            if stage["kind"] != "rl" or stage.get("reward_gain") is None:
                continue
            rows.append({"schedule": metrics["schedule"], "after_sft": "sft" in kinds,
                         "steps": stage["steps_done"], "gain": stage["reward_gain"],
                         "matched": stage.get("reward_gain_matched"),
                         "zero_std": stage.get("zero_std_share"),
                         "eval_share": ledger["eval_seconds"] / spent if spent else None,
                         "eval_share_nominal": ledger["eval_seconds"] / wall if wall else None,
                         **rl_span(metrics_file.parent / "curves.jsonl", index)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    for run in args.runs:
        rows = stage_rows(run)
        print(f"{run}: {len(rows)} RL stages")
        for r in rows:
            share = "-" if r["eval_share"] is None else f"{r['eval_share']:.0%}"
            print(f"  {r['schedule']:<32} steps {r['steps']:>4}  gain {r['gain']:+.3f}  "
                  f"matched {r['matched'] if r['matched'] is None else format(r['matched'], '+.3f')}"
                  f"  zero-variance {r['zero_std'] or 0:.1%}  evaluation {share}")
            print("      " + "  ".join(f"{name.upper()} {a:.3f} -> {b:.3f} ({b - a:+.3f} ± {se:.3f})"
                                       for name, (a, b, se) in ((n, r[n]) for n in ("id", "ood"))))
        after = [r for r in rows if r["after_sft"]]
        if after:
            print(f"  after SFT ({len(after)}): gain {mean(r['gain'] for r in after):+.3f} on average"
                  f" (rose in {sum(r['gain'] > 0 for r in after)}), matched "
                  f"{mean(r['matched'] for r in after if r['matched'] is not None):+.3f}, "
                  f"zero-variance at most {max(r['zero_std'] or 0 for r in after):.1%}")
            for name in ("id", "ood"):
                changes = [(r[name][1] - r[name][0], r[name][2]) for r in after]
                print(f"  {name.upper()} during RL after SFT: {mean(c for c, _ in changes):+.3f} on "
                      f"average; up by > 2 SE in {sum(c > 2 * se for c, se in changes)}, down by "
                      f"> 2 SE in {sum(c < -2 * se for c, se in changes)}, of {len(changes)}")


if __name__ == "__main__":
    main()
