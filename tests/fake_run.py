"""Build a fake, half-finished run directory without Ray or training.

A real Optuna study in SQLite (complete, failed and running trials, one pair of trials with
identical params), matching trial records and curves, run.json and space.yaml. The front of the
default run, maximising (ID, OOD), is trials 4, 2, 3, 8 (by ID).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from stagebudget.fileio import atomic_write_yaml
from stagebudget.rundir import RunDir, TrialRecord
from stagebudget.schedule import Schedule, StageSpec

BUDGET_HOURS = 0.012
OPTUNA_STATE = {"FAILED": "FAIL"}  # records say FAILED, Optuna says FAIL
DISTRIBUTIONS = {
    "sft.share": FloatDistribution(0.0, 1.0, step=0.125),
    "sft.lora_rank": CategoricalDistribution([8, 32]),
    "rl.lora_rank": CategoricalDistribution([4, 16]),
    "sft.learning_rate": CategoricalDistribution([1e-3, 3e-3]),  # only trials that set sft_lr
}


@dataclass(frozen=True)
class FakeTrial:
    share: float
    sft_rank: int
    rl_rank: int
    state: str = "COMPLETE"
    values: tuple[float, float] | None = None
    reference: str | None = None
    error: str | None = None
    sft_lr: float | None = None  # searched SFT learning rate (unset: not searched, the default)

    @property
    def params(self) -> dict[str, Any]:
        return {"sft.share": self.share, "sft.lora_rank": self.sft_rank,
                "rl.lora_rank": self.rl_rank,
                **({"sft.learning_rate": self.sft_lr} if self.sft_lr is not None else {})}


TRIALS = (
    FakeTrial(1.0, 32, 4, values=(0.80, 0.30), reference="sft_only"),       # 0
    FakeTrial(0.0, 32, 4, values=(0.40, 0.45), reference="rl_only"),        # 1
    FakeTrial(0.25, 32, 4, values=(0.70, 0.55), reference="heuristic"),     # 2 front
    FakeTrial(0.5, 8, 16, values=(0.85, 0.50)),                             # 3 front
    FakeTrial(0.125, 32, 16, values=(0.60, 0.62)),                          # 4 front (max OOD)
    FakeTrial(0.75, 8, 4, values=(0.65, 0.35)),                             # 5
    FakeTrial(0.375, 32, 4, state="FAILED",
              error="RuntimeError: CUDA out of memory\nTraceback (most recent call last): ..."),
    FakeTrial(0.625, 8, 16, state="RUNNING"),                               # 7
    FakeTrial(0.5, 32, 16, values=(0.92, 0.40)),                            # 8 front (max ID)
    FakeTrial(0.25, 8, 4, values=(0.50, 0.50)),                             # 9
    FakeTrial(0.75, 8, 4, values=(0.66, 0.36)),                             # 10 same params as 5
)
FRONT = [4, 2, 3, 8]


def schedule_for(t: FakeTrial) -> Schedule:
    """A plausible schedule: 80 SFT steps for the whole budget, 40 RL steps."""
    stages = []
    if t.share > 0:
        stages.append(StageSpec(kind="sft", steps=max(1, round(80 * t.share)),
                                lora_rank=t.sft_rank, eval_interval=10,
                                **({"learning_rate": t.sft_lr} if t.sft_lr is not None else {})))
    if t.share < 1:
        stages.append(StageSpec(kind="rl", steps=max(1, round(40 * (1 - t.share))),
                                lora_rank=t.rl_rank, learning_rate=1e-3, batch_size=16,
                                eval_interval=10))
    return Schedule(stages=tuple(stages), budget_hours=BUDGET_HOURS, name="fake")


def curve_rows(schedule: Schedule, final: tuple[float, float], upto: int | None = None,
               hours: float = BUDGET_HOURS) -> list[dict[str, Any]]:
    """Eval rows every ``eval_interval`` steps, rising linearly to ``final``."""
    total = sum(s.steps for s in schedule.stages)
    rows, g = [], 0
    per_step = hours * 3600 / total
    for i, spec in enumerate(schedule.stages):
        for step in range(0, spec.steps + 1, spec.eval_interval):
            frac = (g + step) / total
            row = {"stage": spec.kind, "stage_index": i, "step": step, "global_step": g + step,
                   "device_seconds": round((g + step) * per_step, 3),
                   "id_accuracy": round(0.1 + (final[0] - 0.1) * frac, 4),
                   "ood_accuracy": round(0.1 + (final[1] - 0.1) * frac, 4)}
            row["train_loss" if spec.kind != "rl" else "reward"] = round(1 - frac, 3)
            rows.append(row)
        g += spec.steps
    return rows[:upto] if upto is not None else rows


def standard_error(p: float, n: int = 200) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` prompts."""
    return round(math.sqrt(p * (1 - p) / n), 4)


