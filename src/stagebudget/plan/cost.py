"""Budgets, the cost model, and the planner that turns a budget allocation into a schedule.

The cost model gives device-seconds per training step of a stage. It comes either from a
calibrated table measured on the target hardware (``stagebudget calibrate``) or from an
analytic FLOP estimate. The planner uses it so that every schedule fits its budget by
construction: nothing infeasible is ever launched.

>>> cm = CostModel.analytic(ModelShape.builtin("tiny"))
>>> s = plan_schedule({"sft": 0.25, "rl": 0.75}, {"sft": {"lora_rank": 64},
...                   "rl": {"lora_rank": 4}}, Budget(hours=0.02), cm)
>>> cm.schedule_seconds(s) <= Budget(hours=0.02).seconds
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stagebudget.errors import BudgetError, ConfigError, UserError
from stagebudget.fileio import atomic_write_json, read_json
from stagebudget.kinds import get_kind, stage_kinds
from stagebudget.names import SECONDS_PER_HOUR
from stagebudget.schedule import Schedule, StageSpec, TasksRef

# A trial may use this many times its budget before it is stopped as a runaway. A busy machine
# slows steps 2-3x (two trials beside two busy processes on 2 cores: ~2.5x), and such a trial must
# still finish: the guard is for a cost model that is wrong by more than load explains.
OVERRUN_GUARD = 4.0


# Effective throughput and per-step overheads for the analytic fallback. They are rough on
# purpose; calibrate replaces them with measured numbers for the hardware at hand. cpu: fitted
# (2026-11-24, within 7%) to the step times of builtin:tiny on an idle 2-core CPU, two trials
# at a time, one thread each: in the demo's trials SFT batch 64 full fine-tuning 0.076 s and
# LoRA r16 0.097 s, GRPO with 8 prompts x 8 completions of <= 14 tokens LoRA r4 0.180 s and r16
# 0.190 s; GRPO with 16 prompts ~0.32 s (1.8x the 8-prompt step, measured side by side). The
# constants before, fitted on a loaded machine, priced the 8-prompt GRPO steps at 0.271/0.286 s,
# so an RL stage trained two thirds of the steps its share of the budget paid for. A LoRA adapter
# costs a fixed time per step at this size (28 small adapter modules, each a few extra
# operations forward and backward), more than its FLOPs say, and its rank matters less than they
# say: the replay grid's build (2026-12-07, AVX-512) measured SFT r4 0.111 s, r16 0.107 s and r64
# 0.145 s, against 0.082, 0.095 and 0.147 s here, so the grid prices its steps by that
# measured table instead (search_spaces/paper_grid.cost.json); the demo's results are
# planned with these constants and stay so. Sampling pays ~2 ms per generated
# token whatever the batch (a forward call: it matters for long completions in small batches)
# and runs its FLOPs at a fraction of the training rate (``gen_flops_factor``). cuda: an H100.
_DEVICE = {
    "cpu": {"flops": 4.04e10, "step_overhead": 0.01, "gen_token_overhead": 0.002,
            "lora_step_overhead": 0.023, "gen_flops_factor": 4.5},
    "cuda": {"flops": 1.5e14, "step_overhead": 0.05, "gen_token_overhead": 0.015,
             "lora_step_overhead": 0.0, "gen_flops_factor": 1.0},
}
DEFAULT_SEQ_LEN = 32
# The planner fills this fraction of a budget: step times vary by a few percent from run to run,
# and a stage the budget clock cuts short makes results depend on machine load. The clock still
# enforces the whole budget.
PLAN_FILL = 0.9
# More steps than this in one stage is a unit mistake (a budget in seconds given as hours), not a
# plan: refused with the reason instead of planning billions of steps.
MAX_STAGE_STEPS = 10_000_000


@dataclass(frozen=True)
class Budget:
    """A per-trial (or per-search) budget in device-hours (GPU-hours on a GPU)."""

    hours: float

    def __post_init__(self) -> None:
        if not (isinstance(self.hours, int | float) and math.isfinite(self.hours)) or self.hours <= 0:
            raise BudgetError(f"a budget must be a positive number of device-hours, got {self.hours!r}")

    @property
    def seconds(self) -> float:
        return self.hours * SECONDS_PER_HOUR


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a model."""

    n_params: int
    hidden: int
    layers: int
    intermediate: int

    def adapter_params(self, rank: int) -> int:
        """Parameters of a rank-``rank`` LoRA adapter on the seven projections of every layer
        (``2 r h`` each: square-projection sizes, an estimate for the MLP's)."""
        return 2 * rank * self.hidden * 7 * self.layers

    def trainable_params(self, rank: int) -> int:
        """Parameters a stage of LoRA rank ``rank`` trains (0: full fine-tuning, all of them)."""
        return self.n_params if rank == 0 else self.adapter_params(rank)

    @staticmethod
    def builtin(size: str) -> ModelShape:
        """Shape of a built-in base model, from the config :mod:`stagebudget.modelref` gives."""
        from stagebudget.modelref import SIZES, config_dict

        if size not in SIZES:
            raise ConfigError(f"unknown built-in model size {size!r}; allowed: {', '.join(SIZES)}")
        return ModelShape.from_config(config_dict(size))

    @staticmethod
    def from_config(cfg: Mapping[str, Any]) -> ModelShape:
        """Shape of a Hugging Face ``config.json`` mapping (Llama-style names, GPT-2 fallbacks).

        Counts attention (4 h^2) and MLP (3 h i) weights per layer plus one embedding matrix
        (tied with the output head); norms are negligible.
        """
        cfg = cfg.get("text_config", cfg)
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 768)
        layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 12)
        inter = int(cfg.get("intermediate_size") or 4 * hidden)
        vocab = int(cfg.get("vocab_size") or 32000)
        per_layer = 4 * hidden * hidden + 3 * hidden * inter
        return ModelShape(per_layer * layers + vocab * hidden, hidden, layers, inter)

    @staticmethod
    def for_ref(ref: str) -> ModelShape:
        """Shape of ``builtin:SIZE`` or of a local model directory (read from its config.json)."""
        if ref.startswith("builtin:"):
            return ModelShape.builtin(ref.split(":", 1)[1])
        cfg_path = Path(ref) / "config.json"
        if not cfg_path.is_file():
            # The model resolver gives the precise error later; size it as the tiny model here.
            return ModelShape.builtin("tiny")
        cfg = read_json(cfg_path)
        if not isinstance(cfg, dict):
            raise UserError(f"{cfg_path}: a model config must be a JSON object")
        return ModelShape.from_config(cfg)


