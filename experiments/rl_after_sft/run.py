"""Finding F3: does RL on an SFT checkpoint recover the OOD accuracy SFT lost?

GRPO (the demo's RL settings: 8 prompts x 8 completions, learning rate 1e-3, the suite's
reward) for 320 steps (2,560 prompts, 0.32 of an epoch of the 8,000 training prompts) at LoRA
rank 4 and 16, from SFT checkpoints of increasing length (LoRA r16, learning rate 1e-3: the
demo's front) and from the base itself, over 3 seeds, on the shipped base and the demo's suite
(1,000 ID and 1,000 OOD test prompts). The SFT prefixes are trained once per seed and shared
through the prefix cache of ``experiments/sft_length`` (whose r16 runs are the same SFT
trajectories; a longer prefix goes on from a shorter one's end).

Compared prompt by prompt (:mod:`stagebudget.stats`): OOD and ID at the RL stage's end against
its start; the share of the SFT loss (base OOD minus the SFT checkpoint's) that RL won back;
and, at matched ID, RL's end against the SFT-only checkpoint of the same seed whose ID is
closest (``experiments/sft_length``'s r16 runs, the same SFT trajectory, evaluated on the same
prompts).

    python experiments/rl_after_sft/run.py            # train what is missing, then analyse
    python experiments/rl_after_sft/run.py --analyse  # analyse what is there

Needs ``experiments/sft_length/work`` (its r16 runs) for the matched-ID comparison.
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
SFT_LENGTH_WORK = ROOT / "experiments" / "sft_length" / "work"
SFT_STEPS = (0, 48, 128, 256, 409)  # 409: what the demo's whole budget buys at r16
RL_RANKS = (4, 16)
SEEDS = (0, 1, 2)
RL_STEPS, RL_EVERY = 320, 40
SFT_RANK, LEARNING_RATE = 16, 1e-3


def schedule_for(sft_steps: int, rl_rank: int, seed: int) -> tuple[Any, Any]:
    """``sft sft_steps@r16 -> rl 320@r{rl_rank}`` with the demo's stage settings (the space is
    their one home), and the space."""
    from stagebudget.space.schema import SearchSpace

    space = SearchSpace.load(DEMO)
    params = {"sft.share": 0.5, "sft.lora_rank": SFT_RANK, "sft.learning_rate": LEARNING_RATE,
              "rl.lora_rank": rl_rank}
    planned = space.schedule_from_params(params, space.cost_model("cpu"), seed=seed)
    sft, rl = planned.stages
    stages = ((sft.model_copy(update={"steps": sft_steps, "eval_interval": sft_steps}),)
              if sft_steps else ())
    stages += (rl.model_copy(update={"steps": RL_STEPS, "eval_interval": RL_EVERY}),)
    return planned.model_copy(update={"stages": stages, "budget_hours": None}), space


def train(job: tuple[int, int, int, str]) -> str:
    import torch

    from stagebudget.prefixcache import PrefixCache
    from stagebudget.training.pipeline import run_schedule

    sft_steps, rl_rank, seed, work = job
    torch.set_num_threads(1)
    schedule, space = schedule_for(sft_steps, rl_rank, seed)
    folder = Path(work) / f"sft{sft_steps}_rl{rl_rank}_s{seed}"
    # The sft_length experiment's cache: its r16 runs are this SFT trajectory (same settings and
    # seeds), so their 48-step and whole-budget ends are reused, not trained again.
    cache = PrefixCache(SFT_LENGTH_WORK / "cache", max_gb=20)
    # SFT checkpoints at every length a job starts from (a longer one goes on from them)
    keep = ((tuple(s for s in SFT_STEPS if s), ()) if sft_steps else ((),))
    run_schedule(schedule, folder, device="cpu", cost=space.cost_model("cpu"), prefix_cache=cache,
                 checkpoint_steps=keep, recovery_seconds=float("inf"))
    return str(folder)


def sft_only_rows(seed: int) -> list[dict[str, Any]]:
    """The SFT-only r16 trajectory of ``seed`` from experiments/sft_length (every checkpoint)."""
    path = SFT_LENGTH_WORK / f"r{SFT_RANK}_s{seed}" / "whole" / "curves.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run experiments/sft_length/run.py first")
    return read_curve(path)


def analyse_run(rows: list[dict[str, Any]], sft_only: list[dict[str, Any]]) -> dict[str, Any]:
    from stagebudget.stats import paired_difference

    out = outcomes
    rl = [r for r in rows if r["stage"] == "rl"]
    base, start, end = rows[0], rl[0], rl[-1]
    ood_change = paired_difference(out(start, "ood_accuracy"), out(end, "ood_accuracy"))
    id_change = paired_difference(out(start, "id_accuracy"), out(end, "id_accuracy"))
    lost = base["ood_accuracy"] - start["ood_accuracy"]
    match = min(sft_only, key=lambda r: abs(r["id_accuracy"] - end["id_accuracy"]))
    matched = paired_difference(out(match, "ood_accuracy"), out(end, "ood_accuracy"))
    half = len(rl) // 2  # the second half of RL: has OOD stopped moving?
    late = paired_difference(out(rl[half], "ood_accuracy"), out(end, "ood_accuracy"))
    return {
        "start_id": start["id_accuracy"], "start_ood": start["ood_accuracy"],
        "end_id": end["id_accuracy"], "end_ood": end["ood_accuracy"],
        "ood_change": ood_change.mean, "ood_change_se": ood_change.se,
        "id_change": id_change.mean, "id_change_se": id_change.se,
        "sft_ood_loss": lost,
        "share_recovered": ood_change.mean / lost if lost > 0.02 else None,
        "late_ood_change": late.mean, "late_ood_change_se": late.se,
        "matched_sft_step": match["step"], "matched_id_gap": end["id_accuracy"] - match["id_accuracy"],
        "ood_vs_matched_sft": matched.mean, "ood_vs_matched_sft_se": matched.se,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (SFT length, RL rank): means over seeds, a bootstrap over seeds, seeds beyond 2 SE."""
    out = []
    for sft_steps in SFT_STEPS:
        for rank in RL_RANKS:
            mine = [r for r in runs if r["sft_steps"] == sft_steps and r["rl_rank"] == rank]
            if not mine:
                continue

            ood, idc, matched = (seed_bootstrap(mine, k) for k in (
                "ood_change", "id_change", "ood_vs_matched_sft"))
            shares = [r["share_recovered"] for r in mine if r["share_recovered"] is not None]
            out.append({
                "sft_steps": sft_steps, "rl_rank": rank, "seeds": len(mine),
                "start_id": sum(r["start_id"] for r in mine) / len(mine),
                "start_ood": sum(r["start_ood"] for r in mine) / len(mine),
                "ood_change": ood.mean, "ood_change_low": ood.low, "ood_change_high": ood.high,
                "seeds_ood_up_2se": sum(r["ood_change"] > 2 * r["ood_change_se"] for r in mine),
                "seeds_ood_down_2se": sum(-r["ood_change"] > 2 * r["ood_change_se"] for r in mine),
                "id_change": idc.mean, "id_change_low": idc.low, "id_change_high": idc.high,
                "share_recovered": sum(shares) / len(shares) if shares else None,
                "ood_vs_matched_sft": matched.mean, "matched_low": matched.low,
                "matched_high": matched.high,
                "mean_matched_id_gap": sum(r["matched_id_gap"] for r in mine) / len(mine),
                "seeds_late_ood_moving_2se": sum(abs(r["late_ood_change"]) > 2 * r["late_ood_change_se"]
                                                 for r in mine),
            })
    return out


