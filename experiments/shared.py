"""What the experiments share: reading curves, per-prompt outcomes, results files, the runner.

Each experiment is ``python experiments/NAME/run.py``; its ``run.py`` puts this folder on the
path and imports from here. The statistics themselves are :mod:`stagebudget.stats`.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def read_curve(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``curves.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def outcomes(row: Mapping[str, Any], objective: str) -> list[float]:
    """A curve row's per-prompt outcomes of ``objective`` (a row measured before they were kept
    is an error: every experiment here compares prompt by prompt)."""
    from stagebudget.stats import row_outcomes

    values = row_outcomes(row, objective)
    if values is None:
        raise SystemExit(f"a curve row at step {row.get('step')} has no per-prompt outcomes: "
                         "it was measured by an older stagebudget; remove work/ and run again")
    return values


def seed_bootstrap(runs: Sequence[Mapping[str, Any]], key: str,
                   statistic: Callable[[list[float]], float] | None = None) -> Any:
    """``key``'s mean over runs with a bootstrap over their seeds (one cluster per seed)."""
    from stagebudget.stats import cluster_bootstrap

    clusters: dict[Any, list[float]] = {}
    for run in runs:
        clusters.setdefault(run["seed"], []).append(float(run[key]))
    return cluster_bootstrap(clusters, statistic, n_boot=4000)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as CSV, floats with 6 significant digits."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_results(folder: Path, **tables: Sequence[Mapping[str, Any]]) -> Path:
    """``results/NAME.csv`` for each table; returns the results folder."""
    results = folder / "results"
    results.mkdir(exist_ok=True)
    for name, rows in tables.items():
        write_csv(results / f"{name}.csv", rows)
    return results


def print_rows(rows: Iterable[Mapping[str, Any]]) -> None:
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))


def train_all(train: Callable[[Any], str], jobs: Sequence[Any], processes: int) -> None:
    """Run ``train`` over ``jobs``, ``processes`` at a time (fresh processes: each sets its own
    torch threads), printing each finished folder."""
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for folder in pool.imap_unordered(train, jobs):
            print(f"trained {folder} ({time.time() - start:.0f} s)", flush=True)


def finish(folder: Path, figure: Callable[[list[dict[str, Any]], Path], None], figure_name: str,
           curves: list[dict[str, Any]], runs: list[dict[str, Any]],
           summarise: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], work: Path) -> None:
    """Write ``results/`` (curves, runs and their summary as CSV, and the figure) and print the
    summary; nothing trained is an error that says so."""
    if not runs:
        raise SystemExit(f"nothing trained under {work}: run without --analyse first")
    summary = summarise(runs)
    results = write_results(folder, curves=curves, runs=runs, summary=summary)
    figure(curves, results / figure_name)
    print_rows(summary)


def main(doc: str, folder: Path, train: Callable[[Any], str],
         jobs: Callable[[Path], Sequence[tuple[Any, ...]]], analyse: Callable[[Path], None],
         argv: list[str] | None = None) -> None:
    """An experiment's command line: train the jobs whose run has not ended (``jobs(work)``
    lists each job with the folder it trains; a run has ended when its ``metrics.json``,
    written last, exists), then analyse; ``--analyse`` only analyses."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--analyse", action="store_true", help="only analyse what is trained")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--work", type=Path, default=folder / "work")
    args = parser.parse_args(argv)
    if not args.analyse:
        todo = [job for job, run in jobs(args.work) if not (run / "metrics.json").is_file()]
        train_all(train, todo, args.jobs)
    analyse(args.work)
