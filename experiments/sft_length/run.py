"""Finding F2: SFT raises ID accuracy; does OOD peak early and then decline?

One long SFT run per (LoRA rank, seed), as long as the demo's whole per-trial budget buys
(``search_spaces/demo.yaml``: SFT share 1, batch 64, learning rate 1e-3, the built-in suite
with 1,000 ID and 1,000 OOD test prompts), on the shipped base. Evaluated every 4 steps over the
first 48 steps (about the first 10% of the run) and every 32 steps after: the dense part is a
48-step run, and the long run goes on from its checkpoint through the prefix cache (a constant
learning rate makes the shorter run an exact prefix), so both are one trajectory.

Every evaluation keeps its per-prompt outcomes, so checkpoints are compared prompt by prompt
(:mod:`stagebudget.stats`): paired differences on the same prompts, exact McNemar tests, and a
bootstrap over seeds for the means across seeds.

    python experiments/sft_length/run.py            # train what is missing, then analyse
    python experiments/sft_length/run.py --analyse  # analyse what is there

Writes ``results/curves.csv`` (every evaluation point), ``results/runs.csv`` (one row per run),
``results/summary.csv`` (one row per rank) and ``results/curves.html`` next to this file; the
training runs and their prefix cache go to ``work/`` (not committed).
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
RANKS = (4, 16, 0)  # two LoRA ranks and full fine-tuning (0)
SEEDS = (0, 1, 2)
LEARNING_RATE = 1e-3  # the demo's front trained SFT at 1e-3 (3e-3 is its other choice)
DENSE_UNTIL, DENSE_EVERY, SPARSE_EVERY = 48, 4, 32
EARLY_STEPS = (8, 24, 48)  # fixed before the runs: OOD against the base at these steps


def full_stage(rank: int, seed: int) -> tuple[Any, Any]:
    """The schedule the demo space plans for SFT alone at ``rank`` over its whole budget, and
    the space (tasks, budget, cost model: one home)."""
    from stagebudget.space.schema import SearchSpace

    space = SearchSpace.load(DEMO)
    params = {"sft.share": 1.0, "sft.lora_rank": rank, "sft.learning_rate": LEARNING_RATE,
              "rl.lora_rank": 4}
    schedule = space.schedule_from_params(params, space.cost_model("cpu"), seed=seed)
    return schedule.model_copy(update={"stages": schedule.stages[:1]}), space


def train(job: tuple[int, int, str]) -> str:
    """Train one (rank, seed): the dense prefix, then the whole run from its checkpoint."""
    import torch

    from stagebudget.prefixcache import PrefixCache
    from stagebudget.training.pipeline import run_schedule

    rank, seed, work = job
    torch.set_num_threads(1)
    schedule, space = full_stage(rank, seed)
    [sft] = schedule.stages
    cost = space.cost_model("cpu")
    cache = PrefixCache(Path(work) / "cache", max_gb=20)
    folder = Path(work) / f"r{rank}_s{seed}"
    dense = schedule.model_copy(update={"stages": (sft.model_copy(update={
        "steps": DENSE_UNTIL, "eval_interval": DENSE_EVERY}),)})
    # Trainer checkpoints only where the long run goes on (and at each end), none for recovery
    keep = {"checkpoint_steps": ((DENSE_UNTIL,),), "recovery_seconds": float("inf")}
    run_schedule(dense, folder / "dense", device="cpu", cost=cost, prefix_cache=cache, **keep)
    whole = schedule.model_copy(update={"stages": (sft.model_copy(update={
        "eval_interval": SPARSE_EVERY}),)})
    run_schedule(whole, folder / "whole", device="cpu", cost=cost, prefix_cache=cache, **keep)
    return str(folder)


def load_rows(folder: Path) -> list[dict[str, Any]]:
    """The whole run's curve: the dense prefix's rows (replayed from the cache) and its own."""
    rows = read_curve(folder / "whole" / "curves.jsonl")
    dense_steps = {r["step"] for r in rows if r["step"] <= DENSE_UNTIL}
    if not {0, DENSE_EVERY, DENSE_UNTIL} <= dense_steps:
        raise SystemExit(f"{folder}: the long run did not continue from the dense prefix "
                         f"(steps {sorted(dense_steps)}); remove work/ and run again")
    return rows


def analyse_run(rows: list[dict[str, Any]], budget_seconds: float) -> dict[str, Any]:
    """Where OOD peaks and by how much, against the base, paired on the same prompts."""
    from stagebudget.stats import mcnemar_p, paired_difference

    base, last = rows[0], rows[-1]
    peak = max(rows, key=lambda r: (r["ood_accuracy"], -r["step"]))

    def ood(row: dict[str, Any]) -> list[float]:
        return outcomes(row, "ood_accuracy")

    def idd(row: dict[str, Any]) -> list[float]:
        return outcomes(row, "id_accuracy")

    gain = paired_difference(ood(base), ood(peak))
    fall = paired_difference(ood(peak), ood(last))
    out = {
        "steps": last["step"], "evaluations": len(rows),
        "base_id": base["id_accuracy"], "base_ood": base["ood_accuracy"],
        "final_id": last["id_accuracy"], "final_ood": last["ood_accuracy"],
        "id_gain": paired_difference(idd(base), idd(last)).mean,
        "id_gain_se": paired_difference(idd(base), idd(last)).se,
        "peak_step": peak["step"], "peak_share": peak["planned_seconds"] / budget_seconds,
        "peak_ood": peak["ood_accuracy"], "peak_gain": gain.mean, "peak_gain_se": gain.se,
        "peak_mcnemar_p": mcnemar_p(ood(base), ood(peak)),
        # the peak is the best of many points: a Bonferroni bound over all of them
        "peak_p_bonferroni": min(1.0, mcnemar_p(ood(base), ood(peak)) * (len(rows) - 1)),
        "fall_after_peak": fall.mean, "fall_after_peak_se": fall.se,
    }
    by_step = {r["step"]: r for r in rows}
    for step in EARLY_STEPS:
        d = paired_difference(ood(base), ood(by_step[step]))
        out[f"ood_gain_at_{step}"], out[f"ood_gain_at_{step}_se"] = d.mean, d.se
    return out


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rank: means over seeds with a bootstrap over seeds, and how many seeds agree."""
    out = []
    for rank in RANKS:
        mine = [r for r in runs if r["rank"] == rank]
        if not mine:
            continue

        peak, fall, idg = (seed_bootstrap(mine, k) for k in ("peak_gain", "fall_after_peak",
                                                               "id_gain"))
        out.append({
            "rank": rank, "seeds": len(mine),
            "id_gain": idg.mean, "id_gain_low": idg.low, "id_gain_high": idg.high,
            "peak_step_min": min(r["peak_step"] for r in mine),
            "peak_step_max": max(r["peak_step"] for r in mine),
            "peak_share_max": max(r["peak_share"] for r in mine),
            "peak_gain": peak.mean, "peak_gain_low": peak.low, "peak_gain_high": peak.high,
            "seeds_peak_above_base_2se": sum(r["peak_gain"] > 2 * r["peak_gain_se"] for r in mine),
            "seeds_peak_bonferroni_p_lt_05": sum(r["peak_p_bonferroni"] < 0.05 for r in mine),
            "fall_after_peak": fall.mean, "fall_low": fall.low, "fall_high": fall.high,
            "seeds_fall_beyond_2se": sum(-r["fall_after_peak"] > 2 * r["fall_after_peak_se"]
                                         for r in mine),
            "final_ood_minus_base": sum(r["final_ood"] - r["base_ood"] for r in mine) / len(mine),
        })
    return out


