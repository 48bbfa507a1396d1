"""The distribution schema of a search space: :class:`Dist` (the short YAML form), its one
conversion to Optuna (:func:`to_optuna`), and a stage's fixed or searched fields (``StageDims``).
"""

from __future__ import annotations

import functools
import math
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from stagebudget.schedule import StageSpec, Strict, VLLMSpec

# Stage settings a space gives as they are, never searched: how a stage computes, not a choice
# the budget trades (vLLM generation is a machine setting with its own mapping).
FIXED_FIELDS = ("vllm",)
TUNABLE_FIELDS = tuple(f for f in StageSpec.model_fields
                       if f not in ("kind", "steps", *FIXED_FIELDS))


class Dist(Strict):
    """One searched dimension: ``{type: float, low: 1e-4, high: 1e-2, log: true}``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> Dist:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("`choices` must be a non-empty list for type categorical")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"`choices` must not repeat a value, got {list(self.choices)}")
            kinds = {"number" if isinstance(c, int | float) and not isinstance(c, bool)
                     else type(c).__name__ for c in self.choices}
            if len(kinds) > 1:
                raise ValueError(f"`choices` must all be of one type, got {sorted(kinds)} in "
                                 f"{list(self.choices)}")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("type categorical takes only `choices` (no low/high/log/step)")
            return self
        if self.choices is not None:
            raise ValueError(f"`choices` is only for type categorical, not {self.type}")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type} needs both `low` and `high`")
        if self.low > self.high:
            raise ValueError(f"`low <= high` must hold, but got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, but got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("`log` and `step` cannot be combined (Optuna forbids it)")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"`step` must be > 0, got {self.step}")
        if self.step is not None:
            n = (self.high - self.low) / self.step
            if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
                raise ValueError(
                    f"`step` {self.step:g} does not divide the range {self.low:g}..{self.high:g} "
                    f"(Optuna would silently cut it to {self.low + math.floor(n) * self.step:g}); "
                    "change `high` or `step`")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"type int needs integer low/high, got {self.low}..{self.high}")
        return self

    def corners(self) -> list[Any]:
        """Extreme values (all choices for categorical): used to cost the space's edges."""
        if self.type == "categorical":
            return list(self.choices or ())
        lo, hi = self.low, self.high
        return [int(lo), int(hi)] if self.type == "int" else [lo, hi]  # type: ignore[arg-type]

    def probe_values(self, small_grid: int = 16) -> list[Any]:
        """Values that decide whether a dimension fits a budget: every choice, every value of a
        grid of at most ``small_grid`` values, else the two ends and their grid neighbours
        (a share one step above 0 is where a stage can no longer fit one step)."""
        if self.type == "categorical":
            return list(self.choices or ())
        if self.type == "int" or self.step is not None:
            lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
            step = self.step if self.step is not None else 1
            n = math.floor((hi - lo) / step + 1e-9) + 1
            if n <= small_grid:
                return self.grid()
            ends = [lo, lo + step, lo + (n - 2) * step, lo + (n - 1) * step]
            return list(dict.fromkeys(int(v) if self.type == "int" else round(v, 12)
                                      for v in ends))
        return self.corners()

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler; continuous ranges need a ``step``."""
        if self.type == "categorical":
            return list(self.choices or ())
        lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None:
            raise ValueError("the grid sampler needs `step` on every float dimension")
        n = math.floor((hi - lo) / step + 1e-9) + 1
        values = [lo + i * step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]

    def middle(self) -> Any:
        """A representative value inside the range (geometric middle for log ranges)."""
        if self.type == "categorical":
            return (self.choices or ())[len(self.choices or ()) // 2]
        lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
        mid = math.sqrt(lo * hi) if self.log else (lo + hi) / 2
        if self.step is not None:
            mid = lo + round((mid - lo) / self.step) * self.step
        return round(mid) if self.type == "int" else mid


def to_optuna(dist: Dist) -> Any:
    """The single converter from the YAML schema to an Optuna distribution."""
    import optuna.distributions as od

    if dist.type == "categorical":
        return od.CategoricalDistribution(list(dist.choices or ()))
    if dist.type == "int":
        step = int(dist.step) if dist.step is not None else 1
        return od.IntDistribution(int(dist.low), int(dist.high), log=dist.log, step=step)  # type: ignore[arg-type]
    return od.FloatDistribution(dist.low, dist.high, log=dist.log, step=dist.step)  # type: ignore[arg-type]


class _StageDimsBase(Strict):
    """A stage's budget amount; :data:`StageDims` adds every tunable :class:`StageSpec` field."""

    share: Dist | float | Literal["rest"] | None = None
    steps: Dist | int | None = None
    vllm: VLLMSpec | None = None

    @field_validator("*")
    @classmethod
    def _within_stage_spec(cls, v: Any, info: Any) -> Any:
        if info.field_name in TUNABLE_FIELDS and v is not None:
            check_stage_value(info.field_name, v)
        return v

    @model_validator(mode="after")
    def _amount(self) -> _StageDimsBase:
        if (self.share is None) == (self.steps is None):
            raise ValueError("give exactly one of `share` (fraction of the budget) or `steps`")
        if isinstance(self.share, float | int) and not 0 <= self.share <= 1:
            raise ValueError(f"`share` must be within [0, 1], got {self.share}")
        if isinstance(self.share, Dist) and ((self.share.type == "categorical" and any(
                not isinstance(c, int | float) or not 0 <= c <= 1 for c in self.share.choices or ()))
                or (self.share.type != "categorical" and not 0 <= self.share.low <= self.share.high <= 1)):  # type: ignore[operator]
            raise ValueError("`share` values must lie within [0, 1]")
        steps = _values(self.steps) if self.steps is not None else []
        bad = [v for v in steps if isinstance(v, bool) or not isinstance(v, int | float)
               or v < 0 or v != int(v)]
        if bad or (isinstance(self.steps, Dist) and self.steps.type == "float"):
            raise ValueError(f"`steps` must be whole numbers >= 0 (0 leaves the stage out), got "
                             f"{bad[0] if bad else getattr(self.steps, 'type', '')!r}")
        return self


