"""Finding F4: under a fixed budget, do brief SFT, a larger RL share and an SFT LoRA rank above
the RL rank do best? And how much of the grid does a stagebudget search find at a quarter of it?

The grid is the study's design scaled to the default (``search_spaces/paper_grid.yaml``: the
SFT/RL split in eighths, (0, 8) ... (7, 1), x SFT LoRA rank {4, 16, 64} x RL LoRA rank
{1, 4, 16}: 72 points, 66 distinct schedules since RL-only points ignore the SFT rank), every
point really trained for training seeds 0 and 1 at the same per-trial budget, compute-matched
(``bench/data/paper_grid.jsonl``, made by ``bench/grid_table.py``; ``bench/RESULTS.md``,
"Replay table", has how and where).

1. The grid's front (each schedule at its mean over the two training seeds, and per seed): which
   schedules form it, and the hypervolume (against (0, 0)) of each family of schedules alone and
   its exclusive share (what the front loses without it): RL only, brief SFT (1/8-3/8 of the
   budget) and long SFT (4/8-7/8); SFT rank above the RL rank or not; and the study's recipe,
   brief SFT with SFT rank > RL rank.
2. A stagebudget search (the default sampler, GP) stopped at a quarter of the grid's trials
   (18), each trial replayed from the table (:mod:`stagebudget.searching.replay`: a real
   Optuna + Ray Tune search whose trials draw one of the schedule's two trained seeds), for 10
   search seeds: the share of the grid's hypervolume it found and the share of the grid's
   device-hours it spent.

    python experiments/budget_split/run.py      # a few minutes: it trains nothing

Writes ``results/grid.csv`` (one row per schedule), ``results/families.csv``,
``results/search.csv`` (one row per search seed) and ``results/budget_split.html``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "bench"))
from grid_table import grid_points  # noqa: E402
from search_quality import DIRECTIONS, REF_POINT, run_one, trajectory  # noqa: E402
from shared import print_rows, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
TABLE = ROOT / "bench" / "data" / "paper_grid.jsonl"
SPACE = ROOT / "search_spaces" / "paper_grid.yaml"
SEARCH_SEEDS = range(10)
SAMPLER = "gp"  # the default sampler (search_spaces/demo.yaml)
BRIEF = (0.125, 0.375)  # "brief SFT": 1/8 to 3/8 of the budget


def family(share: float) -> str:
    if share == 0:
        return "rl only"
    return "brief sft" if BRIEF[0] <= share <= BRIEF[1] else "long sft"


def grid_rows() -> list[dict[str, Any]]:
    """One row per distinct schedule: its settings, ID/OOD per training seed and their mean."""
    from stagebudget.searching.replay import load_table, mean_values

    table = load_table(str(TABLE))
    means = mean_values(table)
    out = []
    for key, rows in table.items():
        params = rows[0]["params"]
        share = float(params["sft.share"])
        row: dict[str, Any] = {
            "key": key, "schedule": _describe(rows[0]["schedule"]), "sft_share": share,
            "family": family(share),
            "sft_rank": params["sft.lora_rank"] if share else None,
            "rl_rank": params["rl.lora_rank"],
        }
        row["sft_rank_above_rl"] = bool(share) and row["sft_rank"] > row["rl_rank"]
        for r in rows:
            row[f"id_s{r['seed']}"], row[f"ood_s{r['seed']}"] = r["id_accuracy"], r["ood_accuracy"]
            row[f"se_s{r['seed']}"] = max(r["id_accuracy_se"], r["ood_accuracy_se"])
        row["id"], row["ood"] = means[key]
        out.append(row)
    out.sort(key=lambda r: (r["sft_share"], r["sft_rank"] or 0, r["rl_rank"]))
    return out


def _describe(schedule: dict[str, Any]) -> str:
    from stagebudget.schedule import Schedule

    return Schedule.from_dict(schedule).describe()


VALUES = {"mean": ("id", "ood"), "seed 0": ("id_s0", "ood_s0"), "seed 1": ("id_s1", "ood_s1")}


def hv(rows: list[dict[str, Any]], which: str) -> float:
    from stagebudget.pareto import hypervolume

    i, o = VALUES[which]
    return hypervolume([(r[i], r[o]) for r in rows], REF_POINT, DIRECTIONS) if rows else 0.0


def mark_front(rows: list[dict[str, Any]]) -> None:
    from stagebudget.pareto import knee_point, non_dominated

    for which, (i, o) in VALUES.items():
        points = [(r[i], r[o]) for r in rows]
        front = non_dominated(points, DIRECTIONS)
        knee = front[knee_point([points[k] for k in front], REF_POINT, DIRECTIONS)]
        for k, row in enumerate(rows):
            row[f"front_{which.replace(' ', '')}"] = k in front
            row[f"knee_{which.replace(' ', '')}"] = k == knee


FAMILIES = {
    "rl only": lambda r: r["family"] == "rl only",
    "brief sft (1/8-3/8)": lambda r: r["family"] == "brief sft",
    "long sft (4/8-7/8)": lambda r: r["family"] == "long sft",
    "sft rank > rl rank": lambda r: r["sft_rank_above_rl"],
    "sft rank <= rl rank": lambda r: r["family"] != "rl only" and not r["sft_rank_above_rl"],
    "recipe: brief sft, sft rank > rl rank": lambda r: r["family"] == "brief sft"
    and r["sft_rank_above_rl"],
    "rl rank 1": lambda r: r["rl_rank"] == 1,
    "rl rank 4": lambda r: r["rl_rank"] == 4,
    "rl rank 16": lambda r: r["rl_rank"] == 16,
}


def families(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family and per value set (mean, seed 0, seed 1): schedules, hypervolume alone as a
    share of the grid's, exclusive share (the grid's hypervolume lost without the family), and
    how many front schedules it holds."""
    out = []
    for name, member in FAMILIES.items():
        mine = [r for r in rows if member(r)]
        rest = [r for r in rows if not member(r)]
        row: dict[str, Any] = {"family": name, "schedules": len(mine)}
        for which in VALUES:
            tag = which.replace(" ", "")
            total = hv(rows, which)
            row[f"hv_alone_{tag}"] = hv(mine, which) / total
            row[f"hv_exclusive_{tag}"] = (total - hv(rest, which)) / total
            row[f"front_{tag}"] = sum(r[f"front_{tag}"] for r in mine)
        out.append(row)
    return out