def figure(curves: list[dict[str, Any]], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(RANKS), shared_yaxes=True,
                        subplot_titles=[f"LoRA r{r}" if r else "full fine-tuning" for r in RANKS])
    for col, rank in enumerate(RANKS, start=1):
        for seed in SEEDS:
            mine = [r for r in curves if r["rank"] == rank and r["seed"] == seed]
            for key, dash in (("id_accuracy", "solid"), ("ood_accuracy", "dot")):
                fig.add_trace(go.Scatter(
                    x=[r["step"] for r in mine], y=[r[key] for r in mine], mode="lines+markers",
                    line={"dash": dash}, marker={"size": 4},
                    name=f"{key.split('_')[0].upper()} seed {seed}", legendgroup=f"{key}{seed}",
                    showlegend=col == 1), row=1, col=col)
    fig.update_layout(title="SFT alone over the demo's budget: ID (solid) and OOD (dotted) by "
                            "step, 3 seeds", height=450, width=1300)
    fig.update_xaxes(title_text="SFT step")
    fig.update_yaxes(title_text="accuracy (1,000 prompts each)", col=1)
    fig.write_html(path, include_plotlyjs="cdn")


def analyse(work: Path) -> None:
    _, space = full_stage(RANKS[0], SEEDS[0])
    budget = space.budget.per_trial_hours * 3600
    curves, runs = [], []
    for rank in RANKS:
        for seed in SEEDS:
            folder = work / f"r{rank}_s{seed}"
            if not (folder / "whole" / "metrics.json").is_file():  # written when a run ends
                continue
            rows = load_rows(folder)
            curves += [{"rank": rank, "seed": seed, "step": r["step"],
                        "share_of_budget": r["planned_seconds"] / budget,
                        **{k: r[k] for k in ("id_accuracy", "id_accuracy_se", "ood_accuracy",
                                             "ood_accuracy_se", "train_loss")}} for r in rows]
            runs.append({"rank": rank, "seed": seed, **analyse_run(rows, budget)})
    finish(HERE, figure, "curves.html", curves, runs, summarise, work)


def jobs(work: Path) -> list[tuple[tuple[int, int, str], Path]]:
    return [((rank, seed, str(work)), work / f"r{rank}_s{seed}" / "whole")
            for rank in RANKS for seed in SEEDS]


if __name__ == "__main__":
    main(__doc__, HERE, train, jobs, analyse)