_Scalar = StrictBool | StrictInt | StrictFloat | StrictStr


# Every tunable stage field, fixed (a value) or searched (a Dist). A field left out is None here
# and StageSpec's default applies: fields, defaults and bounds are StageSpec's, written once.
if TYPE_CHECKING:  # the fields below, as far as a type checker needs them
    StageDims = _StageDimsBase
else:
    StageDims = create_model(  # type: ignore[call-overload]
        "StageDims", __base__=_StageDimsBase, __module__=__name__,
        __doc__="One stage in a space: a budget share (or steps) plus fixed or searched stage fields.",
        **{name: (Dist | _Scalar | None, None) for name in TUNABLE_FIELDS},
    )


def _values(value: Any) -> list[Any]:
    """The values a fixed or searched setting can take at its edges (all choices, or low/high)."""
    if not isinstance(value, Dist):
        return [value]
    if value.type == "categorical":
        return list(value.choices or ())
    if value.type == "int":
        return [int(value.low), int(value.high)]  # type: ignore[arg-type]
    return [value.low, value.high]


@functools.cache
def _field_adapter(name: str) -> TypeAdapter[Any]:
    info = StageSpec.model_fields[name]
    return TypeAdapter(Annotated[info.annotation, info])  # type: ignore[arg-type]


def _types(name: str) -> set[type]:
    """The plain types StageSpec's field ``name`` takes (``{int}``), None and Annotated removed."""
    ann = StageSpec.model_fields[name].annotation
    out = set()
    for t in get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,):
        t = get_args(t)[0] if get_origin(t) is Annotated else t
        if t is not type(None):
            out.add(t)
    return out


def allowed_values(name: str) -> str:
    """What StageSpec allows for field ``name``, in words: ``an integer >= 1``."""
    info = StageSpec.model_fields[name]
    types = _types(name)
    what = ("an integer" if types == {int} else "a number" if types == {float}
            else "a string" if types == {str} else " or ".join(t.__name__ for t in types))
    bounds = []
    for meta in info.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="),
                         ("min_length", "of length >=")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{op} {getattr(meta, attr)}")
    text = f"{what} {' and '.join(bounds)}".strip()
    return f"{text} ({info.description})" if info.description else text


def check_stage_value(name: str, value: Any) -> None:
    """Raise ValueError unless every edge of ``value`` (fixed or a Dist) is a valid StageSpec
    ``name``. Bounds are intervals, so a range's two ends decide it."""
    types = _types(name)
    if isinstance(value, Dist) and int in types and float not in types and value.type == "float":
        raise ValueError(f"`{name}` takes {allowed_values(name)}; use type int or categorical, "
                         "not float")
    if isinstance(value, Dist) and str in types and value.type != "categorical":
        raise ValueError(f"`{name}` takes {allowed_values(name)}; search it with type categorical")
    for v in _values(value):
        try:
            _field_adapter(name).validate_python(v)
        except ValidationError:
            raise ValueError(f"`{name}` = {v!r} is not allowed; it must be "
                             f"{allowed_values(name)}") from None


def share_high(share: Any) -> float:
    """The highest budget share a fixed or searched ``share`` can take."""
    if isinstance(share, Dist):
        return float(max(share.choices or ()) if share.type == "categorical" else share.high)  # type: ignore[arg-type]
    return float(share)
