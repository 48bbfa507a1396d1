"""Finding F1: does continued pre-training (CPT) on raw sequences help the SFT and RL after it?

A cpt stage on raw DNA and protein chunks only (``corpus: raw``: no task prompt, no rule), at
0, 100 and 400 steps (6,400 and 25,600 chunks; LoRA r16, learning rate 1e-3, batch 64, the
settings of the demo's SFT, so the data is what changes), then the same SFT -> RL schedule: what
the demo space plans at SFT share 1/2 (``sft 204@r16 lr=1e-3 -> rl 105@r4``), on the shipped base
and the demo's suite (1,000 ID and 1,000 OOD test prompts), seeds 0, 1, 2 (each seed trains
every stage with that seed).

Why raw sequences: the default cpt corpus (``corpus: mixture``) is the base's own pre-training
mixture, 95% task examples under every rule, ID and OOD alike. CPT on it is more pre-training
on the OOD rules themselves, so it would help OOD by construction. One arm trains it anyway
(400 steps) to show how large that effect is beside the raw corpus's.

Compared prompt by prompt (:mod:`stagebudget.stats`) against the run without CPT of the same
seed: after SFT (does CPT help SFT?), RL's own change from its start to its end (does CPT help
RL?), and after RL (both). The SFT-only checkpoint is the SFT stage's end inside each run.

    python experiments/cpt/run.py            # train what is missing, then analyse
    python experiments/cpt/run.py --analyse  # analyse what is there

Writes ``results/runs.csv``, ``results/summary.csv``, ``results/curves.csv`` and
``results/cpt.html`` next to this file; the runs go to ``work/`` (not committed).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared import finish, main, outcomes, read_curve, seed_bootstrap

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEMO = ROOT / "search_spaces" / "demo.yaml"
# (corpus, cpt steps); ("none", 0) is the control every other arm is compared with
ARMS = (("none", 0), ("raw", 100), ("raw", 400), ("mixture", 400))
SEEDS = (0, 1, 2)
CPT_RANK, CPT_LEARNING_RATE, CPT_BATCH = 16, 1e-3, 64
SFT_SHARE, SFT_RANK, SFT_LEARNING_RATE, RL_RANK = 0.5, 16, 1e-3, 4
RL_EVALS = 3  # RL evaluated three times (and at its start)


def schedule_for(corpus: str, cpt_steps: int, seed: int) -> tuple[Any, Any]:
    """``[cpt cpt_steps@r16 on corpus ->] sft -> rl`` with the demo's SFT and RL settings (the
    demo space is their one home), and the space."""
    from stagebudget.schedule import StageSpec
    from stagebudget.space.schema import SearchSpace

    space = SearchSpace.load(DEMO)
    params = {"sft.share": SFT_SHARE, "sft.lora_rank": SFT_RANK,
              "sft.learning_rate": SFT_LEARNING_RATE, "rl.lora_rank": RL_RANK}
    planned = space.schedule_from_params(params, space.cost_model("cpu"), seed=seed)
    sft, rl = planned.stages
    stages = (sft.model_copy(update={"eval_interval": sft.steps}),
              rl.model_copy(update={"eval_interval": -(-rl.steps // RL_EVALS)}))
    if cpt_steps:
        stages = (StageSpec(kind="cpt", steps=cpt_steps, lora_rank=CPT_RANK, corpus=corpus,
                            learning_rate=CPT_LEARNING_RATE, batch_size=CPT_BATCH,
                            eval_interval=cpt_steps), *stages)
    return planned.model_copy(update={"stages": stages, "budget_hours": None}), space


def folder_name(corpus: str, cpt_steps: int, seed: int) -> str:
    return f"{corpus}{cpt_steps}_s{seed}"


def train(job: tuple[str, int, int, str]) -> str:
    import torch

    from stagebudget.training.pipeline import run_schedule

    corpus, cpt_steps, seed, work = job
    torch.set_num_threads(1)
    schedule, space = schedule_for(corpus, cpt_steps, seed)
    folder = Path(work) / folder_name(corpus, cpt_steps, seed)
    run_schedule(schedule, folder, device="cpu", cost=space.cost_model("cpu"),
                 recovery_seconds=float("inf"))
    return str(folder)


def points(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The run's checkpoints: base, after CPT (the base when there is none), SFT end, RL end."""
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_stage.setdefault(row["stage"], []).append(row)
    cpt = by_stage.get("cpt", [])
    return {"base": rows[0], "cpt": cpt[-1] if cpt else rows[0], "sft": by_stage["sft"][-1],
            "rl": by_stage["rl"][-1]}


