"""Run one schedule: base model -> [cpt] -> sft -> rl, merging between stages, measuring as it goes.

Each stage's function is looked up in the kind registry
(:func:`stagebudget.training.stages.get_stage`) and handed the previous stage's merged model.
ID and OOD accuracy are measured at step 0 of every stage (the first point of stage k>0 is the
last of stage k-1, reused, not re-measured), every ``eval_interval`` steps and at the end of
each stage. Every curve row is appended to ``curves.jsonl`` as it is measured and passed to
``report`` (the search forwards it to Ray). A row's ``planned_seconds`` is its budget point by
the cost model (load-independent), ``device_seconds`` the training time measured so far (over
all workers of a data-parallel trial: :mod:`stagebudget.training.distributed`).

Training time is charged to the schedule's budget (``budget_hours``). Every stage trains exactly
its planned steps (the budget was enforced when the schedule was planned), so a result never
depends on machine load; the measured spend and any overrun are recorded in the ledger. A runaway
trial, past the overrun guard, is stopped and fails with :class:`BudgetGuardError`. Exceptions
propagate: a failed trial is a failure, never a zero score.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from stagebudget.errors import BudgetGuardError, TrainingDiverged
from stagebudget.fileio import atomic_write_json
from stagebudget.kinds import get_kind
from stagebudget.names import (
    DEVICE_HOURS,
    ID_ACCURACY,
    OOD_ACCURACY,
    PLANNED_DEVICE_HOURS,
    SECONDS_PER_HOUR,
    STANDARD_ERROR_OF,
)
from stagebudget.plan.cost import OVERRUN_GUARD, CostModel, default_cost_model
from stagebudget.prefixcache import (
    ADAPTER,
    END,
    EVAL,
    MERGED,
    STEP,
    Entry,
    PrefixCache,
    context_key,
    stage_keys,
)
from stagebudget.schedule import Schedule, StageSpec
from stagebudget.stats import OUTCOMES_OF
from stagebudget.training import distributed
from stagebudget.training.clock import BudgetClock, combine_ledgers
from stagebudget.trialresult import TrialResult
from stagebudget.trlconfig import config_class, lora_kwargs, trl_config_kwargs
from stagebudget.version import numerics

if TYPE_CHECKING:
    from stagebudget.training.stages.common import StageOutput

__all__ = ["BudgetGuardError", "TrainingDiverged", "TrialResult", "run_schedule"]

Report = Callable[[dict[str, Any]], None]
StageEnd = Callable[[int, dict[str, Any]], None]


class _Curves:
    """Collects curve rows, appends each to ``curves.jsonl`` and forwards it to ``report``."""

    def __init__(self, out_dir: Path | None, report: Report | None,
                 progress: Report | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.path = out_dir / "curves.jsonl" if out_dir is not None else None
        self.report, self.progress = report, progress
        self.global_offset = 0  # steps taken by the stages before the current one

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
        # Ray's results and the progress display take the numbers; the per-prompt outcomes
        # stay in curves.jsonl and the prefix cache's rows.
        lean = {k: v for k, v in row.items() if k not in OUTCOMES_OF.values()}
        if self.report is not None:
            self.report(lean)
        _emit(self.progress, "eval", **lean)


def _emit(progress: Report | None, event: str, **data: Any) -> None:
    if progress is not None:
        progress({"event": event, **data})


def _latest_signal(kind: str, logs: list[dict[str, Any]]) -> dict[str, Any]:
    """The kind's training signal, its last logged value: ``{"reward": ...}`` for rl,
    ``{"train_loss": ...}`` for cpt and sft (its registered ``signal``; None before any log)."""
    info = get_kind(kind)
    value = next((r[info.signal_log] for r in reversed(logs)
                  if r.get(info.signal_log) is not None), None)
    return {info.signal: value}


@dataclass
class _Run:
    """The state one schedule carries from stage to stage."""

    schedule: Schedule
    model: Any
    tokenizer: Any
    suite: Any
    clock: BudgetClock
    curves: _Curves
    cost: CostModel
    device: str
    max_new_tokens: int
    last_eval: dict[str, Any] | None = None
    stage_metrics: list[dict[str, Any]] = field(default_factory=list)
    prefix: PrefixCache | None = None
    keys: list[str] = field(default_factory=list)
    base_key: str = ""  # where the base model's evaluation is cached
    # A restored stage's model, built only when needed: cached weights to load (None: the
    # current model), then cached adapters to merge onto them, in stage order.
    pending_weights: Path | None = None
    pending_adapters: list[Path] = field(default_factory=list)
    trust_remote_code: bool = False
    checkpoint_steps: Sequence[Sequence[int]] = ()
    recovery_seconds: float = 0.0

    def materialize(self) -> Any:
        """The current model, building restored stages' models when they are pending."""
        if self.pending_weights is not None:
            from stagebudget.training.model import load_model

            self.model = load_model(self.pending_weights, self.device, self.trust_remote_code)
            self.pending_weights = None
        if self.pending_adapters:
            from stagebudget.training.stages.common import apply_adapter

            for folder in self.pending_adapters:
                self.model = apply_adapter(self.model, folder)
            self.model.eval()
            self.pending_adapters = []
        return self.model

    def restore_model(self, entry: Entry) -> None:
        """Make ``entry``'s stage end the current model (built when first needed)."""
        if entry.adapter.is_dir():
            self.pending_adapters.append(entry.adapter)
        else:
            self.pending_weights, self.pending_adapters = entry.merged, []

    def measure(self, model: Any, kind: str, index: int, step: int,
                logs: list[dict[str, Any]]) -> dict[str, Any]:
        """Evaluate ``model`` (charged to evaluation time) and record a curve row."""
        from stagebudget.training.evaluate import evaluate

        with self.clock.evaluating():
            # Several workers: rank 0 evaluates, the others wait for its result (their wait is
            # evaluation time too) and record the same row.
            acc = (evaluate(model, self.tokenizer, self.suite, max_new_tokens=self.max_new_tokens)
                   if distributed.rank() == 0 else None)
            acc = distributed.from_rank0(acc)
        self.record(acc, kind, index, step, logs)
        return acc

    def trial_seconds(self) -> float:
        """Nominal training device-seconds of the trial so far: this process's clock, or the
        sum over the trial's workers (every rank calls this at the same points)."""
        return sum(distributed.gather(self.clock.train_seconds()))

    def planned_seconds(self, step: int) -> float:
        """Planned training device-seconds up to ``step`` of the current stage: the budget point
        of a curve row by the cost model, the same on any load (measured seconds are not)."""
        *done, current = self.clock.stages
        per_step = current.planned_seconds / current.planned_steps if current.planned_steps else 0.0
        return sum(s.planned_seconds for s in done) + per_step * step

    def record(self, acc: dict[str, Any], kind: str, index: int, step: int,
               logs: list[dict[str, Any]]) -> None:
        """Add the curve row of ``acc`` measured at ``step`` of stage ``index``."""
        self.last_eval = _evaluation(acc)
        signal = _latest_signal(kind, logs) if step > 0 else _latest_signal(kind, [])
        self.curves.add({
            "stage": kind, "stage_index": index, "step": step,
            "global_step": self.curves.global_offset + step,
            "device_seconds": self.trial_seconds(),
            "planned_seconds": self.planned_seconds(step),
            **_evaluation(acc),
            **signal,
        })


