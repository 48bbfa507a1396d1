"""`stagebudget train`: one schedule, end to end, with a rich progress display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stagebudget.names import ID_ACCURACY, OOD_ACCURACY
from stagebudget.schedule import Schedule


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def train_with_progress(schedule: Schedule, out: Path, *, save_model: bool, device: str,
                        console: Console, base_dir: Path | None = None,
                        threads: int | None = None) -> Any:
    """Run :func:`stagebudget.training.pipeline.run_schedule`, showing stage, step, loss/reward and ID/OOD.

    ``threads`` sets torch's thread count first (a search trial's, for a bit-for-bit re-run).
    """
    import torch

    from stagebudget.training.pipeline import run_schedule

    if threads is not None:
        torch.set_num_threads(threads)
    console.print(f"torch threads: {torch.get_num_threads()}")

    offsets, total = {}, 0
    for i, st in enumerate(schedule.stages):
        offsets[i] = total
        total += st.steps
    latest: dict[str, Any] = {}
    columns = (TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("train", total=total, stage=schedule.stages[0].kind, stats="")

        def refresh(stage: str | None, done: int | None) -> None:
            stats = "  ".join(f"{k} {_fmt(v)}" for k, v in latest.items())
            progress.update(bar, stage=stage or "", stats=stats)
            if done is not None:
                progress.update(bar, completed=done)

        def on_progress(info: dict[str, Any]) -> None:
            for key in ("loss", "train_loss", "reward"):
                if info.get(key) is not None:
                    latest[key] = info[key]
            idx = info.get("stage_index")
            step = info.get("step")
            done = offsets.get(idx, 0) + step if isinstance(idx, int) and isinstance(step, int) else None
            refresh(info.get("stage"), done)

        def on_report(row: dict[str, Any]) -> None:
            latest["ID"] = row.get(ID_ACCURACY)
            latest["OOD"] = row.get(OOD_ACCURACY)
            progress.console.log(
                f"{row.get('stage')} step {row.get('step')}: ID {_fmt(row.get(ID_ACCURACY))} "
                f"OOD {_fmt(row.get(OOD_ACCURACY))}")
            on_progress(row)

        return run_schedule(schedule, out, report=on_report, progress=on_progress,
                            save_model=save_model, device=device, base_dir=base_dir)