def compare(run: dict[str, dict[str, Any]], control: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Paired differences on the same prompts: this run against the control (no CPT, same seed)."""
    from stagebudget.stats import paired_difference

    out: dict[str, Any] = {}
    for objective, short in (("id_accuracy", "id"), ("ood_accuracy", "ood")):
        def scores(point: dict[str, Any], objective: str = objective) -> list[float]:
            return outcomes(point, objective)

        cpt_change = paired_difference(scores(run["base"]), scores(run["cpt"]))
        after_sft = paired_difference(scores(control["sft"]), scores(run["sft"]))
        after_rl = paired_difference(scores(control["rl"]), scores(run["rl"]))
        # RL's own change (end - start), this run's minus the control's, prompt by prompt
        rl_gain = [e - s for s, e in zip(scores(run["sft"]), scores(run["rl"]), strict=True)]
        control_gain = [e - s for s, e in zip(scores(control["sft"]), scores(control["rl"]),
                                              strict=True)]
        rl_gain_diff = paired_difference(control_gain, rl_gain)
        own_rl = paired_difference(scores(run["sft"]), scores(run["rl"]))
        for name, est in ((f"{short}_cpt_change", cpt_change), (f"{short}_after_sft_vs_none", after_sft),
                          (f"{short}_rl_change", own_rl), (f"{short}_rl_change_vs_none", rl_gain_diff),
                          (f"{short}_after_rl_vs_none", after_rl)):
            out[name], out[f"{name}_se"] = est.mean, est.se
        for stage in ("cpt", "sft", "rl"):
            out[f"{short}_{stage}"] = run[stage][objective]
    return out


COMPARED = [f"{s}_{m}" for m in ("cpt_change", "after_sft_vs_none", "rl_change",
                                 "rl_change_vs_none", "after_rl_vs_none") for s in ("id", "ood")]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: means over seeds with a bootstrap interval over seeds, and how many seeds moved
    beyond 2 paired standard errors each way."""
    out = []
    for corpus, cpt_steps in ARMS:
        mine = [r for r in runs if (r["corpus"], r["cpt_steps"]) == (corpus, cpt_steps)]
        if not mine:
            continue
        row: dict[str, Any] = {"corpus": corpus, "cpt_steps": cpt_steps, "seeds": len(mine)}
        for stage in ("cpt", "sft", "rl"):
            for short in ("id", "ood"):
                row[f"{short}_{stage}"] = sum(r[f"{short}_{stage}"] for r in mine) / len(mine)
        for key in COMPARED:
            est = seed_bootstrap(mine, key)
            row[key], row[f"{key}_low"], row[f"{key}_high"] = est.mean, est.low, est.high
            row[f"{key}_seeds_up"] = sum(r[key] > 2 * r[f"{key}_se"] for r in mine)
            row[f"{key}_seeds_down"] = sum(-r[key] > 2 * r[f"{key}_se"] for r in mine)
        out.append(row)
    return out


def figure(curves: list[dict[str, Any]], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    colors = {"none0": "#636efa", "raw100": "#00cc96", "raw400": "#ef553b", "mixture400": "#ab63fa"}
    for corpus, cpt_steps in ARMS:
        arm = f"{corpus}{cpt_steps}"
        for seed in SEEDS:
            mine = [r for r in curves if r["arm"] == arm and r["seed"] == seed]
            fig.add_trace(go.Scatter(
                x=[r["id_accuracy"] for r in mine], y=[r["ood_accuracy"] for r in mine],
                mode="lines+markers", line={"color": colors[arm]},
                marker={"size": [9 if r["stage"] != mine[max(i - 1, 0)]["stage"] else 5
                                 for i, r in enumerate(mine)]},
                text=[f"{r['stage']} step {r['step']}" for r in mine],
                name="no CPT" if not cpt_steps else f"CPT {cpt_steps} steps, {corpus}",
                legendgroup=arm, showlegend=seed == SEEDS[0]))
    fig.update_layout(title="CPT then SFT then RL: (ID, OOD) at every evaluation, 3 seeds "
                            "(base -> after CPT -> SFT end -> RL)", height=560, width=900,
                      xaxis_title="ID accuracy", yaxis_title="OOD accuracy")
    fig.write_html(path, include_plotlyjs="cdn")


def analyse(work: Path) -> None:
    curves, runs = [], []
    for seed in SEEDS:
        control_path = work / folder_name("none", 0, seed) / "curves.jsonl"
        if not control_path.with_name("metrics.json").is_file():
            continue
        control = points(read_curve(control_path))
        for corpus, cpt_steps in ARMS:
            path = work / folder_name(corpus, cpt_steps, seed) / "curves.jsonl"
            if not path.with_name("metrics.json").is_file():  # written when a run ends
                continue
            rows = read_curve(path)
            curves += [{"arm": f"{corpus}{cpt_steps}", "seed": seed, "stage": r["stage"],
                        "step": r["step"], "id_accuracy": r["id_accuracy"],
                        "ood_accuracy": r["ood_accuracy"], "reward": r.get("reward")}
                       for r in rows]
            runs.append({"corpus": corpus, "cpt_steps": cpt_steps, "seed": seed,
                         **compare(points(rows), control)})
    finish(HERE, figure, "cpt.html", curves, runs, summarise, work)


def jobs(work: Path) -> list[tuple[tuple[str, int, int, str], Path]]:
    return [((corpus, steps, seed, str(work)), work / folder_name(corpus, steps, seed))
            for seed in SEEDS for corpus, steps in ARMS]


if __name__ == "__main__":
    main(__doc__, HERE, train, jobs, analyse)
