"""stagebudget's errors: every exception stagebudget raises derives from :class:`StagebudgetError`
(as every Optuna exception derives from ``OptunaError``), so one ``except`` catches them all.
Every exception class is defined here (as Optuna keeps its in ``optuna/exceptions.py``); the
modules that raise one re-export it, so ``from stagebudget.tasks import TaskFileError`` still
works. This module imports only the standard library.

Every mistake in user input becomes a :class:`UserError` whose message says which file and which
field is wrong, what was given and what is allowed. The CLI prints it as one paragraph and exits
non-zero without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


class StagebudgetError(Exception):
    """The root of every exception stagebudget raises (``SearchInterrupted`` excepted: it is a
    ``KeyboardInterrupt``, which ``except Exception`` must not catch)."""


class DeterministicError(StagebudgetError):
    """A failure that a retry cannot change (same input, same result): a trial that raises one
    is recorded FAILED at once, never retried. Our exceptions also survive pickling (Ray sends
    them between processes), so each class with extra constructor arguments defines
    ``__reduce__``."""


class UserError(ValueError, DeterministicError):
    """Bad input from the user: a file, a field or a flag. Printed without a traceback."""


class ConfigError(UserError):
    """A search-space or schedule file (or its fields) is invalid."""

    def __init__(self, message: str, *, source: str | Path | None = None, field: str | None = None):
        self.source = str(source) if source is not None else None
        self.field = field
        where = []
        if self.source:
            where.append(self.source)
        if field:
            where.append(f"field `{field}`")
        prefix = ": ".join(where)
        self.message = message
        super().__init__(f"{prefix}: {message}" if prefix else message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_config_error, (self.message, self.source, self.field))


def _rebuild_config_error(message: str, source: str | None, field: str | None) -> ConfigError:
    return ConfigError(message, source=source, field=field)


class BudgetError(UserError):
    """A budget allocation cannot fit even one step of a stage."""


class RunError(UserError):
    """A run directory is missing, foreign, or has nothing to show."""


class ModelRefError(UserError):
    """A base model reference cannot be used; the message says why and what to pass."""


class TaskFileError(UserError):
    """A user task file or task selection is invalid; the message says where and why."""


class ModelTaskError(UserError):
    """The model's tokenizer and the task file do not fit together; says which and why."""


class GenerationTooLong(ModelTaskError):
    """What is generated after a prompt does not leave room for any prompt; ``field`` names the
    setting to change."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (Ray) with its field
        return (type(self), (str(self), self.field))


class ClusterError(UserError):
    """The Ray cluster named by ``--address`` cannot be used."""


class ScorerError(ValueError, StagebudgetError):
    """A scorer or an answer setting cannot be used; the message names it and the fix."""


class DataMissingError(RuntimeError, StagebudgetError):
    """A packaged sequence file could not be found in the installed wheels."""


class ReplayMiss(LookupError, DeterministicError):
    """The schedule is not in the table: the search space and the table disagree."""

    def __init__(self, message: str) -> None:  # one argument: survives pickling (Ray)
        super().__init__(message)


class TrainingDiverged(RuntimeError, DeterministicError):
    """The training loss became NaN or infinite; names the stage and the step. Training is
    deterministic by seed, so a retry would diverge again: never retried."""

    def __init__(self, stage: str, stage_index: int, step: int, value: float) -> None:
        self.stage, self.stage_index, self.step, self.value = stage, stage_index, step, value
        super().__init__(
            f"training diverged in stage {stage_index} ({stage}) at step {step}: loss={value}; "
            "lower the learning rate of this stage"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stage, self.stage_index, self.step, self.value))


class BudgetGuardError(RuntimeError, StagebudgetError):
    """A trial used more than its overrun guard allows; it was stopped and is not scored."""

    def __init__(self, message: str) -> None:  # one argument: survives pickling (Ray)
        super().__init__(message)


class StagePruned(StagebudgetError):
    """Raised from ``stage_end`` to stop a trial at a stage boundary; ``info`` says where and
    which completed trial dominated it there. (Named apart from ``optuna.TrialPruned``: this one
    is caught by the trainable, never by Optuna.)"""

    def __init__(self, message: str, info: dict[str, Any]) -> None:
        super().__init__(message, info)
        self.info = info

    def __str__(self) -> str:
        return str(self.args[0])


# A KeyboardInterrupt, not a StagebudgetError: ``except Exception`` must let Ctrl-C through.
class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a search; the message says what finished and how to resume."""


def allowed(values: Iterable[Any]) -> str:
    """Render allowed values for an error message: ``allowed(["a", "b"]) == "'a', 'b'"``."""
    return ", ".join(repr(v) for v in values)


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "dict", "list", "tuple"}


def _is_tag(part: Any) -> bool:
    """Pydantic puts union-member tags (``int``, ``function-after[...]``) into error locations."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def from_pydantic(exc: Any, source: str | Path | None) -> ConfigError:
    """Turn a pydantic ``ValidationError`` into one readable :class:`ConfigError`.

    Each problem is named by its dotted field path, e.g. ``stages.sft.lora_rank``. For a field
    that accepts either a value or a distribution, only the message for the form given is kept.
    """
    by_field: dict[str, list[tuple[bool, dict[str, Any]]]] = {}
    for err in exc.errors():
        loc = err.get("loc", ())
        clean = ".".join(str(p) for p in loc if not _is_tag(p))
        via_model = any(isinstance(p, str) and "[" in p for p in loc)
        by_field.setdefault(clean, []).append((via_model, err))
    lines = []
    for field, errs in by_field.items():
        if len(errs) > 1:
            given_mapping = isinstance(errs[0][1].get("input"), dict)
            preferred = [e for via, e in errs if via == given_mapping and "valid dictionary" not in
                         str(e.get("msg"))]
            chosen = preferred[:1] or [errs[0][1]]
        else:
            chosen = [errs[0][1]]
        for err in chosen:
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if err.get("type") not in ("missing", "value_error") and "input" in err:
                msg = f"{msg} (got {err['input']!r})"
            lines.append(f"field `{field}`: {msg}" if field else msg)
    return ConfigError("; ".join(lines), source=source)