def strength_slope(runs: list[dict[str, Any]]) -> Any:
    """OOD change per unit of the start's ID (least squares over the runs after SFT), with a
    bootstrap over seeds: does a stronger start gain more?"""
    from stagebudget.stats import cluster_bootstrap

    after = [r for r in runs if r["sft_steps"]]

    def slope(points: list[float]) -> float:
        xs, ys = points[0::2], points[1::2]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0

    clusters = {seed: [v for r in after if r["seed"] == seed for v in (r["start_id"], r["ood_change"])]
                for seed in SEEDS}
    return cluster_bootstrap({k: v for k, v in clusters.items() if v}, statistic=slope, n_boot=4000)


def figure(curves: list[dict[str, Any]], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(RL_RANKS), shared_yaxes=True,
                        subplot_titles=[f"RL LoRA r{r}" for r in RL_RANKS])
    colors = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a"]
    for col, rank in enumerate(RL_RANKS, start=1):
        for color, sft_steps in zip(colors, SFT_STEPS, strict=False):
            for seed in SEEDS:
                mine = [r for r in curves if r["rl_rank"] == rank and r["sft_steps"] == sft_steps
                        and r["seed"] == seed and r["stage"] == "rl"]
                fig.add_trace(go.Scatter(
                    x=[r["id_accuracy"] for r in mine], y=[r["ood_accuracy"] for r in mine],
                    mode="lines+markers", marker={"size": 4, "color": color},
                    line={"color": color}, name=f"SFT {sft_steps} steps",
                    legendgroup=str(sft_steps), showlegend=col == 1 and seed == SEEDS[0]),
                    row=1, col=col)
        sft = [r for r in curves if r["stage"] == "sft-only"]
        for seed in SEEDS:
            mine = [r for r in sft if r["seed"] == seed]
            fig.add_trace(go.Scatter(
                x=[r["id_accuracy"] for r in mine], y=[r["ood_accuracy"] for r in mine],
                mode="lines", line={"color": "grey", "dash": "dot"}, name="SFT only (r16)",
                legendgroup="sft", showlegend=col == 1 and seed == SEEDS[0]), row=1, col=col)
    fig.update_layout(title="RL from SFT checkpoints: (ID, OOD) during RL, 3 seeds; grey: SFT "
                            "alone", height=480, width=1200)
    fig.update_xaxes(title_text="ID accuracy")
    fig.update_yaxes(title_text="OOD accuracy", col=1)
    fig.write_html(path, include_plotlyjs="cdn")


