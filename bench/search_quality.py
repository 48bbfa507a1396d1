"""Search quality on a replay table: how much of the true front each sampler finds, and when.

    python bench/search_quality.py [--table bench/data/paper_grid.jsonl]
        [--space search_spaces/paper_grid.yaml] [--samplers tpe nsga2 gp random grid]
        [--early-stopping gp tpe random] [--seeds 20] [--trials 36]
        [--out bench/out/search_quality] [--write-results]

Every search is a real ``stagebudget search`` (Optuna sampler, Ray Tune, study storage, front)
whose trials are replayed from the table (:mod:`stagebudget.replay`): each lookup draws one of
the schedule's training seeds, as a real search would meet that noise. Quality is measured on
the table's true values (each schedule's ID/OOD averaged over its seeds): the hypervolume of the
schedules a search has tried, as a fraction of the hypervolume of the whole table, after k
trials and against the nominal device-hours spent. ``grid`` is the grid in the study's order.
``--early-stopping S`` adds an arm ``S+es`` per sampler S: the same searches with early stopping
at stage boundaries on (the space's ``early_stopping`` settings, default margin): the table's
curves let a replayed trial be pruned where the real one would have been, charged the nominal
spend up to there; a pruned trial counts as a trial and adds no point.
Prints the median (and quartiles) over search seeds and writes a plotly figure. Ray is started
once for all searches.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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
    from stagebudget.names import COMPLETE, PRUNED, SPENT_DEVICE_HOURS
    from stagebudget.pareto import hypervolume
    from stagebudget.rundir import RunDir
    from stagebudget.searching.replay import replay_key

    records = [r for r in RunDir(run_dir).records() if r.status in (COMPLETE, PRUNED)]
    records.sort(key=lambda r: r.started)
    points, out, spent = [], [], 0.0
    for k, record in enumerate(records, 1):
        if record.status == COMPLETE:
            points.append(truth[replay_key(record.schedule)])
        spent += float(record.ledger.get(SPENT_DEVICE_HOURS,
                                         record.objectives.get("device_hours", 0.0)))
        found = hypervolume(points, REF_POINT, DIRECTIONS) if points else 0.0
        out.append((k, spent, found / true_hv if true_hv > 0 else 1.0))
    return out


ES = "+es"  # arm suffix: early stopping on


def run_one(space: dict[str, Any], arm: str, seed: int, trials: int, table: Path,
            out: Path) -> Path:
    """One replayed search of ``arm`` (a sampler name, with :data:`ES` for early stopping on);
    one that finished (run.json says when) is read back, one cut short is resumed."""
    from stagebudget.searching.driver import run_search
    from stagebudget.searching.replay import replay_trial

    sampler, early = arm.removesuffix(ES), arm.endswith(ES)
    name = f"{sampler}{'-es' if early else ''}-s{seed}"
    meta = out / "runs" / name / "run.json"
    if meta.is_file() and "finished" in json.loads(meta.read_text()):
        return meta.parent
    path = out / "spaces" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    stopping = {**(space.get("early_stopping") or {}), "enabled": early}
    path.write_text(yaml.safe_dump({**space, "name": name, "sampler": {"name": sampler,
                                                                       "seed": seed},
                                    "references": False, "concurrency": 1,
                                    "reuse": {"enabled": False},
                                    "early_stopping": stopping}))
    return run_search(path, runs_dir=out / "runs", trials=trials, live=False,
                      resume=meta.is_file(),
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


def spend_lines(curves: dict[str, list[list[tuple[int, float, float]]]],
                early: list[str]) -> list[str]:
    """Per arm: median nominal device-hours spent by the end and until 95% of the true
    hypervolume was found; per sampler with an early-stopping arm: the medians over seeds of
    the hypervolume and the spend with early stopping on, relative to off (same seed)."""
    lines = ["| arm | device-hours spent (median) | device-hours to 95% (median; – never) |",
             "| --- | --- | --- |"]
    for arm, runs in curves.items():
        ends = [run[-1][1] for run in runs if run]
        to95 = [next((h for _, h, f in run if f >= 0.95), math.inf) for run in runs if run]
        reach = statistics.median(to95) if to95 else math.inf
        lines.append(f"| {arm} | {statistics.median(ends):.3f} | "
                     f"{'–' if math.isinf(reach) else f'{reach:.3f}'} |" if ends else
                     f"| {arm} | – | – |")
    for sampler in early:
        on, off = curves.get(f"{sampler}{ES}", []), curves.get(sampler, [])
        pairs = [(a[-1], b[-1]) for a, b in zip(on, off, strict=False) if a and b]
        if not pairs:
            continue
        hv = statistics.median(a[2] / b[2] if b[2] else 1.0 for a, b in pairs)
        spend = statistics.median(a[1] / b[1] if b[1] else 1.0 for a, b in pairs)
        lines.append("")
        lines.append(f"Early stopping with {sampler}: hypervolume {hv:.3f}x and spend "
                     f"{spend:.3f}x of the same search without it (medians over {len(pairs)} "
                     "seeds, at the same number of trials).")
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
    parser.add_argument("--early-stopping", nargs="*", default=["gp", "tpe", "random"],
                        metavar="SAMPLER", help="samplers also run with early stopping on")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=36)
    parser.add_argument("--out", type=Path, default=Path("bench/out/search_quality"))
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    import os

    import ray

    from stagebudget.pareto import hypervolume
    from stagebudget.searching.replay import load_table, mean_values
    from stagebudget.space.schema import SearchSpace

    truth = mean_values(load_table(str(args.table)))
    true_hv = hypervolume(list(truth.values()), REF_POINT, DIRECTIONS)
    space = yaml.safe_load(args.space.read_text())
    if space.get("cost_table"):  # the written spaces live elsewhere: name the table absolutely
        space["cost_table"] = str((args.space.parent / space["cost_table"]).resolve())
    grid_size = math.prod(len(v) for v in SearchSpace.load(args.space).grid_space().values())
    arms = [*args.samplers, *(f"{s}{ES}" for s in args.early_stopping)]
    start = time.perf_counter()
    curves: dict[str, list[list[tuple[int, float, float]]]] = {}
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        for arm in arms:
            for seed in range(args.seeds):
                run = run_one(space, arm, seed, args.trials, args.table, args.out)
                curves.setdefault(arm, []).append(trajectory(run, truth, true_hv))
                print(f"{arm} seed {seed}: {curves[arm][-1][-1][2]:.3f} of the true "
                      f"hypervolume after {len(curves[arm][-1])} trials "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        ray.shutdown()
    quarter = max(1, grid_size // 4)
    at = sorted({quarter, args.trials // 2, args.trials})
    lines = [SECTION, "",
             f"{time.strftime('%Y-%m-%d')}: {args.seeds} search seeds per arm, "
             f"{args.trials} trials each, replayed from `{args.table}` ({grid_size} grid points, "
             f"{len(truth)} distinct schedules; true hypervolume {true_hv:.4f} against (0, 0)), "
             f"{time.perf_counter() - start:.0f} s. Command: `python bench/search_quality.py "
             f"--table {args.table} --space {args.space} --samplers {' '.join(args.samplers)} "
             f"--early-stopping {' '.join(args.early_stopping)} --seeds {args.seeds} "
             f"--trials {args.trials}`. Cells: median [quartiles] over search seeds of the "
             "hypervolume of the schedules tried, as a fraction of the table's (each schedule "
             f"at its mean over training seeds); a quarter of the grid is {quarter} trials. "
             f"`+es`: early stopping on.", "",
             *summarise(curves, at), "", *spend_lines(curves, args.early_stopping), ""]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.json").write_text(json.dumps(curves))
    figure(curves, args.out / "search_quality.html")
    if args.write_results:
        from bench_results import replace_section

        replace_section(RESULTS, SECTION, lines)


if __name__ == "__main__":
    main()
