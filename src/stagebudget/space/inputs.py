"""Checks of what a search space or schedule names, before any compute: the task file, the base
model's files, its tokenizer against the tasks, and the prompt window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stagebudget.errors import ConfigError, UserError
from stagebudget.fileio import read_json, safetensors_problem
from stagebudget.kinds import get_kind
from stagebudget.schedule import TasksRef
from stagebudget.space.dims import share_high


def check_inputs(base_model: str, tasks: TasksRef, source: str | Path | None,
                 base_dir: Path | None = None, trust_remote_code: bool = False,
                 generation: int = 0) -> list[str]:
    """Check a task file and the base model together before any compute (``search``,
    ``validate`` and ``train`` alike); errors name ``source`` and the field. Returns warnings
    to show the user.

    Task rows, splits, the scorer and the answer extraction are validated by loading the
    suite (the scorer is imported and called once). Chat-message prompts need a local model:
    built-in models have no chat template (and are built later, once). A local model directory
    must hold a readable config, tokenizer and whole safetensors weights, and a tokenizer whose
    chat template and tokenisation fit the prompts (:func:`stagebudget.chat.check_model_tasks`).
    Every prompt, with what is generated after it (``generation``: the most a training stage
    generates, see :func:`generated_tokens`), must fit the model's position window.
    """
    from stagebudget.tasks import load_suite

    try:
        suite = load_suite(**tasks.suite_args(), base_dir=base_dir)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source,
                          field=getattr(exc, "field", None) or "tasks") from None
    warnings = list(suite.warnings)
    if base_model.startswith("builtin:"):
        if suite.conversational:
            raise ConfigError(
                f"the task file {tasks.source} gives prompts as chat messages, but the "
                f"built-in model {base_model} has no chat template; write the prompts "
                "as plain text or use a local model directory whose tokenizer has one",
                source=source, field="tasks")
        _check_builtin_window(base_model, suite, source, generation)
        return warnings + builtin_vocab_warnings(suite, base_model)
    return warnings + _check_model(base_model, suite, source, base_dir, trust_remote_code,
                                   generation)


def _check_model(base_model: str, suite: Any, source: str | Path | None, base_dir: Path | None,
                 trust_remote_code: bool, generation: int = 0) -> list[str]:
    """A local model's files, then its tokenizer against the suite's prompts."""
    from stagebudget.chat import check_model_tasks, check_prompt_window, prompt_ids
    from stagebudget.modelref import load_tokenizer, position_window, resolve_base_model

    try:
        path = resolve_base_model(base_model, base_dir=base_dir)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source, field="base_model") from None
    check_model_files(path, source)
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        warnings = check_model_tasks(tokenizer, suite, base_model)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source, field="base_model") from None
    try:
        check_prompt_window(
            suite, position_window(base_model, path), lambda p: len(prompt_ids(tokenizer, p)),
            lambda t: len(tokenizer(text=t, add_special_tokens=False)["input_ids"]), base_model,
            generation)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source,
                          field=getattr(exc, "field", None) or "tasks") from None
    return warnings


def generated_tokens(stages: Any) -> int:
    """The most tokens a generating stage (rl) writes after a prompt: its
    ``max_completion_length`` (the kind's default when unset, the top of a searched range).
    ``stages`` yields ``(kind, settings)`` with settings a :class:`StageSpec` or stage dims."""
    most = 0
    for kind, settings in stages:
        info = get_kind(kind)
        if not info.generates:
            continue
        value = getattr(settings, "max_completion_length", None)
        if value is None:
            value = info.defaults.get("max_completion_length", 0)
        most = max(most, int(share_high(value)))
    return most


def builtin_vocab_warnings(suite: Any, base_model: str, shown: int = 5) -> list[str]:
    """One warning naming the task file, lines and characters the built-in character
    tokenizer lacks (it covers printable ASCII, ``modelref.CHARS``): it reads each as
    ``<unk>``, so such a prompt loses them and such an answer can never be written."""
    from stagebudget.modelref import CHARS

    known = set(CHARS)
    hits: list[tuple[int | None, str, str]] = []
    for ex in (*suite.train, *suite.id_test, *suite.ood_test):
        for field_name in ("prompt", "answer", "completion"):
            value = getattr(ex, field_name)
            missing = "".join(dict.fromkeys(c for c in value or "" if c not in known))
            if missing:
                hits.append((ex.line, field_name, missing))
    if not hits:
        return []
    hits.sort(key=lambda h: (h[0] is None, h[0] or 0))
    where = "; ".join(f"line {line} {name}: " + ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars)
                      for line, name, chars in hits[:shown])
    more = f" (and {len(hits) - shown} more)" if len(hits) > shown else ""
    return [f"{suite.path or 'the task file'}: {len(hits)} field(s) hold characters the "
            f"tokenizer of {base_model} lacks{more}: {where}. It knows printable ASCII only "
            "(' ' to '~') and reads any other character as <unk>: a prompt loses it, an answer "
            "with it can never be generated. Rewrite those rows, or use a local model directory "
            "whose tokenizer covers them"]


def _check_builtin_window(base_model: str, suite: Any, source: str | Path | None,
                          generation: int = 0) -> None:
    """A built-in model's window against the suite's longest prompts (no model is loaded)."""
    from stagebudget.chat import check_prompt_window
    from stagebudget.modelref import builtin_token_count, position_window

    try:
        check_prompt_window(suite, position_window(base_model), builtin_token_count,
                            lambda t: builtin_token_count(t, bos=False), base_model, generation)
    except ValueError as exc:
        raise ConfigError(str(exc), source=source,
                          field=getattr(exc, "field", None) or "tasks") from None


def check_model_files(path: Path, source: str | Path | None) -> None:
    """A local model directory's config.json, tokenizer.json and safetensors framing, read
    before any compute (a damaged file would otherwise fail inside every trial)."""
    for name in ("config.json", "tokenizer.json"):
        if (path / name).is_file():
            try:
                read_json(path / name)
            except UserError as exc:
                raise ConfigError(str(exc), source=source, field="base_model") from None
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ConfigError(f"model directory {path}: {problem}; copy the model again",
                              source=source, field="base_model")
