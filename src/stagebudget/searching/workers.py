"""One trial on several data-parallel workers: a Ray Train ``TorchTrainer`` launched from the
Tune trial, as Ray documents for Tune + Train (Train V2).

Every worker runs the same trial function (:func:`~stagebudget.training.pipeline.run_schedule`)
in Ray Train's ``torch.distributed`` process group (gloo on CPUs, NCCL on GPUs);
transformers' Trainer picks the group up from the environment Ray Train sets and trains
data-parallel, each worker on ``batch_size / workers`` examples of every global batch. Rank 0
does everything a single-process trial does (evaluates, writes the curve, ledger and metrics
under the trial's folder); the other ranks train and follow its decisions
(:mod:`stagebudget.training.distributed`). Every rank reports each curve row with
``ray.train.report`` (a barrier: all ranks report as often); ``TuneReportCallback`` hands rank
0's rows to the Tune trial. The trial's result is read back from the files rank 0 wrote, and a
worker's exception is raised again in the trial, so a failed trial fails as it would in one
process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stagebudget.fileio import read_json
from stagebudget.schedule import Schedule

# Keyword arguments of a trial function that only rank 0 receives: it alone writes records,
# stops early and tells Tune.
RANK0_ONLY = ("out_dir", "stage_end")


class WorkersResult:
    """What the trainable reads of a multi-worker trial (the objectives and the combined
    ledger), from the files rank 0 wrote under the trial's folder."""

    def __init__(self, out_dir: Path) -> None:
        metrics = read_json(out_dir / "metrics.json")
        self.ledger: dict[str, Any] = read_json(out_dir / "ledger.json")
        self._objectives = {k: float(v) for k, v in metrics["objectives"].items()}

    def objectives(self) -> dict[str, float]:
        return dict(self._objectives)


def run_on_workers(fn: Any, schedule: Schedule, *, workers: int, cpu: float, gpu: float,
                   out_dir: Path, report: Any = None, **kwargs: Any) -> WorkersResult:
    """Run ``fn(schedule, out_dir=..., report=..., **kwargs)`` on ``workers`` Ray Train workers
    holding ``cpu`` CPUs and ``gpu`` GPUs each; return rank 0's result.

    ``fn`` is a ``"module:function"`` name or a picklable callable. ``report`` (the trial's
    reporter) sees every curve row once the workers are done (``observe``); Tune has already
    received them through ``TuneReportCallback``.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    out_dir = Path(out_dir)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"fn": fn, "schedule": schedule, "out_dir": str(out_dir),
                           "kwargs": kwargs},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu > 0,
                                     resources_per_worker={"CPU": cpu, "GPU": gpu}),
        run_config=RunConfig(
            name="train", storage_path=str(out_dir.resolve()),
            # Retrying is the trial's business (Tune's max_retries), not Train's.
            failure_config=FailureConfig(max_failures=0),
            # (Train V2's RunConfig takes its UserCallbacks; Ray's stubs name V1's Callback)
            callbacks=[TuneReportCallback()] if _in_tune_session() else []),  # type: ignore[list-item]
    )
    try:
        trainer.fit()
    except WorkerGroupError as exc:
        # The lowest rank's own exception (a StagePruned, a DeterministicError...), so the
        # trial records it as it would in one process.
        raise exc.worker_failures[min(exc.worker_failures)] from exc
    finally:
        observe = getattr(report, "observe", None)
        curves = out_dir / "curves.jsonl"
        if observe is not None and curves.is_file():
            import json

            for line in curves.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    observe(json.loads(line))
    return WorkersResult(out_dir)


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the trial function, with rank 0's outputs on rank 0 only."""
    import ray.train

    from stagebudget.searching.trainable import Reporter, resolve_trial_fn

    rank = ray.train.get_context().get_world_rank()
    kwargs = dict(config["kwargs"])
    if rank != 0:
        kwargs = {k: v for k, v in kwargs.items() if k not in RANK0_ONLY}
    out_dir = Path(config["out_dir"]) if rank == 0 else None
    resolve_trial_fn(config["fn"])(config["schedule"], out_dir=out_dir,
                                   report=Reporter(ray.train.report), **kwargs)