@dataclass
class CostModel:
    """Device-seconds per step of a stage, from a calibrated table or an analytic estimate."""

    shape: ModelShape
    device: str = "cpu"
    seq_len: int = DEFAULT_SEQ_LEN
    table: list[dict[str, Any]] = field(default_factory=list)
    source: str = "analytic"
    # The analytic constants of this device kind; written with the table so that a frozen
    # cost model (RUN/cost.json) plans the same schedules after the built-in constants change.
    constants: dict[str, float] | None = None

    @classmethod
    def analytic(cls, shape: ModelShape, device: str = "cpu", seq_len: int = DEFAULT_SEQ_LEN) -> CostModel:
        return cls(shape=shape, device=device, seq_len=seq_len)

    @classmethod
    def load(cls, path: str | Path, shape: ModelShape) -> CostModel:
        """Read a table written by ``stagebudget calibrate``; a damaged one is a UserError naming
        the file and how to remake it."""
        data = read_json(path)
        keys = ("kind", "rank", "batch", "seconds_per_step")
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list) or not all(
                isinstance(e, dict) and all(k in e for k in keys) for e in data["entries"]):
            raise UserError(f"{path}: not a cost table (a JSON object whose `entries` each have "
                            f"{', '.join(keys)}); run `stagebudget calibrate` to remake it")
        return cls(
            shape=shape,
            device=data.get("device", "cpu"),
            seq_len=int(data.get("seq_len", DEFAULT_SEQ_LEN)),
            table=list(data["entries"]),
            source=str(path),
            constants=data.get("constants") if isinstance(data.get("constants"), dict) else None,
        )

    def save(self, path: str | Path, **meta: Any) -> None:
        atomic_write_json(
            path,
            {"device": self.device, "seq_len": self.seq_len, "shape": asdict(self.shape), **meta,
             "constants": self._constants, "entries": self.table},
        )

    # --- per-step cost -------------------------------------------------------------------
    def step_seconds(self, spec: StageSpec) -> float:
        """Device-seconds of one training step of ``spec``.

        Table entries are priced per generation engine (an entry's ``vllm``: its stage sampled
        with vLLM). A vLLM stage without a vLLM entry is priced as transformers' generation
        measured it: vLLM is the faster engine, so the trial trains fewer steps than its
        budget affords, never more (``stagebudget calibrate --space`` measures it)."""
        entries = [e for e in self.table if e["kind"] == spec.kind]
        engine = [e for e in entries if bool(e.get("vllm")) == (spec.vllm is not None)]
        if engine or (entries and spec.vllm is not None):
            return self._from_table(spec, engine or entries)
        return self._analytic(spec)

    def _work(self, spec: StageSpec, completion: float | None = None) -> float:
        """Relative amount of work per step, used to scale calibrated entries. A generating
        stage's completions are ``completion`` tokens long (default: its maximum)."""
        if get_kind(spec.kind).generates:
            length = _completion(spec) if completion is None else completion
            return float(spec.batch_size * _generations(spec) * length)
        return float(spec.batch_size * self._seq_len(spec))

    def _seq_len(self, spec: StageSpec) -> int:
        """Training tokens per sequence of a non-generating stage: its ``max_length`` when set."""
        return spec.max_length or self.seq_len

    def _from_table(self, spec: StageSpec, entries: list[dict[str, Any]]) -> float:
        def rank_distance(e: dict[str, Any]) -> float:
            return abs(math.log2(1 + e["rank"]) - math.log2(1 + spec.lora_rank))

        best = min(entries, key=rank_distance)
        ref = StageSpec(
            kind=spec.kind,
            steps=1,
            lora_rank=best["rank"],
            batch_size=best["batch"],
            **(
                {"num_generations": best["num_generations"],
                 "max_completion_length": best["max_completion_length"]}
                if get_kind(spec.kind).generates
                else {}
            ),
        )
        # Split the measured time into a fixed part and a part proportional to work.
        fixed = min(best["seconds_per_step"], self._constants["step_overhead"])
        # Completions stop early: scale by the lengths the calibration measured, capped by
        # this stage's maximum, not by the maxima alone.
        measured = best.get("mean_completion_length")
        if get_kind(spec.kind).generates and measured:
            scale = (self._work(spec, min(float(measured), _completion(spec)))
                     / self._work(ref, float(measured)))
        else:
            scale = self._work(spec) / self._work(ref)
        return fixed + (best["seconds_per_step"] - fixed) * scale

    @property
    def _dev(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"

    @property
    def _constants(self) -> dict[str, float]:
        return dict(self.constants) if self.constants else dict(_DEVICE[self._dev])

    def _analytic(self, spec: StageSpec) -> float:
        dev = self._constants
        p = self.shape.n_params
        lora_params = self.shape.adapter_params(spec.lora_rank)
        train_factor = 6 if spec.lora_rank == 0 else 4
        # .get: a cost model frozen before these constants existed plans as it did then
        lora_fixed = dev.get("lora_step_overhead", 0.0) if spec.lora_rank else 0.0
        if get_kind(spec.kind).generates:
            gens, comp = _generations(spec), _completion(spec)
            n_seq = spec.batch_size * gens
            tokens = n_seq * (self.seq_len + comp)
            gen_flops = 2 * p * n_seq * comp * dev.get("gen_flops_factor", 1.0)
            train = (train_factor * p + 6 * lora_params) * tokens
            fixed = dev["step_overhead"] * 2 + lora_fixed + comp * dev["gen_token_overhead"]
            return fixed + (gen_flops + train) / dev["flops"]
        tokens = spec.batch_size * self._seq_len(spec)
        return (dev["step_overhead"] + lora_fixed
                + (train_factor * p + 6 * lora_params) * tokens / dev["flops"])

    def schedule_seconds(self, schedule: Schedule) -> float:
        """Planned training device-seconds of a whole schedule."""
        return sum(s.steps * self.step_seconds(s) for s in schedule.stages)

    def schedule_hours(self, schedule: Schedule) -> float:
        """Planned training device-hours of a whole schedule: its nominal, load-free cost."""
        return float(self.schedule_seconds(schedule)) / SECONDS_PER_HOUR


def _generations(spec: StageSpec) -> int:
    """Completions per prompt of a generating stage (filled in by its kind's defaults)."""
    return int(spec.num_generations or 1)


def _completion(spec: StageSpec) -> int:
    """Completion tokens per generation of a generating stage."""
    return int(spec.max_completion_length or 1)


def default_cost_model(base_model: str, device: str = "cpu") -> CostModel:
    """The calibrated table saved for (base model, device) if there is one, else the analytic model."""
    from stagebudget.plan.costtable import default_table_path

    shape = ModelShape.for_ref(base_model)
    path = default_table_path(base_model, device)
    if path.is_file():
        return CostModel.load(path, shape)
    return CostModel.analytic(shape, device=device)


MIN_EVAL_POINTS = 3  # evaluation points in every planned stage after its start (a curve, not a dot)


def eval_interval_for(configured: int, steps: int) -> int:
    """The configured evaluation interval, shortened so a stage of ``steps`` steps is evaluated
    at least ``MIN_EVAL_POINTS`` times after its start (its end included).

    Shortened intervals divide the stage evenly where they can (82 steps: 28, 56 and the end at
    82, not 27, 54, 81 and 82 again), so no evaluation lands a step before the final one.

    >>> eval_interval_for(25, 11), eval_interval_for(25, 300), eval_interval_for(100, 82)
    (4, 25, 28)
    >>> eval_interval_for(25, 4), eval_interval_for(25, 2)
    (1, 1)
    """
    even = -(-steps // MIN_EVAL_POINTS)  # ceil: the end is the last of the points
    if (steps - 1) // even < MIN_EVAL_POINTS - 1:  # too few points before the end
        even = (steps - 1) // (MIN_EVAL_POINTS - 1)
    return max(1, min(configured, even))


def plan_schedule(
    allocation: Mapping[str, float | int],
    stage_params: Mapping[str, Mapping[str, Any]],
    budget: Budget,
    cost: CostModel,
    *,
    mode: str = "share",
    base_model: str = "builtin:tiny",
    tasks: TasksRef | None = None,
    seed: int = 0,
    name: str | None = None,
) -> Schedule:
    """Turn a budget allocation into a schedule that fits ``budget`` by construction.

    ``allocation`` maps stage kind to a share of the budget (``mode="share"``, shares sum to at
    most 1; the planner fills ``PLAN_FILL`` of each share, leaving headroom for timing noise)
    or to a step count (``mode="steps"``). Stages with share or steps 0 are left out.
    Stages run in the canonical order cpt -> sft -> rl; each is evaluated at least
    ``MIN_EVAL_POINTS`` times (see :func:`eval_interval_for`). Raises :class:`BudgetError` when a stage
    given budget cannot fit one step, saying what budget would.
    """
    stages = []
    for kind in stage_kinds():
        amount = allocation.get(kind, 0) or 0
        if amount <= 0:
            continue
        probe = StageSpec(kind=kind, steps=1, **dict(stage_params.get(kind, {})))  # type: ignore[arg-type]
        per_step = cost.step_seconds(probe)
        if mode == "share":
            steps = math.floor(amount * budget.seconds * PLAN_FILL / per_step + 1e-9)
            if steps < 1:
                need_h = per_step / amount / PLAN_FILL / SECONDS_PER_HOUR
                raise BudgetError(
                    f"stage {kind!r} gets {amount:.3g} of a {budget.hours:.4g} device-hour budget "
                    f"({amount * budget.seconds * PLAN_FILL:.2f} s planned), but one step costs "
                    f"{per_step:.2f} s; a "
                    f"budget of at least {need_h:.4g} device-hours would fit one step"
                )
        else:
            steps = int(amount)
        if steps > MAX_STAGE_STEPS:
            raise BudgetError(
                f"stage {kind!r} would plan {steps:,} steps (at {per_step:.3g} s per step), more "
                f"than the {MAX_STAGE_STEPS:,} allowed: the budget or step count is far too large "
                "(budgets are in device-hours, e.g. 0.05 for 3 minutes)")
        stages.append(probe.model_copy(update={
            "steps": steps, "eval_interval": eval_interval_for(probe.eval_interval, steps)}))
    if not stages:
        raise BudgetError("the allocation gives no stage any budget: at least one share must be > 0")
    schedule = Schedule(
        base_model=base_model,
        tasks=tasks or TasksRef(),
        stages=tuple(stages),
        seed=seed,
        budget_hours=budget.hours,
        name=name,
    )
    spent = cost.schedule_seconds(schedule)
    if spent > budget.seconds * (1 + 1e-9):
        raise BudgetError(
            f"the schedule {schedule.describe()} needs {spent:.1f} device-seconds but the budget is "
            f"{budget.seconds:.1f} s ({budget.hours:.4g} h); lower the steps or raise the budget to "
            f"at least {spent / SECONDS_PER_HOUR:.4g} device-hours"
        )
    return schedule