def make_fake_run(root: Path, *, device_hours: bool = False, trials: tuple[FakeTrial, ...] = TRIALS,
                  orphan: bool = False, name: str = "fake", standard_errors: bool = False) -> Path:
    """Create the run directory ``root`` and return it. ``standard_errors`` adds SEs to the
    records' objectives, package versions and the command to run.json (as new runs have)."""
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(root / 'study.db').resolve()}"
    objectives = [{"name": "id_accuracy", "direction": "maximize"},
                  {"name": "ood_accuracy", "direction": "maximize"}]
    if device_hours:
        objectives.append({"name": "device_hours", "direction": "minimize"})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=f"{name}-study",
                                directions=[o["direction"] for o in objectives])
    for i, t in enumerate(trials):
        hours = BUDGET_HOURS * (0.5 + 0.05 * i)
        values = None
        if t.values is not None:
            values = [*t.values, hours] if device_hours else list(t.values)
        dists = {k: DISTRIBUTIONS[k] for k in t.params}
        study.add_trial(create_trial(params=t.params, distributions=dists, values=values,
                                     state=TrialState[OPTUNA_STATE.get(t.state, t.state)]))
        schedule = schedule_for(t)
        record = TrialRecord(
            key=f"fake_{i:05d}", params=t.params, schedule=schedule.to_dict(), status=t.state,
            reference=t.reference, error=t.error, started=1000.0 + i,
            objectives=dict(zip(("id_accuracy", "ood_accuracy"), t.values, strict=True))
            if t.values else {},
            ledger={"device_hours": hours, "train_seconds": hours * 3600,
                    "stages": [{"kind": s.kind, "train_seconds": hours * 3600 / 2}
                               for s in schedule.stages]} if t.values else {},
        )
        if standard_errors and t.values:
            record.objectives.update(id_accuracy_se=standard_error(t.values[0]),
                                     ood_accuracy_se=standard_error(t.values[1]))
            record.versions = {"stagebudget": "0.1.0", "torch": "2.13.0"}
        run.write_record(record)
        final = t.values or (0.5, 0.4)
        rows = curve_rows(schedule, final, upto=None if t.state == "COMPLETE" else 3, hours=hours)
        path = run.trial_dir(record.key) / "curves.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if orphan:
        sched = schedule_for(FakeTrial(0.875, 8, 4))
        run.write_record(TrialRecord(key="orphan", params={"sft.share": 0.875}, status="RUNNING",
                                     schedule=sched.to_dict()))
    run.write_meta({"version": "0.1.0", "name": name, "study_name": f"{name}-study",
                    "storage": storage, "objectives": objectives,
                    "trials_requested": len(trials) + 2,
                    **({"command": "stagebudget search space.yaml --name fake"}
                       if standard_errors else {})})
    atomic_write_yaml(run.space, {"name": name, "budget": {"per_trial_hours": BUDGET_HOURS},
                                  "stages": {"sft": {"share": 0.5}, "rl": {"share": "rest"}}})
    return root
