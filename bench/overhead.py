"""Overhead of stagebudget against what a user writes by hand (issue 15, part 3).

    python bench/overhead.py [--base builtin:tiny] [--per-trial-hours 0.004] [--repeats 1]
                             [--work DIR] [--json FILE]

One demo-like schedule (SFT with its own LoRA, then GRPO with its own LoRA, on the built-in
suite) is trained three ways in this one run, each in a fresh process with one torch thread (what
a Ray trial with ``cpu: 1`` gets):

- ``plain``: the stand-alone TRL + PEFT script ``stagebudget export`` writes (no stagebudget
  pipeline, no Ray; stagebudget only for the task data, the RL reward and the base model path);
- ``train``: ``stagebudget train`` on the same schedule;
- ``search``: a one-trial ``stagebudget search`` whose only point plans the same schedule.

Reported: wall time and peak memory (the whole process tree's summed PSS, sampled every 50 ms:
Ray's own processes count) as ratios against ``plain``, and, for ``train`` and the search's
trial, the fixed cost (everything but training steps: start, imports, model load, tokenisation,
evaluation) as a share of the trial, from the trial's own ``metrics.json``. Evaluation runs at
each stage's start and end only (eval_interval past the stage), the least a curve needs; the plain
script evaluates once at the end. Targets (issue 15): train <= 1.05x, one-trial search <= 1.25x.
Nothing is asserted: this prints a table (and ``--json`` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
BIN = Path(sys.executable).parent
NO_EVAL_BETWEEN = 100_000  # an eval_interval no stage reaches: evaluate at stage ends only


def space_document(base: str, per_trial_hours: float, n_train: int, n_test: int) -> dict[str, Any]:
    """The demo space pinned to one point (every searched dimension a single choice)."""
    data = yaml.safe_load(DEMO.read_text())
    data.update(name="overhead", base_model=base, trials=1, concurrency=1, references=False,
                tasks={"source": "builtin", "n_train": n_train, "n_id_test": n_test,
                       "n_ood_test": n_test},
                budget={"per_trial_hours": per_trial_hours},
                # like for like: the plain script reuses nothing, and a second repeat would
                # otherwise find the first one's stages in the prefix cache and train nothing
                reuse={"enabled": False})
    sft, rl = data["stages"]["sft"], data["stages"]["rl"]
    sft.update(share={"type": "categorical", "choices": [0.5]},
               lora_rank={"type": "categorical", "choices": [16]}, learning_rate=3e-3,
               eval_interval=NO_EVAL_BETWEEN)
    rl.update(lora_rank={"type": "categorical", "choices": [4]}, eval_interval=NO_EVAL_BETWEEN)
    return data


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Write the space, the schedule it plans, and the plain script; build the base model."""
    from stagebudget.modelref import resolve_base_model
    from stagebudget.names import TORCH_THREADS
    from stagebudget.results.export import stage_export
    from stagebudget.results.exportscript import render_script
    from stagebudget.space.schema import SearchSpace

    resolve_base_model(args.base)  # built once here, outside every timed run
    space_file = work / "space.yaml"
    space_file.write_text(yaml.safe_dump(space_document(args.base, args.per_trial_hours,
                                                        args.n_train, args.n_test)))
    space = SearchSpace.load(space_file)
    point = {name: d.choices[0] for name, d in space.dimensions().items()}
    schedule = space.schedule_from_params(point, space.cost_model("cpu"), name="overhead")
    schedule_file = work / "schedule.yaml"
    # Without budget_hours, `train` trains the planned steps with no overrun guard: on a shared
    # machine (4x slower steps) the guard would stop it, and a stopped run measures nothing.
    schedule.model_copy(update={"budget_hours": None}).save(schedule_file)
    document = {"schedule": schedule.to_dict(), "source": {}, TORCH_THREADS: 1,
                "trl": [stage_export(s, i, schedule.seed, "cpu")
                        for i, s in enumerate(schedule.stages)]}
    script = work / "plain.py"
    script.write_text(render_script(document, device="cpu"))
    print(f"schedule: {schedule.describe()}  ({schedule.budget_hours} device-hours)", flush=True)
    return {"space": space_file, "schedule": schedule_file, "script": script}


def tree_sample(pid: int, cpu: dict[int, float]) -> int:
    """Memory of ``pid`` and all its descendants (bytes): the sum of their PSS (proportional set
    size: a page shared by k processes counts 1/k in each), RSS where PSS is unavailable. Summed
    RSS would count the shared libraries of Ray's many processes many times over. Each
    process's CPU seconds so far are stored in ``cpu`` (by pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            times = p.cpu_times()
        except psutil.Error:
            continue
        total += getattr(info, "pss", info.rss)
        cpu[p.pid] = max(cpu.get(p.pid, 0.0), times.user + times.system)
    return total


def measure(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak memory (PSS, MiB) of one command's process tree; raises
    if it fails. CPU seconds depend much less than wall time on what else the machine runs."""
    peak = 0
    cpu: dict[int, float] = {}
    done = threading.Event()
    with open(log, "w") as out:
        start, epoch = time.perf_counter(), time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_sample(proc.pid, cpu))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {code}); see {log}")
    return {"wall_s": wall, "cpu_s": sum(cpu.values()), "peak_mib": peak / 2**20,
            "start_epoch": epoch}


def trial_split(metrics: dict[str, Any], wall: float) -> dict[str, float]:
    """Training steps, evaluation and the rest (start, imports, model load, data) of a trial."""
    train = sum(float(s.get("measured_seconds") or 0.0) for s in metrics.get("stages", []))
    evaluation = float(metrics.get("eval_seconds") or 0.0)
    return {"trial_s": wall, "train_steps_s": train, "eval_s": evaluation,
            "other_s": wall - train - evaluation,
            "fixed_share": (wall - train) / wall if wall > 0 else float("nan")}