def _accuracies(values: dict[str, Any]) -> dict[str, float]:
    """The objectives and their standard errors among ``values`` (a curve row, an evaluation)."""
    return {k: values[k] for k in (ID_ACCURACY, OOD_ACCURACY, *STANDARD_ERROR_OF.values())
            if k in values}


def _evaluation(values: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's accuracies, standard errors and per-prompt outcomes among ``values``."""
    return {**_accuracies(values), **{k: values[k] for k in OUTCOMES_OF.values() if k in values}}


def _seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; deterministic cuDNN (cheap at these sizes)."""
    import torch
    import transformers

    transformers.set_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _start(schedule: Schedule, out_dir: Path | None, device: str, cost: CostModel,
           base_dir: Path | None, report: Report | None,
           progress: Report | None, guard: float = OVERRUN_GUARD,
           prefix: PrefixCache | None = None) -> _Run:
    """Load the base model and the suite; open the run's outputs."""
    from stagebudget.chat import check_model_tasks
    from stagebudget.modelref import resolve_base_model
    from stagebudget.tasks import load_suite
    from stagebudget.training.evaluate import max_new_tokens_for
    from stagebudget.training.model import load_model_and_tokenizer

    # Every input is checked before anything is written: bad input leaves no files behind.
    suite = load_suite(**schedule.tasks.suite_args(), base_dir=base_dir)
    _emit(progress, "load", base_model=schedule.base_model)
    path = resolve_base_model(schedule.base_model, base_dir=base_dir)
    model, tokenizer = load_model_and_tokenizer(path, device=device,
                                                trust_remote_code=schedule.trust_remote_code)
    for warning in check_model_tasks(tokenizer, suite, schedule.base_model):
        logging.getLogger("stagebudget").warning(warning)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        schedule.save(out_dir / "schedule.yaml")
        (out_dir / "curves.jsonl").write_text("")  # a fresh run starts a fresh curve file
    budget = schedule.budget_hours * SECONDS_PER_HOUR if schedule.budget_hours is not None else None
    import time

    import torch

    if budget is not None:  # each of several workers holds its share of the trial's budget
        budget /= distributed.world_size()
    clock = BudgetClock(budget, device=device, guard=guard, cpu_timer=time.process_time,
                        threads=torch.get_num_threads())
    run = _Run(schedule, model, tokenizer, suite, clock, _Curves(out_dir, report, progress),
               cost, device, max_new_tokens_for(suite, tokenizer),
               trust_remote_code=schedule.trust_remote_code)
    if prefix is not None:
        # Several workers: rank 0 decides what is restored and writes each entry once.
        run.prefix = (prefix if distributed.world_size() == 1
                      else cast(PrefixCache, distributed.SharedCache(prefix)))
        context = run_context(schedule, path, suite, device)
        run.keys = stage_keys(context, schedule.stages)
        run.base_key = context_key(context)
        changes = prefix.numerics_changes(context)
        if changes:
            logging.getLogger("stagebudget").warning(
                "prefix cache %s holds stages of this base model, data and seed trained with "
                "other numerics (%s); they are not reused, so these stages train again",
                prefix.root, "; ".join(changes))
    return run


def run_context(schedule: Schedule, model_path: Path, suite: Any, device: str) -> dict[str, Any]:
    """What every stage of ``schedule`` depends on besides the stage specs: the base model's
    content, the task data, the seed and this machine's numerics (device kind, torch threads,
    CPU kernels, package versions). Part of every prefix-cache key."""
    import torch

    from stagebudget.modelref import model_identity

    workers = distributed.world_size()  # data-parallel sums differ from one process's
    return {"base_model": model_identity(model_path), "data": suite.digest(),
            "seed": schedule.seed, "device": device.split(":")[0],
            "threads": torch.get_num_threads(), **numerics(),
            "trust_remote_code": schedule.trust_remote_code,
            **({"workers": workers} if workers > 1 else {})}


def _run_stage(run: _Run, index: int, spec: StageSpec, progress: Report | None) -> None:
    """Run stage ``index``: restore it from the prefix cache when a trial has trained it
    already, otherwise train it (from its longest cached prefix, holding its cache lock)."""
    per_step = run.cost.step_seconds(spec)
    run.clock.begin_stage(spec.kind, index, planned_steps=spec.steps,
                          planned_seconds=per_step * spec.steps)
    _emit(progress, "stage_start", stage=spec.kind, stage_index=index, steps=spec.steps)
    if run.prefix is None:
        _train_stage(run, index, spec, None)
    elif not _restore(run, index, spec):
        # another trial may train it meanwhile, or pass this stage's end in a longer one
        with run.prefix.training(run.keys[index], spec.steps):
            if not _restore(run, index, spec):
                _train_stage(run, index, spec,
                             run.prefix.latest_checkpoint(run.keys[index], spec.steps))
    _emit(progress, "stage_end", stage=spec.kind, stage_index=index,
          steps_done=run.clock.current.steps_done)


def _restore(run: _Run, index: int, spec: StageSpec) -> bool:
    """Take stage ``index`` whole from the cache (its rows, spend, metrics and model, built
    only when needed); False when no trial has trained it."""
    assert run.prefix is not None
    entry = run.prefix.find(run.keys[index], END, spec.steps)
    if entry is None:
        return False
    records = entry.records()
    _replay(run, index, records)
    run.clock.end_stage(records["steps"])
    run.restore_model(entry)
    run.curves.global_offset += records["steps"]
    run.stage_metrics.append(dict(records["metrics"]))
    return True


def _replay(run: _Run, index: int, records: dict[str, Any]) -> None:
    """Add a cached prefix's curve rows to this run and credit its spend to the current stage.
    Budget points are re-based on this run: measured seconds on its own nominal clock, planned
    seconds on its cost model."""
    start = run.trial_seconds()
    for cached in records["rows"]:
        row = {**cached, "stage_index": index,
               "global_step": run.curves.global_offset + cached["step"],
               "device_seconds": start + cached["device_seconds"] - records["start_seconds"],
               "planned_seconds": run.planned_seconds(cached["step"])}
        run.curves.add(row)
        run.last_eval = _evaluation(row)
    # An entry trained by several workers holds each one's spend: each credits its own.
    own = records.get("workers", [records])[distributed.rank()]
    run.clock.credit(records["steps"], own["train_seconds"], own["eval_seconds"],
                     own.get("guard_seconds"))


def _stage_records(run: _Run, index: int, steps: int, logs: list[dict[str, Any]],
                   start_seconds: float, **extra: Any) -> dict[str, Any]:
    """What a cache entry of stage ``index`` after ``steps`` steps records besides its files."""
    train, evaluation = run.clock.stage_seconds()
    spend = {"train_seconds": train, "eval_seconds": evaluation,
             "guard_seconds": run.clock.stage_guarded_seconds()}
    workers = distributed.gather(spend)  # every rank calls this, at the same points
    return {"steps": steps, "rows": [r for r in run.curves.rows if r["stage_index"] == index],
            "logs": [r for r in logs if r.get("step", 0) <= steps], **spend,
            "start_seconds": start_seconds, **({"workers": workers} if len(workers) > 1 else {}),
            **extra}


class _Publisher:
    """Publishes each Trainer checkpoint of stage ``index`` to the prefix cache. Checkpoints
    at steps other trials can plan (``keep``; None: every step) and at the stage's end stay; a
    recovery checkpoint (any other step) is removed when a newer one lands and when the stage
    ends."""

    def __init__(self, run: _Run, index: int, logs: list[dict[str, Any]], start_seconds: float,
                 keep: frozenset[int] | None) -> None:
        assert run.prefix is not None
        self.run, self.index, self.logs, self.start, self.keep = run, index, logs, start_seconds, keep
        self.recovery: Entry | None = None

    def __call__(self, step: int, folder: str) -> None:
        run, prefix = self.run, self.run.prefix
        assert prefix is not None
        with run.clock.setting_up():
            records = _stage_records(run, self.index, step, self.logs, self.start)
            entry = prefix.publish(run.keys[self.index], STEP, step, records,
                                   lambda d: shutil.copytree(folder, d / "checkpoint",
                                                             ignore=shutil.ignore_patterns(
                                                                 "training_args.bin")))
            self.finish(step)
            if entry is not None and self.keep is not None and step not in self.keep:
                self.recovery = entry

    def finish(self, end: int) -> None:
        """Remove the recovery checkpoint unless it is the one at ``end`` (the stage's end)."""
        if self.recovery is not None and self.recovery.steps != end:
            assert self.run.prefix is not None
            self.run.prefix.remove(self.recovery)
        self.recovery = None


def _measure_base(run: _Run, spec: StageSpec, index: int) -> None:
    """Evaluate the base model (the first curve point), or take the evaluation another trial
    made of the same base model on the same data from the prefix cache."""
    cached = run.prefix.find(run.base_key, EVAL, 0) if run.prefix is not None else None
    if cached is not None:
        records = cached.records()
        run.clock.current.reused_eval_seconds += records["eval_seconds"]
        run.record(records["acc"], spec.kind, index, 0, [])
        return
    before = run.clock.current.eval_seconds
    acc = run.measure(run.model, spec.kind, index, 0, [])
    if run.prefix is not None:
        records = {"acc": acc, "eval_seconds": run.clock.current.eval_seconds - before}
        run.prefix.publish(run.base_key, EVAL, 0, records, lambda folder: None)


def _train_stage(run: _Run, index: int, spec: StageSpec, resume: Entry | None) -> None:
    """Train stage ``index`` (going on from ``resume``, a cached checkpoint of it, if given):
    evaluate at its start, run it, merge, evaluate at its end, publish it to the cache."""
    from stagebudget.training.stages import StageContext, get_stage

    with run.clock.setting_up():
        run.materialize()
    start_seconds = run.trial_seconds()
    logs: list[dict[str, Any]] = []
    measure_on_resume = False
    if resume is not None:
        assert run.prefix is not None
        # A stage that ended at the checkpoint's step also recorded its final evaluation.
        ended = run.prefix.find(run.keys[index], END, resume.steps)
        records = (ended or resume).records()
        _replay(run, index, records)
        logs.extend(records["logs"])
        measure_on_resume = (resume.steps % spec.eval_interval == 0
                             and run.curves.rows[-1]["step"] != resume.steps)
    elif run.last_eval is None:
        _measure_base(run, spec, index)
    else:  # the first point of this stage is the last one of the previous stage
        run.record(run.last_eval, spec.kind, index, 0, [])
    # The steps other trials of the space can plan for this stage; outside a search (none
    # known) every checkpoint is kept, since any later run may ask for any of them.
    planned = run.checkpoint_steps[index] if index < len(run.checkpoint_steps) else None
    keep = frozenset(planned or ())
    publisher = (_Publisher(run, index, logs, start_seconds, keep if planned is not None else None)
                 if run.prefix is not None else None)
    ctx = StageContext(
        model=run.model, tokenizer=run.tokenizer, suite=run.suite, spec=spec, stage_index=index,
        clock=run.clock, evaluate=lambda m, s: {}, seed=run.schedule.seed, device=run.device,
        logs=logs, resume_from=str(resume.checkpoint) if resume is not None else None,
        on_checkpoint=publisher, checkpoint_at=keep, recovery_seconds=run.recovery_seconds,
        evaluate_on_resume=measure_on_resume, keep_adapter=run.prefix is not None)
    ctx.evaluate = lambda model, step: run.measure(model, spec.kind, index, step, ctx.logs)
    # Every stage starts from the same random state, whatever ran before it in this process:
    # a stage after one restored from the prefix cache (nothing trained, no random numbers
    # drawn) initialises its LoRA adapter exactly as after one trained here.
    _seed_everything(run.schedule.seed)
    out = get_stage(spec.kind)(ctx)
    if publisher is not None:
        publisher.finish(out.steps_done)
    run.clock.end_stage(out.steps_done)
    if run.clock.current.stopped_by_guard:
        raise BudgetGuardError(
            f"stage {index} ({spec.kind}) was stopped after {out.steps_done} of {spec.steps} "
            f"steps: the trial had used {run.clock.guarded_seconds():.1f} device-seconds, more than "
            f"{run.clock.guard:g} x its budget of {run.clock.budget_seconds:.1f} s. The cost model "
            "under-estimates this machine: run `stagebudget calibrate` (under the search's "
            "concurrency) or raise the budget")
    run.model = out.model
    last = run.curves.rows[-1]
    if not (last["stage_index"] == index and last["step"] == out.steps_done):
        run.measure(run.model, spec.kind, index, out.steps_done, ctx.logs)
    run.curves.global_offset += out.steps_done
    run.stage_metrics.append(dict(out.metrics))
    if run.prefix is not None:
        with run.clock.setting_up():
            records = _stage_records(run, index, out.steps_done, ctx.logs, start_seconds,
                                     metrics=out.metrics)
            run.prefix.publish(run.keys[index], END, out.steps_done, records,
                               lambda d: _fill_end(d, out))
    if out.adapter is not None:
        shutil.rmtree(out.adapter, ignore_errors=True)


def _fill_end(folder: Path, out: StageOutput) -> None:
    """A stage end's files: a LoRA stage's adapter, or a full fine-tuning stage's weights."""
    if out.adapter is not None:
        shutil.copytree(out.adapter, folder / ADAPTER)
    else:
        out.model.save_pretrained(str(folder / MERGED), safe_serialization=True)


def run_schedule(
    schedule: Schedule,
    out_dir: Path | None = None,
    *,
    report: Report | None = None,
    save_model: bool = False,
    device: str = "auto",
    cost: CostModel | None = None,
    base_dir: Path | None = None,
    progress: Report | None = None,
    guard: float = OVERRUN_GUARD,
    stage_end: StageEnd | None = None,
    prefix_cache: PrefixCache | None = None,
    checkpoint_steps: Sequence[Sequence[int]] = (),
    recovery_seconds: float = 0.0,
) -> TrialResult:
    """Train ``schedule`` stage by stage and measure it; write its records under ``out_dir``.

    Writes ``schedule.yaml``, ``curves.jsonl`` (row by row), ``ledger.json``, ``metrics.json``
    and, with ``save_model``, the final merged model to ``model/``. ``report`` receives every
    curve row; ``progress`` receives events (``load``, ``stage_start``, ``eval``,
    ``stage_end``, ``done``). ``stage_end(index, row)`` is called after every stage but the last
    with the curve row measured at its end; it may raise to stop the trial there (early
    stopping). Every stage trains its planned steps; ``guard`` (times the
    schedule's budget) stops a runaway trial with :class:`BudgetGuardError`. Raises
    :class:`TrainingDiverged` on a NaN/inf loss; any exception propagates after the ledger so
    far is written.
    """
    from stagebudget.training.stages.common import no_progress_bars, resolve_device

    no_progress_bars()  # before the model loads: transformers draws a bar over its weights
    # Stages report to no tracker (report_to="none"; a search logs to MLflow from its driver),
    # but TRL imports mlflow whenever it is installed: about 1 s per process idle, more under
    # load (bench/RESULTS.md). transformers' own switch turns that off; a user's value wins.
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    out = Path(out_dir) if out_dir is not None else None
    dev = resolve_device(device)
    _seed_everything(schedule.seed)
    cost_model = cost if cost is not None else default_cost_model(schedule.base_model, dev)
    run = _start(schedule, out, dev, cost_model, base_dir, report, progress, guard,
                 prefix_cache)
    run.checkpoint_steps, run.recovery_seconds = checkpoint_steps, recovery_seconds
    ledger: dict[str, Any] | None = None
    try:
        for index, spec in enumerate(schedule.stages):
            _run_stage(run, index, spec, progress)
            if stage_end is not None and index < len(schedule.stages) - 1:
                _stage_end(stage_end, index, dict(run.curves.rows[-1]))
        ledger = _trial_ledger(run)
    finally:
        if out is not None:
            atomic_write_json(out / "ledger.json", ledger or run.clock.ledger())
    result = _result(run, ledger)
    if out is not None:
        atomic_write_json(out / "metrics.json", result.metrics)
        if save_model:
            run.materialize().save_pretrained(str(out / "model"), safe_serialization=True)
            run.tokenizer.save_pretrained(str(out / "model"))
    _emit(progress, "done", **result.objectives())
    return result


def _stage_end(stage_end: StageEnd, index: int, row: dict[str, Any]) -> None:
    """Call ``stage_end`` (early stopping) on rank 0; every rank raises what it raised."""
    error: BaseException | None = None
    if distributed.rank() == 0:
        try:
            stage_end(index, row)
        except Exception as exc:  # handed to every rank, then raised
            error = exc
    error = distributed.from_rank0(error)
    if error is not None:
        raise error


def _trial_ledger(run: _Run) -> dict[str, Any]:
    """The trial's ledger: this process's, or with several workers every worker's combined
    (device-seconds summed over workers, each worker's own spend listed under ``workers``)."""
    import socket

    if distributed.world_size() == 1:
        return run.clock.ledger()
    return combine_ledgers(distributed.gather({**run.clock.ledger(),
                                               "host": socket.gethostname()}))


def _result(run: _Run, ledger: dict[str, Any] | None = None) -> TrialResult:
    """Objectives, per-stage metrics and planned-vs-measured seconds of a finished run."""
    ledger = ledger if ledger is not None else run.clock.ledger()
    final = run.last_eval or {ID_ACCURACY: math.nan, OOD_ACCURACY: math.nan}
    planned_hours = run.cost.schedule_hours(run.schedule)
    stages = []
    for spec, entry, metrics in zip(run.schedule.stages, ledger["stages"], run.stage_metrics,
                                    strict=True):
        planned = entry["planned_seconds"]
        measured = entry["train_seconds"] + entry["reused_train_seconds"]
        stages.append({
            "kind": entry["kind"], "stage_index": entry["index"],
            "steps": entry["planned_steps"], "steps_done": entry["steps_done"],
            "planned_seconds": planned, "measured_seconds": measured,
            "measured_over_planned": measured / planned if planned > 0 else None,
            "seconds_per_step": measured / entry["steps_done"] if entry["steps_done"] else None,
            "stopped_by_guard": entry["stopped_by_guard"],
            "reused_steps": entry["reused_steps"],
            # the algorithm as TRL was told it, pinned settings included (the export writes it too)
            "trl": {"config": config_class(spec), "args": trl_config_kwargs(spec, run.schedule.seed)},
            "peft": lora_kwargs(spec),  # the adapter as PEFT was told it (None: full fine-tuning)
            **{k: v for k, v in metrics.items() if k != "reward_per_step"},
        })
    errors = {se: final[se] for se in STANDARD_ERROR_OF.values() if se in final}
    objectives = {ID_ACCURACY: final[ID_ACCURACY], OOD_ACCURACY: final[OOD_ACCURACY],
                  DEVICE_HOURS: ledger["device_hours"], **errors}
    metrics = {
        "objectives": objectives,
        "schedule": run.schedule.describe(),
        "digest": run.schedule.digest(),
        "device": run.device,
        "cost_source": run.cost.source,
        PLANNED_DEVICE_HOURS: planned_hours,
        "device_hours": ledger["device_hours"],
        "spent_device_hours": ledger["spent_device_hours"],
        "measured_over_planned": (ledger["device_hours"] / planned_hours
                                  if planned_hours > 0 else None),
        "eval_seconds": ledger["eval_seconds"],
        "over_budget": ledger["over_budget"],
        "stages": stages,
    }
    return TrialResult(run.schedule, final[ID_ACCURACY], final[OOD_ACCURACY],
                       ledger["device_hours"], planned_hours, list(run.curves.rows), ledger,
                       metrics, errors)
