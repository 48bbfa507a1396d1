"""Budget saved by stage-prefix reuse and early stopping: the same search with and without
each, same seeds.

    python bench/reuse.py [--space search_spaces/demo.yaml] [--trials 16] [--concurrency 1]
                          [--out bench/out/reuse] [--write-results]

Runs the space twice from empty caches: reuse off (every trial trains its whole schedule) and
reuse on (a fresh prefix cache). Prints, for each run, the sum of the trials' nominal costs
(each schedule trained alone), what was really trained, and their ratio; then checks that both
runs reached the same front (the same schedules with the same ID/OOD). A third run has reuse and
early stopping at stage boundaries on (the space's ``early_stopping`` settings): pruned trials
change what the sampler sees, so its front may differ; its hypervolume is compared with the run
without either. A concurrency of 1 keeps
the sampler's history, and so its suggestions, the same in both runs: with more trials at once
the order in which trials finish depends on their speed, which reuse changes. Training seconds
are measured, so ratios move a little from run to run; the front must not. Nothing is asserted:
this prints (and with ``--write-results`` records in bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Stage-prefix reuse"


def _absolute(space: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The space with its relative paths (base model, task file, cost table) made absolute."""
    out = dict(space)
    base = out.get("base_model")
    if isinstance(base, str) and not base.startswith("builtin:") and not Path(base).is_absolute():
        out["base_model"] = str((folder / base).resolve())
    tasks = dict(out.get("tasks") or {})
    source = tasks.get("source")
    if isinstance(source, str) and source != "builtin" and not Path(source).is_absolute():
        tasks["source"] = str((folder / source).resolve())
        out["tasks"] = tasks
    table = out.get("cost_table")
    if isinstance(table, str) and not Path(table).is_absolute():
        out["cost_table"] = str((folder / table).resolve())
    return out


def _variant(space_file: Path, out: Path, reuse: bool, early: bool = False) -> Path:
    space = _absolute(yaml.safe_load(space_file.read_text()), space_file.parent.resolve())
    label = ("reuse" if reuse else "noreuse") + ("-es" if early else "")
    space["name"] = f"{space.get('name', 'search')}-{label}"
    space["reuse"] = ({"enabled": True, "cache_dir": str((out / f"prefix-cache-{label}").resolve())}
                      if reuse else {"enabled": False})
    space["early_stopping"] = {**(space.get("early_stopping") or {}), "enabled": early}
    path = out / f"{label}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def _search(space: Path, out: Path, trials: int, concurrency: int) -> tuple[Path, float]:
    from stagebudget.searching.driver import run_search

    start = time.perf_counter()
    run = run_search(space, runs_dir=out / "runs", trials=trials, concurrency=concurrency,
                     live=False)
    return run, time.perf_counter() - start


def _front(run_dir: Path) -> tuple[list[tuple[str, float, float]], dict[str, Any]]:
    """The front as (schedule identity, ID, OOD), and the run's spend summary (with the count
    of pruned trials and the front's hypervolume)."""
    from stagebudget.names import PRUNED
    from stagebudget.results.run import load_run
    from stagebudget.rundir import RunDir, spend_summary
    from stagebudget.schedule import identity

    run = load_run(run_dir)
    info = run.front(curves=False)
    front = sorted((identity(dict(info.points[n].schedule or {})), *info.points[n].values[:2])
                   for n in info.front)
    records = RunDir(run_dir).records()
    spend = {**spend_summary(records), "pruned": sum(r.status == PRUNED for r in records),
             "hypervolume": info.hypervolume}
    return front, spend


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=Path("search_spaces/demo.yaml"))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/out/reuse"))
    parser.add_argument("--write-results", action="store_true",
                        help=f"replace the '{SECTION}' section of {RESULTS}")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    rows = {}
    for label, reuse, early in (("without reuse", False, False), ("with reuse", True, False),
                                ("with reuse and early stopping", True, True)):
        run, wall = _search(_variant(args.space, args.out, reuse, early), args.out, args.trials,
                            args.concurrency)
        rows[label] = (*_front(run), wall)
    lines = _report(args, rows)
    print("\n".join(lines))
    if args.write_results:
        from bench_results import replace_section

        replace_section(RESULTS, SECTION, lines)


def _report(args: argparse.Namespace, rows: dict[str, Any]) -> list[str]:
    (front_off, spend_off, wall_off), (front_on, _, wall_on), (front_es, spend_es, _) = \
        rows.values()
    same = front_off == front_on
    lines = [
        SECTION, "",
        f"{time.strftime('%Y-%m-%d')}, commit {_commit()}, {platform.machine()} "
        f"{platform.system()}, {_cores()} cores. Command: `python bench/reuse.py --space "
        f"{args.space} --trials {args.trials} --concurrency {args.concurrency}`.", "",
        "| run | nominal device-h (sum of trials) | spent device-h | spent / nominal | "
        "spent / nominal without reuse | pruned | front hypervolume | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = spend_off["nominal_device_hours"]
    for label, (_, spend, wall) in rows.items():
        nominal, spent = spend["nominal_device_hours"], spend["spent_device_hours"]
        lines.append(f"| {label} | {nominal:.4f} | {spent:.4f} | "
                     f"{spent / nominal if nominal else float('nan'):.2f} | "
                     f"{spent / base if base else float('nan'):.2f} | {spend['pruned']} | "
                     f"{spend['hypervolume']:.4f} | {wall:.0f} |")
    lines += ["", f"Fronts: {len(front_off)} schedules without reuse, {len(front_on)} with; "
              + ("identical (same schedules, same ID and OOD)." if same else
                 "DIFFERENT (see the runs under " + str(args.out) + ")."),
              f"Wall time with reuse / without: {wall_on / wall_off:.2f}.",
              f"With early stopping too: {spend_es['pruned']} trials pruned; front of "
              f"{len(front_es)} schedules, "
              + ("the same as without reuse" if front_es == front_off else
                 "different from the one without reuse")
              + (f"; hypervolume {spend_es['hypervolume'] / spend_off['hypervolume']:.3f}x of the "
                 "run without either." if spend_off["hypervolume"] else "."), ""]
    return lines


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