def import_seconds(env: dict[str, str]) -> float:
    """A fresh interpreter's start plus the imports a trial needs (torch, transformers, TRL,
    PEFT, stagebudget's pipeline), measured from outside."""
    code = "import stagebudget.training.pipeline, trl, peft, torch, transformers"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - start


def run_once(work: Path, files: dict[str, Path], env: dict[str, str], i: int) -> dict[str, Any]:
    """Each way once (fresh output directories); the per-trial split of train and search."""
    out = work / f"rep{i}"
    out.mkdir()
    ways = {
        "plain": [sys.executable, str(files["script"]), "--out", str(out / "plain")],
        "train": [str(BIN / "stagebudget"), "train", str(files["schedule"]), "-o",
                  str(out / "train"), "--no-save", "--device", "cpu", "--threads", "1"],
        "search": [str(BIN / "stagebudget"), "search", str(files["space"]), "--name", "one",
                   "--runs-dir", str(out / "runs"), "--no-live"],
    }
    row: dict[str, Any] = {}
    order = list(ways)[i % 3:] + list(ways)[:i % 3]  # rotated: no way always runs first
    for name, cmd in ((n, ways[n]) for n in order):
        row[name] = measure(cmd, env, out / f"{name}.log")
        print(f"  {name:>6}: {row[name]['wall_s']:7.1f} s  cpu {row[name]['cpu_s']:7.1f} s  "
              f"{row[name]['peak_mib']:7.0f} MiB", flush=True)
    train_metrics = json.loads((out / "train" / "metrics.json").read_text())
    row["train_split"] = trial_split(train_metrics, row["train"]["wall_s"])
    [trial] = (out / "runs" / "one" / "trials").iterdir()
    record = json.loads((trial / "record.json").read_text())
    if record["status"] != "COMPLETE":  # e.g. the overrun guard on a heavily shared machine
        raise SystemExit(f"the search trial did not complete ({record['status']}: "
                         f"{record.get('error')}); its timing measures nothing. See {out}")
    trial_wall = float(record["finished"]) - float(record["started"])
    row["search_split"] = trial_split(json.loads((trial / "metrics.json").read_text()), trial_wall)
    row["search_split"]["driver_s"] = row["search"]["wall_s"] - trial_wall
    row["search_split"]["before_trial_s"] = float(record["started"]) - row["search"]["start_epoch"]
    row["objectives"] = {"plain": json.loads((out / "plain" / "metrics.json").read_text()),
                         "train": train_metrics["objectives"],
                         "search": record["objectives"]}
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats, and the ratios against the plain script."""
    def med(way: str, key: str) -> float:
        return statistics.median(r[way][key] for r in rows)

    out: dict[str, Any] = {}
    for way in ("plain", "train", "search"):
        out[way] = {k: med(way, k) for k in ("wall_s", "cpu_s", "peak_mib")}
        out[way]["wall_ratio"] = out[way]["wall_s"] / out["plain"]["wall_s"]
        out[way]["cpu_ratio"] = out[way]["cpu_s"] / out["plain"]["cpu_s"]
        out[way]["mem_ratio"] = out[way]["peak_mib"] / out["plain"]["peak_mib"]
    for split in ("train_split", "search_split"):
        out[split] = {k: statistics.median(r[split][k] for r in rows) for k in rows[0][split]}
    out["objectives"] = rows[-1]["objectives"]
    return out


def report(summary: dict[str, Any], import_s: float) -> str:
    lines = ["| way | wall s | x plain | CPU s | x plain | peak MiB (PSS) | x plain | target |",
             "|---|---|---|---|---|---|---|---|"]
    targets = {"plain": "", "train": "<= 1.05x", "search": "<= 1.25x"}
    for way in ("plain", "train", "search"):
        s = summary[way]
        lines.append(f"| {way} | {s['wall_s']:.1f} | {s['wall_ratio']:.2f} | {s['cpu_s']:.1f} | "
                     f"{s['cpu_ratio']:.2f} | {s['peak_mib']:.0f} | {s['mem_ratio']:.2f} | "
                     f"{targets[way]} |")
    lines += ["", "| trial | wall s | training steps s | evaluation s | other s | fixed share |",
              "|---|---|---|---|---|---|"]
    for name, split in (("train", summary["train_split"]), ("search trial", summary["search_split"])):
        lines.append(f"| {name} | {split['trial_s']:.1f} | {split['train_steps_s']:.1f} | "
                     f"{split['eval_s']:.1f} | {split['other_s']:.1f} | {split['fixed_share']:.0%} |")
    lines += ["", f"Search driver outside its trial (Ray start, Tune, study, shutdown): "
              f"{summary['search_split']['driver_s']:.1f} s, of which "
              f"{summary['search_split']['before_trial_s']:.1f} s before the trial started. A "
              f"fresh interpreter importing torch/transformers/TRL/PEFT/stagebudget.training.pipeline: "
              f"{import_s:.1f} s.",
              f"Objectives: {json.dumps(summary['objectives'])}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="builtin:tiny")
    parser.add_argument("--per-trial-hours", "--budget-hours", dest="per_trial_hours", type=float,
                        default=0.004, help="each trial's budget (device-hours)")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="keep outputs here")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="stagebudget-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work, args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for i in range(args.repeats):
        print(f"repeat {i + 1}/{args.repeats}", flush=True)
        rows.append(run_once(work, files, env, i))
    summary = summarise(rows)
    import_s = import_seconds(env)
    text = report(summary, import_s)
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; python {platform.python_version()}\n{text}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "import_s": import_s, "rows": rows,
                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