def analyse(work: Path) -> None:
    curves, runs = [], []
    for seed in SEEDS:
        sft_only = sft_only_rows(seed)
        curves += [{"sft_steps": None, "rl_rank": None, "seed": seed, "stage": "sft-only",
                    "step": r["step"], "id_accuracy": r["id_accuracy"],
                    "ood_accuracy": r["ood_accuracy"], "reward": None} for r in sft_only]
        for sft_steps in SFT_STEPS:
            for rank in RL_RANKS:
                path = work / f"sft{sft_steps}_rl{rank}_s{seed}" / "curves.jsonl"
                if not path.with_name("metrics.json").is_file():  # written when a run ends
                    continue
                rows = read_curve(path)
                curves += [{"sft_steps": sft_steps, "rl_rank": rank, "seed": seed,
                            "stage": r["stage"], "step": r["step"],
                            "id_accuracy": r["id_accuracy"], "ood_accuracy": r["ood_accuracy"],
                            "reward": r.get("reward")} for r in rows]
                runs.append({"sft_steps": sft_steps, "rl_rank": rank, "seed": seed,
                             **analyse_run(rows, sft_only)})
    finish(HERE, figure, "curves.html", curves, runs, summarise, work)
    print("OOD change per unit of start ID (after SFT):", strength_slope(runs))


def jobs(work: Path) -> list[tuple[tuple[int, int, int, str], Path]]:
    # seed-major, short SFT first: a longer SFT prefix goes on from a shorter one's end
    return [((s, r, seed, str(work)), work / f"sft{s}_rl{r}_s{seed}")
            for seed in SEEDS for s in SFT_STEPS for r in RL_RANKS]


if __name__ == "__main__":
    main(__doc__, HERE, train, jobs, analyse)
