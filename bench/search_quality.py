"""Search quality on a replay table: how much of the true front each sampler finds, and when.

    python bench/search_quality.py [--table bench/data/paper_grid.jsonl]
        [--space search_spaces/paper_grid.yaml] [--samplers tpe nsga2 gp random grid]
        [--seeds 20] [--trials 36] [--out bench/out/search_quality] [--write-results]

Every search is a real ``stagebudget search`` (Optuna sampler, Ray Tune, study storage, front)
whose trials are replayed from the table (:mod:`stagebudget.replay`): each lookup draws one of
the schedule's training seeds, as a real search would meet that noise. Quality is measured on
the table's true values (each schedule's ID/OOD averaged over its seeds): the hypervolume of the
schedules a search has tried, as a fraction of the hypervolume of the whole table, after k
trials and against the nominal device-hours spent. ``grid`` is the grid in the study's order.
Prints the median (and quartiles) over search seeds and writes a plotly figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Search quality"
REF_POINT = (0.0, 0.0)
DIRECTIONS = ("maximize", "maximize")


def trajectory(run_dir: Path, truth: dict[str, tuple[float, float]],
               true_hv: float) -> list[tuple[int, float, float]]:
    """(k, nominal device-hours so far, found hypervolume / true) after each of the first k
    trials, in trial-number order, on the table's true values."""
    from stagebudget.pareto import hypervolume
    from stagebudget.records import COMPLETE, RunDir
    from stagebudget.replay import replay_key

    records = [r for r in RunDir(run_dir).records() if r.status == COMPLETE]
    records.sort(key=lambda r: r.started)
    points, out, spent = [], [], 0.0
    for k, record in enumerate(records, 1):
        points.append(truth[replay_key(record.schedule)])
        spent += float(record.objectives.get("device_hours", 0.0))
        found = hypervolume(points, REF_POINT, DIRECTIONS)
        out.append((k, spent, found / true_hv if true_hv > 0 else 1.0))
    return out


def run_one(space: dict[str, Any], sampler: str, seed: int, trials: int, table: Path,
            out: Path) -> Path:
    from stagebudget.replay import replay_trial
    from stagebudget.search import run_search

    name = f"{sampler}-s{seed}"
    path = out / "spaces" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**space, "name": name, "sampler": {"name": sampler,
                                                                       "seed": seed},
                                    "references": False, "concurrency": 1,
                                    "reuse": {"enabled": False}}))
    return run_search(path, runs_dir=out / "runs", trials=trials, live=False,
                      trial_fn=functools.partial(replay_trial, table=str(table.resolve())))


def summarise(curves: dict[str, list[list[tuple[int, float, float]]]], at: list[int]
              ) -> list[str]:
    """Median [quartiles] of the found-hypervolume fraction after each k in ``at``."""
    lines = ["| sampler | " + " | ".join(f"after {k} trials" for k in at) + " |",
             "| --- |" + " --- |" * len(at)]
    for sampler, runs in curves.items():
        cells = []
        for k in at:
            values = sorted(run[min(k, len(run)) - 1][2] for run in runs if run)
            if not values:
                cells.append("–")
                continue
            q = (statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1
                 else [values[0]] * 3)
            cells.append(f"{statistics.median(values):.3f} [{q[0]:.3f}–{q[2]:.3f}]")
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    return lines


def figure(curves: dict[str, list[list[tuple[int, float, float]]]], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("against trials",
                                                        "against nominal device-hours"))
    for sampler, runs in curves.items():
        longest = max((len(r) for r in runs), default=0)
        ks = list(range(1, longest + 1))
        med = [statistics.median(r[min(k, len(r)) - 1][2] for r in runs if r) for k in ks]
        hours = [statistics.median(r[min(k, len(r)) - 1][1] for r in runs if r) for k in ks]
        fig.add_trace(go.Scatter(x=ks, y=med, name=sampler, legendgroup=sampler), 1, 1)
        fig.add_trace(go.Scatter(x=hours, y=med, name=sampler, legendgroup=sampler,
                                 showlegend=False), 1, 2)
    fig.update_yaxes(title_text="found hypervolume / true (median over seeds)", range=[0, 1.02])
    fig.write_html(str(path), include_plotlyjs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=Path("bench/data/paper_grid.jsonl"))
    parser.add_argument("--space", type=Path, default=Path("search_spaces/paper_grid.yaml"))
    parser.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "gp", "random", "grid"])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=36)
    parser.add_argument("--out", type=Path, default=Path("bench/out/search_quality"))
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    from stagebudget.pareto import hypervolume
    from stagebudget.replay import load_table, mean_values

    truth = mean_values(load_table(str(args.table)))
    true_hv = hypervolume(list(truth.values()), REF_POINT, DIRECTIONS)
    space = yaml.safe_load(args.space.read_text())
    start = time.perf_counter()
    curves: dict[str, list[list[tuple[int, float, float]]]] = {}
    for sampler in args.samplers:
        for seed in range(args.seeds):
            run = run_one(space, sampler, seed, args.trials, args.table, args.out)
            curves.setdefault(sampler, []).append(trajectory(run, truth, true_hv))
    quarter = max(1, len(truth) // 4)
    at = sorted({quarter, args.trials // 2, args.trials})
    lines = [SECTION, "",
             f"{time.strftime('%Y-%m-%d')}: {args.seeds} search seeds per sampler, "
             f"{args.trials} trials each, replayed from `{args.table}` ({len(truth)} schedules; "
             f"true hypervolume {true_hv:.4f}), {time.perf_counter() - start:.0f} s. Command: "
             f"`python bench/search_quality.py --table {args.table} --space {args.space} "
             f"--seeds {args.seeds} --trials {args.trials}`. Cells: median [quartiles] of the "
             "hypervolume of the schedules tried, as a fraction of the table's.", "",
             *summarise(curves, at), ""]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.json").write_text(json.dumps(curves))
    figure(curves, args.out / "search_quality.html")
    if args.write_results:
        from bench_results import replace_section

        replace_section(RESULTS, SECTION, lines)


if __name__ == "__main__":
    main()
