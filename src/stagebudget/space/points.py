"""Points of a search space planned before anything trains: every probed combination
(:func:`feasibility_params`), the feasibility check over them, and the reference schedules.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from stagebudget.errors import BudgetError, ConfigError, UserError
from stagebudget.kinds import IMITATION, REINFORCEMENT, get_kind
from stagebudget.prefixcache import checkpoint_bytes, stage_keys
from stagebudget.space.dims import Dist

if TYPE_CHECKING:
    from stagebudget.plan.cost import CostModel
    from stagebudget.schedule import Schedule
    from stagebudget.space.schema import SearchSpace


def _point(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def _capacity(rank: Any) -> float:
    """Adapter capacity of a rank: 0 means full fine-tuning, the most capacity of all."""
    return math.inf if rank == 0 else float(rank)


def feasibility_params(space: SearchSpace, limit: int = 4096) -> Iterator[dict[str, Any]]:
    """The points :meth:`check_feasible` plans: every combination of each dimension's
    :meth:`Dist.probe_values` (all choices, every grid value of a small grid, the ends and
    their neighbours otherwise). Past ``limit`` combinations, all-low and all-high first,
    then a seeded sample."""
    dims = space.dimensions()
    names = list(dims)
    values = [dims[n].probe_values() for n in names]
    total = math.prod(len(v) for v in values) if values else 1
    if total <= limit:
        for combo in itertools.product(*values):
            yield dict(zip(names, combo, strict=True))
        return
    yield {n: v[0] for n, v in zip(names, values, strict=True)}
    yield {n: v[-1] for n, v in zip(names, values, strict=True)}
    rng = random.Random(0)
    for _ in range(limit - 2):
        yield {n: rng.choice(v) for n, v in zip(names, values, strict=True)}


def check_feasible(space: SearchSpace, cost: CostModel | None = None) -> tuple[Schedule, Schedule]:
    """Plan the whole space (see :meth:`feasibility_params`); return the cheapest and most
    expensive schedules. Points that cannot fit the budget are one error that names them
    (the first few), how many there are, and what budget would fit them all.
    """
    cost = cost or space.cost_model()
    plans, bad = [], []
    for params in feasibility_params(space):
        try:
            schedule = space.schedule_from_params(params, cost)
        except BudgetError as exc:
            bad.append((params, str(exc)))
            continue
        plans.append((cost.schedule_seconds(schedule), schedule))
    if bad:
        shown = "; ".join(f"at {_point(p)}: {why}" for p, why in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ConfigError(
            f"{len(bad)} of {len(bad) + len(plans)} planned points of the space cannot fit "
            f"the budget{more}: {shown}. Raise the budget, or narrow the ranges that name "
            "these points", source=space.source_file, field="budget.per_trial_hours")
    plans.sort(key=lambda p: p[0])
    return plans[0][1], plans[-1][1]


def reference_points(space: SearchSpace) -> list[tuple[str, dict[str, Any]]]:
    """Reference schedules every front is read against, as params inside this space.

    ``sft_only`` and ``rl_only`` (from the base), and ``heuristic``: the published
    recipe of brief SFT (a quarter of the budget), a larger RL share, and an SFT LoRA rank
    above the RL rank. SFT and RL are the space's stages whose kinds have the imitation and
    the reinforcement role (one of each; sft and rl). A reference that the space cannot
    express is left out.
    """
    pair = _sft_and_rl(space)
    if pair is None:
        return []
    sft, rl = pair
    dims = space.dimensions()
    base: dict[str, Any] = {name: d.middle() for name, d in dims.items()}
    if f"{sft}.lora_rank" in dims and dims[f"{sft}.lora_rank"].type == "categorical":
        base[f"{sft}.lora_rank"] = max(dims[f"{sft}.lora_rank"].choices or (), key=_capacity)
    if f"{rl}.lora_rank" in dims and dims[f"{rl}.lora_rank"].type == "categorical":
        base[f"{rl}.lora_rank"] = min(dims[f"{rl}.lora_rank"].choices or (), key=_capacity)
    refs = []
    for name, sft_share in (("sft_only", 1.0), ("rl_only", 0.0), ("heuristic", 0.25)):
        point = dict(base)
        if not _set_share(space, point, dims, (sft, rl), sft_share):
            continue
        refs.append((name, point))
    return refs


def _sft_and_rl(space: SearchSpace) -> tuple[str, str] | None:
    """The space's imitation and reinforcement stage kinds, if it has exactly one of each."""
    sft = [k for k in space.stages if get_kind(k).role == IMITATION]
    rl = [k for k in space.stages if get_kind(k).role == REINFORCEMENT]
    return (sft[0], rl[0]) if len(sft) == 1 and len(rl) == 1 else None


def _set_share(space: SearchSpace, point: dict[str, Any], dims: dict[str, Dist],
               pair: tuple[str, str], sft_share: float) -> bool:
    """Give the imitation stage ``sft_share`` of the budget (the reinforcement stage takes the
    rest); False when the space cannot: the reinforcement share is not ``rest``, another
    stage's share is searched, or ``sft_share`` is outside the searched range."""
    sft, rl = pair
    if space.mode != "share" or f"{sft}.share" not in dims:
        return False
    others = [k for k in space.stages if k not in pair]
    if space.stages[rl].share != "rest" or any(f"{k}.share" in dims for k in others):
        return False
    d = dims[f"{sft}.share"]
    if d.type == "categorical":
        if sft_share not in (d.choices or ()):
            return False
    elif not (d.low <= sft_share <= d.high):  # type: ignore[operator]
        return False
    point[f"{sft}.share"] = sft_share
    return True


def checkpoint_steps(space: SearchSpace, schedule: Schedule, cost: CostModel) -> list[list[int]]:
    """For each stage of ``schedule``, the step counts this space can plan for the same
    stage after the same earlier stages (every point ``space.feasibility_params()`` plans): the
    prefixes other trials are likely to ask for, where a trial should leave a checkpoint.
    """
    by_key: dict[str, set[int]] = {}
    for params in feasibility_params(space):
        try:
            planned = space.schedule_from_params(params, cost)
        except (ValueError, UserError):
            continue
        for key, stage in zip(stage_keys({}, planned.stages), planned.stages, strict=True):
            by_key.setdefault(key, set()).add(stage.steps)
    return [sorted(s for s in by_key.get(key, ()) if s < stage.steps)
            for key, stage in zip(stage_keys({}, schedule.stages), schedule.stages,
                                  strict=True)]


def largest_cache_entry(space: SearchSpace, cost: CostModel) -> int:
    """The bytes of the largest prefix-cache entry a trial of ``space`` can write: the Trainer
    checkpoint of its widest stage (full fine-tuning trains every parameter, LoRA its
    adapter), over every point ``feasibility_params`` plans."""
    ranks: set[int] = set()
    for params in feasibility_params(space):
        try:
            planned = space.schedule_from_params(params, cost)
        except (ValueError, UserError):
            continue
        ranks.update(stage.lora_rank for stage in planned.stages)
    return max((checkpoint_bytes(cost.shape.trainable_params(r)) for r in ranks), default=0)


def reference_name(params: dict[str, Any],
                   references: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """The name of the reference point ``params`` equals (floats compared with a tolerance)."""
    for name, point in references:
        if point.keys() == params.keys() and all(
                _same(point[k], params[k]) for k in point):
            return name
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)
