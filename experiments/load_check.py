"""Check that a trial's result does not depend on machine load (the budget contract).

Run: ``python experiments/load_check.py [--hogs 2]``. Trains one demo schedule (SFT then RL, the
demo's settings and per-trial budget) twice with the real pipeline, once on an idle machine and
once beside ``--hogs`` busy-loop processes, and prints both results: the steps each stage ran,
the measured device-seconds, and whether every curve row (ID, OOD and their standard errors,
loss, reward at every evaluation point) is identical. Exit status 1 when they differ.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any


def _spin() -> None:
    while True:
        pass


def _train(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from stagebudget.schedule import Schedule, StageSpec, TasksRef
    from stagebudget.training.pipeline import run_schedule

    schedule = Schedule(
        tasks=TasksRef(n_train=8000, n_id_test=1000, n_ood_test=1000),
        budget_hours=0.008, seed=0,
        stages=(StageSpec(kind="sft", steps=197, lora_rank=0, learning_rate=3e-3, batch_size=64,
                          eval_interval=66),
                StageSpec(kind="rl", steps=19, lora_rank=4, learning_rate=1e-3, batch_size=16,
                          num_generations=8, max_completion_length=14, temperature=1.2,
                          eval_interval=7)))
    result = run_schedule(schedule, out, device="cpu")
    return result.curves, result.ledger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hogs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/load_check"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as a trial runs under Ray with {"cpu": 1}
    runs = {}
    for label, hogs in (("idle", 0), (f"beside {args.hogs} busy processes", args.hogs)):
        procs = [mp.Process(target=_spin, daemon=True) for _ in range(hogs)]
        for p in procs:
            p.start()
        start = time.perf_counter()
        try:
            curves, ledger = _train(args.out / label.split()[0])
        finally:
            for p in procs:
                p.terminate()
        steps = [s["steps_done"] for s in ledger["stages"]]
        print(f"{label}: steps {steps}, training {ledger['train_seconds']:.1f} device-s, "
              f"wall {time.perf_counter() - start:.1f} s, final ID {curves[-1]['id_accuracy']:.3f}"
              f" OOD {curves[-1]['ood_accuracy']:.3f}", flush=True)
        runs[label] = [{k: v for k, v in r.items() if k != "device_seconds"} for r in curves]
    same = len({repr(v) for v in runs.values()}) == 1
    print("curves identical:", same)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
