"""Measure seconds per training step of each stage kind on this hardware: the cost table.

Real steps of the real stages (TRL trainers, LoRA or full fine-tuning) are timed at a few ranks
with the default batch sizes, after warm-up steps that are not counted. The table is saved where
:func:`stagebudget.plan.cost.default_cost_model` and the planner find it.

    >>> cm = calibrate("builtin:test", kinds=("sft",), ranks=(4,), steps=1)  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stagebudget.errors import UserError
from stagebudget.kinds import get_kind, stage_kinds
from stagebudget.plan.cost import CostModel, ModelShape
from stagebudget.plan.costtable import default_table_path
from stagebudget.schedule import StageSpec
from stagebudget.training.clock import BudgetClock
from stagebudget.training.vllmcheck import check_vllm

DEFAULT_RANKS = (0, 4, 16, 64)
COMPLETION_LENGTH_LOG = "completions/mean_length"  # TRL GRPO's logged mean completion length
SFT_BATCH = 32
RL_PROMPTS = 16


def calibration_spec(kind: str, rank: int, steps: int) -> StageSpec:
    """The stage measured for ``kind`` at ``rank``: default batch sizes (generation settings
    are the kind's defaults), no evaluation."""
    if get_kind(kind).generates:
        return StageSpec(kind=kind, steps=steps, lora_rank=rank, batch_size=RL_PROMPTS,
                         learning_rate=1e-3, eval_interval=steps + 1)
    return StageSpec(kind=kind, steps=steps, lora_rank=rank,
                     batch_size=SFT_BATCH, eval_interval=steps + 1)


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        """Seconds between consecutive step ends (the whole loop iteration the budget charges)."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.marks = [time.perf_counter()]

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.marks.append(time.perf_counter())

        def durations(self) -> list[float]:
            return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]

    return StepTimer()


def time_stage(model_path: Path, suite: Any, spec: StageSpec, warmup: int, device: str) -> float:
    """Median seconds per step of ``spec`` after ``warmup`` uncounted steps (fresh base model)."""
    return measure_stage(model_path, suite, spec, warmup, device)["seconds_per_step"]


def measure_stage(model_path: Path, suite: Any, spec: StageSpec, warmup: int,
                  device: str) -> dict[str, Any]:
    """``{"seconds_per_step", "mean_completion_length"}`` of ``spec`` after ``warmup``
    uncounted steps (fresh base model); the completion length is what a generating stage
    really produced (None for other kinds)."""
    from stagebudget.training.model import load_model_and_tokenizer
    from stagebudget.training.stages import StageContext, get_stage

    model, tokenizer = load_model_and_tokenizer(model_path, device=device)
    clock = BudgetClock(None, device=device)
    clock.begin_stage(spec.kind, 0, planned_steps=spec.steps, planned_seconds=0.0)
    timer = _step_timer()
    ctx = StageContext(model=model, tokenizer=tokenizer, suite=suite, spec=spec, stage_index=0,
                       clock=clock, evaluate=lambda m, s: {}, device=device,
                       extra_callbacks=[timer])
    get_stage(spec.kind)(ctx)
    timed = timer.durations()[warmup:]
    if not timed:
        raise RuntimeError(f"calibrating {spec.kind} r{spec.lora_rank}: no step was timed")
    lengths = [float(r[COMPLETION_LENGTH_LOG]) for r in ctx.logs
               if r.get(COMPLETION_LENGTH_LOG) is not None]
    return {"seconds_per_step": float(statistics.median(timed)),
            "mean_completion_length": statistics.mean(lengths) if lengths else None}


def calibrate(
    base_model: str = "builtin:tiny",
    device: str = "auto",
    kinds: Sequence[str] | None = None,
    ranks: Sequence[int] = DEFAULT_RANKS,
    steps: int = 3,
    *,
    warmup: int = 1,
    out: Path | None = None,
    progress: Callable[[str], None] | None = None,
    tasks: str | None = None,
) -> CostModel:
    """Time ``steps`` real steps (after ``warmup``) of each kind at each rank; save the table.

    Entries are ``{"kind", "rank", "batch", "num_generations", "max_completion_length",
    "seconds_per_step"}``. Saved to ``out`` or to ``costtable.default_table_path(base_model,
    device)``; returns the calibrated :class:`CostModel`. ``tasks`` (a JSONL task file) times
    the steps on your own prompts and answers instead of the built-in suite's.
    """
    from stagebudget.modelref import resolve_base_model
    from stagebudget.tasks import load_suite
    from stagebudget.training.stages.common import resolve_device

    kinds = stage_kinds() if kinds is None else kinds
    _check_args(kinds, ranks, steps, warmup)
    dev = resolve_device(device)
    path = resolve_base_model(base_model)
    suite = (load_suite(n_train=512, n_id_test=1, n_ood_test=1, seed=0) if tasks is None
             else load_suite(str(Path(tasks).expanduser().resolve())))
    say = progress or (lambda _msg: None)
    entries = []
    for kind in kinds:
        for rank in ranks:
            spec = calibration_spec(kind, rank, warmup + steps)
            seconds = time_stage(path, suite, spec, warmup, dev)
            entries.append({
                "kind": kind, "rank": rank, "batch": spec.batch_size,
                "num_generations": spec.num_generations,
                "max_completion_length": spec.max_completion_length,
                "seconds_per_step": seconds,
            })
            say(f"{kind} r{rank}: {seconds:.3f} s/step")
    target = Path(out) if out is not None else default_table_path(base_model, dev)
    cost = CostModel(shape=ModelShape.for_ref(base_model), device=dev, table=entries,
                     source=str(target), seq_len=measured_seq_len(path, suite))
    cost.save(target, base_model=base_model, steps=steps, warmup=warmup,
              measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return cost


def measured_seq_len(model_path: Path, suite: Any) -> int:
    """Tokens per sft sequence in the calibration (its longest example: nothing is cut).

    The planner scales the table by a stage's ``max_length`` against this length.
    """
    from stagebudget.chat import longest_sft_example
    from stagebudget.modelref import load_tokenizer

    return longest_sft_example(load_tokenizer(model_path), suite)


def _check_args(kinds: Sequence[str], ranks: Sequence[int], steps: int, warmup: int) -> None:
    unknown = [k for k in kinds if k not in stage_kinds()]
    if unknown:
        raise UserError(f"unknown stage kind {unknown[0]!r}; allowed: {', '.join(stage_kinds())}")
    if not kinds or not ranks:
        raise UserError("calibrate needs at least one stage kind and one rank")
    if any(r < 0 for r in ranks):
        raise UserError(f"LoRA ranks must be >= 0 (0 = full fine-tuning), but got {list(ranks)}")
    if steps < 1 or warmup < 0:
        raise UserError(f"steps must be >= 1 and warmup >= 0, but got steps={steps}, "
                        f"warmup={warmup}")


# --- calibrating a search space -----------------------------------------------------------------
def space_specs(space: Any, steps: int) -> list[StageSpec]:
    """One spec per distinct cost shape the space can plan (kind, rank, batch, generation and
    length settings, generation engine; learning rates do not change a step's cost), each
    ``steps`` long."""
    cost = space.cost_model("cpu")
    seen: dict[str, StageSpec] = {}
    for params in space.feasibility_params():
        try:
            planned = space.schedule_from_params(params, cost)
        except (ValueError, UserError):
            continue
        for stage in planned.stages:
            shape = stage.model_copy(update={"steps": steps, "eval_interval": steps + 1,
                                             "learning_rate": 1e-4})
            seen.setdefault(shape.model_dump_json(), shape)
    return list(seen.values())


def _measure_in_process(job: tuple[str, str, dict[str, Any], int, str, int]) -> dict[str, Any]:
    """One worker of a concurrent calibration: ``threads`` torch threads, as a Ray trial."""
    import json

    import torch

    model_path, suite_json, spec_data, warmup, device, threads = job
    torch.set_num_threads(threads)
    suite = load_suite_for(json.loads(suite_json))
    return measure_stage(Path(model_path), suite, StageSpec(**spec_data), warmup, device)


def calibrate_space(space_file: Path, *, steps: int = 3, warmup: int = 1, out: Path | None = None,
                    progress: Callable[[str], None] | None = None) -> CostModel:
    """Calibrate for one search space: its base model, tasks and device, every stage shape it
    can plan, timed by ``concurrency`` processes at once with the threads each trial gets
    (``resources_per_trial.cpu``), as the search will run them; RL steps at the completion
    lengths they really produce. Saved to ``out``, else the space's ``cost_table``, else the
    default table of its model and device."""
    import json
    import multiprocessing

    from stagebudget.modelref import resolve_base_model
    from stagebudget.space.schema import SearchSpace
    from stagebudget.training.stages.common import resolve_device

    space = SearchSpace.load(space_file)
    check_vllm(space.stages.items(), space_file)
    base_dir = Path(space_file).resolve().parent
    _check_args(["sft"], [0], steps, warmup)
    device = resolve_device(space.device, gpus=space.resources_per_trial.gpu)
    path = resolve_base_model(space.base_model, base_dir=base_dir)
    suite_args = {**space.tasks.suite_args(), "base_dir": str(base_dir)}
    threads = max(1, int(space.resources_per_trial.cpu))
    say = progress or (lambda _msg: None)
    entries = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(space.concurrency) as pool:
        for spec in space_specs(space, warmup + steps):
            job = (str(path), json.dumps(suite_args), spec.model_dump(), warmup, device, threads)
            runs = pool.map(_measure_in_process, [job] * space.concurrency)
            seconds = statistics.mean(r["seconds_per_step"] for r in runs)
            lengths = [r["mean_completion_length"] for r in runs
                       if r["mean_completion_length"] is not None]
            entries.append({
                "kind": spec.kind, "rank": spec.lora_rank, "batch": spec.batch_size,
                "num_generations": spec.num_generations,
                "max_completion_length": spec.max_completion_length,
                "mean_completion_length": statistics.mean(lengths) if lengths else None,
                "vllm": spec.vllm is not None,
                "seconds_per_step": seconds,
            })
            say(f"{spec.kind} r{spec.lora_rank} batch {spec.batch_size}: {seconds:.3f} s/step "
                f"({space.concurrency} at once, {threads} thread(s) each)")
    target = (Path(out) if out is not None else
              Path(space.cost_table) if space.cost_table else
              default_table_path(space.base_model, device))
    suite = load_suite_for(suite_args)
    cost = CostModel(shape=ModelShape.for_ref(str(path) if not space.base_model.startswith(
        "builtin:") else space.base_model), device=device, table=entries, source=str(target),
        seq_len=measured_seq_len(path, suite))
    cost.save(target, base_model=space.base_model, space=str(space_file), steps=steps,
              warmup=warmup, concurrency=space.concurrency, threads_per_trial=threads,
              measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return cost


def load_suite_for(suite_args: dict[str, Any]) -> Any:
    """The task suite of ``load_suite`` keyword arguments (``base_dir`` as a string)."""
    from stagebudget.tasks import load_suite

    base_dir = suite_args.get("base_dir")
    return load_suite(**{**suite_args, "base_dir": Path(base_dir) if base_dir else None})