def searches(rows: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """The replayed GP searches at a quarter of the grid's trials: found hypervolume and spend."""
    import ray
    import yaml

    from stagebudget.names import SPENT_DEVICE_HOURS
    from stagebudget.rundir import RunDir
    from stagebudget.searching.replay import NOMINAL, load_table, replay_key
    from stagebudget.space.schema import SearchSpace

    space = yaml.safe_load(SPACE.read_text())
    space["cost_table"] = str((SPACE.parent / space["cost_table"]).resolve())
    grid = SearchSpace.load(SPACE)
    quarter = len(grid_points(grid)) // 4
    table = load_table(str(TABLE))
    truth = {r["key"]: (r["id"], r["ood"]) for r in rows}
    true_hv = hv(rows, "mean")
    nominal = {k: statistics.mean(r[NOMINAL] for r in v) for k, v in table.items()}
    cost = grid_cost(grid, nominal)
    front_keys = {r["key"] for r in rows if r["front_mean"]}
    out = []
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        for seed in SEARCH_SEEDS:
            run = run_one(space, SAMPLER, seed, quarter, TABLE, work)
            curve = trajectory(run, truth, true_hv)
            records = [r for r in RunDir(run).records() if r.schedule]
            keys = {replay_key(r.schedule) for r in records}
            spent = sum(float(r.ledger.get(SPENT_DEVICE_HOURS, 0.0)) for r in records)
            out.append({"search_seed": seed, "trials": len(curve),
                        "hv_found": curve[-1][2], "hv_found_at_9": curve[min(9, len(curve)) - 1][2],
                        "front_schedules_found": len(keys & front_keys),
                        "front_schedules": len(front_keys),
                        "cost_share": spent / cost})
            print(json.dumps(out[-1]), flush=True)
    finally:
        ray.shutdown()
    return out


def grid_cost(grid: Any, nominal: dict[str, float]) -> float:
    """Nominal device-hours of every grid point trained alone (each point at its schedule's mean
    over seeds; RL-only points once per SFT rank, as the study trains them)."""
    from stagebudget.searching.replay import replay_key

    cost_model = grid.cost_model("cpu")
    return sum(nominal[replay_key(grid.schedule_from_params(params, cost_model).to_dict())]
               for params in grid_points(grid))


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    symbols = {"rl only": "star", "brief sft": "circle", "long sft": "square"}
    for fam, symbol in symbols.items():
        for above in (True, False):
            mine = [r for r in rows if r["family"] == fam and (r["sft_rank_above_rl"] == above)]
            if not mine:
                continue
            fig.add_trace(go.Scatter(
                x=[r["id"] for r in mine], y=[r["ood"] for r in mine], mode="markers",
                marker={"symbol": symbol, "size": [13 if r["front_mean"] else 7 for r in mine],
                        "color": "#ef553b" if above else "#636efa",
                        "line": {"width": 1, "color": "black"}},
                error_x={"type": "data", "array": [abs(r["id_s0"] - r["id_s1"]) / 2 for r in mine],
                         "thickness": 0.5},
                error_y={"type": "data",
                         "array": [abs(r["ood_s0"] - r["ood_s1"]) / 2 for r in mine],
                         "thickness": 0.5},
                text=[r["schedule"] for r in mine],
                name=f"{fam}, " + ("sft rank > rl rank" if above else "sft rank <= rl rank")
                if fam != "rl only" else fam))
    fig.update_layout(title="The compute-matched grid: every schedule at its mean over 2 training "
                            "seeds (bars: half the seed difference; large markers: the front)",
                      xaxis_title="ID accuracy", yaxis_title="OOD accuracy", height=600, width=950)
    fig.write_html(path, include_plotlyjs="cdn")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--no-search", action="store_true", help="only analyse the grid")
    args = parser.parse_args(argv)
    rows = grid_rows()
    mark_front(rows)
    fams = families(rows)
    print(f"grid hypervolume (mean over seeds) {hv(rows, 'mean'):.4f}; seed 0 "
          f"{hv(rows, 'seed 0'):.4f}; seed 1 {hv(rows, 'seed 1'):.4f}")
    print_rows([{k: v for k, v in r.items() if k != "key"} for r in rows if r["front_mean"]])
    print_rows(fams)
    tables: dict[str, list[dict[str, Any]]] = {
        "grid": [{k: v for k, v in r.items() if k != "key"} for r in rows], "families": fams}
    if not args.no_search:
        found = searches(rows, args.work)
        tables["search"] = found
        for key in ("hv_found", "cost_share", "front_schedules_found"):
            values = sorted(r[key] for r in found)
            q = statistics.quantiles(values, n=4, method="inclusive")
            print(f"{key}: median {statistics.median(values):.3f} [{q[0]:.3f}-{q[2]:.3f}]")
    results = write_results(HERE, **tables)
    figure(rows, results / "budget_split.html")


if __name__ == "__main__":
    main()
