"""Task suites: the built-in biology tasks and user JSONL tasks.

Light module: imports neither torch nor transformers.

>>> suite = load_suite(n_train=30, n_id_test=6, n_ood_test=6)
>>> suite.train[0].prompt.split(":")[0] in {"tl1", "tl11", "cm", "tx", "ch7", "ch8"}
True
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stagebudget.errors import ScorerError, TaskFileError
from stagebudget.schedule import BUILTIN_SIZES
from stagebudget.tasks.builtin import BUILTIN_TASKS, DEFAULT_TASKS, BuiltinTask
from stagebudget.tasks.corpus import pretrain_corpus
from stagebudget.tasks.scoring import (
    EXTRACTIONS,
    SCORERS,
    Scorer,
    check_extraction,
    check_scorer,
    extract,
    resolve_scorer,
)

__all__ = [
    "DEFAULT_TASKS",
    "EXTRACTIONS",
    "SCORERS",
    "SPLITS",
    "Example",
    "Prompt",
    "TaskFileError",
    "TaskInfo",
    "TaskSuite",
    "builtin_task_names",
    "load_suite",
    "pretrain_corpus",
    "prompt_key",
    "render_examples",
    "resolve_task_path",
    "task_file_sizes",
    "task_infos",
]

SPLITS = ("train", "id_test", "ood_test")
FORMAT_BONUS = 0.1
ROLES = ("system", "user", "assistant")
# A prompt is plain text or a list of chat messages ``[{"role": ..., "content": ...}]``
# (TRL's conversational format), rendered with the model's chat template.
Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair, e.g. ``Example("tl11:ATGTGG=", "MW", "translate", "train")``.

    ``prompt`` is text or a list of chat messages; ``completion`` is the SFT target when it
    differs from the scored ``answer`` (e.g. reasoning followed by ``<answer>MW</answer>``).
    """

    prompt: Prompt
    answer: str
    task: str
    split: str
    completion: str | None = None
    line: int | None = field(default=None, compare=False)  # its line in a user task file

    @property
    def conversational(self) -> bool:
        """True when the prompt is a list of chat messages."""
        return isinstance(self.prompt, list)

    @property
    def target(self) -> str:
        """What SFT trains the model to write: ``completion``, else the answer."""
        return self.completion if self.completion is not None else self.answer


@dataclass(frozen=True)
class TaskInfo:
    """What a task is and how its ID and OOD splits differ."""

    name: str
    domain: str
    description: str
    id_split: str
    ood_split: str
    scorer: str


@dataclass
class TaskSuite:
    """Examples of one or more tasks in the three splits, with per-task scoring."""

    name: str
    train: list[Example]
    id_test: list[Example]
    ood_test: list[Example]
    tasks: dict[str, TaskInfo]
    answer_mode: str = "full"
    format_reward: float = FORMAT_BONUS
    max_new_tokens: int | None = None
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None
    base_dir: Path | None = None  # where relative scorer files are found
    _alphabets: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    _scorers: dict[str, Scorer] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for ex in (*self.train, *self.id_test, *self.ood_test):
            self._alphabets.setdefault(ex.task, frozenset())
            self._alphabets[ex.task] = self._alphabets[ex.task] | set(ex.answer)

    @property
    def conversational(self) -> bool:
        """True when the prompts are chat messages (the model's chat template renders them)."""
        first = next(iter((*self.train, *self.id_test, *self.ood_test)), None)
        return first is not None and first.conversational

    def sizes(self) -> dict[str, int]:
        """``{"n_train", "n_id_test", "n_ood_test"}``: the examples each split holds."""
        return {f"n_{s}": len(getattr(self, s)) for s in SPLITS}

    def scorer(self, task: str) -> Scorer:
        """The scoring function of ``task`` (resolved once)."""
        if task not in self._scorers:
            self._scorers[task] = resolve_scorer(self.tasks[task].scorer, self.base_dir)
        return self._scorers[task]

    def digest(self) -> str:
        """SHA-256 of everything that decides what trains on and scores with this suite: the
        examples of every split, the task descriptions and scorer names (a scorer file's
        content too), answer extraction, format reward and generation length."""
        scorer_files = {}
        for info in self.tasks.values():
            file, sep, _ = info.scorer.rpartition(":")
            path = Path(file) if not self.base_dir or Path(file).is_absolute() \
                else Path(self.base_dir) / file
            if sep and file.endswith(".py") and path.is_file():
                scorer_files[info.scorer] = hashlib.sha256(path.read_bytes()).hexdigest()
        content = {
            "splits": {s: [asdict(e) for e in getattr(self, s)] for s in SPLITS},
            "tasks": {k: asdict(v) for k, v in sorted(self.tasks.items())},
            "scorer_files": scorer_files, "answer_mode": self.answer_mode,
            "format_reward": self.format_reward, "max_new_tokens": self.max_new_tokens,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name`` (one of SPLITS)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return list(getattr(self, name))

    def score(self, example: Example, completion: str) -> float:
        """Score in [0, 1] of a completion: extract the answer, then the task's scorer.

        A completion with no answer to extract (e.g. no ``<answer>`` tags) scores 0.
        """
        predicted = extract(self.answer_mode, completion)
        if predicted is None:
            return 0.0
        return float(self.scorer(example.task)(predicted, example.answer))

    def reward(self, example: Example, completion: str) -> float:
        """RL reward: the task's score of ``completion`` plus ``format_reward`` when well formed.

        Well formed means an answer could be extracted; with ``answer: full`` it also means a
        non-empty answer using only characters seen in this task's answers, at most twice the
        answer's length plus one. ``reward(ex, ex.answer) == 1 + format_reward``.
        """
        predicted = extract(self.answer_mode, completion)
        if predicted is None:
            return 0.0
        well_formed = bool(predicted)
        if self.answer_mode == "full":
            alphabet = self._alphabets.get(example.task, frozenset(example.answer))
            well_formed = well_formed and set(predicted) <= alphabet and (
                len(predicted) <= 2 * len(example.answer) + 1)
        score = float(self.scorer(example.task)(predicted, example.answer))
        return score + (self.format_reward if well_formed else 0.0)


# ---------------------------------------------------------------- built-in tasks
def builtin_task_names() -> list[str]:
    """Names of the built-in tasks, defaults first."""
    return list(BUILTIN_TASKS)


def _info(task: BuiltinTask) -> TaskInfo:
    return TaskInfo(task.name, task.domain, task.description, task.id_split, task.ood_split,
                    task.scorer)


def task_infos() -> list[TaskInfo]:
    """Metadata of every built-in task."""
    return [_info(t) for t in BUILTIN_TASKS.values()]


def _check_names(names: Sequence[str]) -> list[str]:
    chosen = list(names) or list(DEFAULT_TASKS)
    unknown = [n for n in chosen if n not in BUILTIN_TASKS]
    if unknown:
        raise TaskFileError(
            f"unknown built-in task(s) {', '.join(map(repr, unknown))}; allowed: "
            f"{', '.join(BUILTIN_TASKS)}")
    if len(set(chosen)) != len(chosen):
        raise TaskFileError(f"task names must be unique, but got {chosen}")
    return chosen


def _sequence_of(prompt: Prompt) -> str:
    """The sequence inside a built-in prompt ``rule:SEQ=`` (built-in prompts are text)."""
    return str(prompt).split(":", 1)[1].rstrip("=")


def _generate(task: BuiltinTask, split: str, n: int, seed: int, exclude: set[str]) -> list[Example]:
    """``n`` distinct examples of ``task`` in ``split``, avoiding sequences in ``exclude``."""
    rng = random.Random(f"{seed}:{task.name}:{split}")
    variants = task.ood_variants if split == "ood_test" else task.id_variants
    part = "train" if split == "train" else "test"
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 400 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {split} examples of {task.name!r}")
        drawn = task.draw(rng, variants[len(out) % len(variants)], part, split == "ood_test")
        if drawn is None or drawn[0] in seen or _sequence_of(drawn[0]) in exclude:
            continue
        seen.add(drawn[0])
        out.append(Example(drawn[0], drawn[1], task.name, split))
    return out


def _even(total: int, k: int) -> list[int]:
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


def _builtin_suite(names: Sequence[str], sizes: dict[str, int], seed: int) -> TaskSuite:
    chosen = _check_names(names)
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    per = {s: _even(sizes[s], len(chosen)) for s in SPLITS}
    for i, name in enumerate(chosen):
        task = BUILTIN_TASKS[name]
        train = _generate(task, "train", per["train"][i], seed, set())
        train_seqs = {_sequence_of(ex.prompt) for ex in train}
        splits["train"] += train
        for s in ("id_test", "ood_test"):
            splits[s] += _generate(task, s, per[s][i], seed, train_seqs)
    for s in SPLITS:
        random.Random(f"{seed}:shuffle:{s}").shuffle(splits[s])
    return TaskSuite("builtin:" + "+".join(chosen), splits["train"], splits["id_test"],
                     splits["ood_test"], {n: _info(BUILTIN_TASKS[n]) for n in chosen})


def render_examples(name: str, n: int = 2, seed: int = 0) -> list[Example]:
    """``n`` ID and ``n`` OOD test examples of built-in task ``name`` (for display)."""
    task = BUILTIN_TASKS[_check_names([name])[0]]
    return _generate(task, "id_test", n, seed, set()) + _generate(task, "ood_test", n, seed, set())


# ---------------------------------------------------------------- user JSONL tasks
def _row_error(path: Path, line: int, why: str) -> TaskFileError:
    return TaskFileError(
        f"{path}, line {line}: {why}. Each line must be a JSON object with a \"prompt\" (a "
        f"non-empty string, or a list of chat messages {{\"role\": one of {', '.join(ROLES)}, "
        f"\"content\": a string}}), a non-empty string \"answer\", a \"split\" that is one of "
        f"{', '.join(SPLITS)}, and optional strings \"task\" and \"completion\" (the SFT target, "
        "when it differs from the answer).")


def _parse_messages(path: Path, line: int, value: list[Any]) -> list[dict[str, str]]:
    if not value:
        raise _row_error(path, line, "field 'prompt' is an empty list of messages")
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
            raise _row_error(path, line, f"prompt message {i} must be an object with exactly the "
                                         f"keys 'role' and 'content', got {msg!r}")
        if msg["role"] not in ROLES or not isinstance(msg["content"], str):
            raise _row_error(path, line, f"prompt message {i} has role {msg['role']!r} and "
                                         f"content {msg['content']!r}")
        messages.append({"role": msg["role"], "content": msg["content"]})
    if messages[-1]["role"] == "assistant":
        raise _row_error(path, line, "the last prompt message is the assistant's; the model "
                                     "writes the assistant turn, so end the prompt on a user turn")
    return messages


def _parse_row(path: Path, line: int, text: str) -> Example:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise _row_error(path, line, f"invalid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise _row_error(path, line, f"expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "answer", "split"):
        if key not in row:
            raise _row_error(path, line, f"missing field {key!r}")
        if key == "prompt" and isinstance(row[key], list):
            continue
        if not isinstance(row[key], str) or not row[key].strip():
            raise _row_error(path, line, f"field {key!r} must be a non-empty string")
    if row["split"] not in SPLITS:
        raise _row_error(path, line, f"unknown split {row['split']!r}")
    task = row.get("task", "user")
    if not isinstance(task, str) or not task:
        raise _row_error(path, line, "field 'task' must be a non-empty string when given")
    completion = row.get("completion")
    if completion is not None and (not isinstance(completion, str) or not completion.strip()):
        raise _row_error(path, line, "field 'completion' must be a non-empty string when given")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt = _parse_messages(path, line, prompt)
    return Example(prompt, row["answer"], task, row["split"], completion, line=line)


def _read_rows(path: Path) -> list[tuple[int, Example]]:
    rows: list[tuple[int, Example]] = []
    for line, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _row_error(path, line, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                                         f"column {err.start + 1})") from None
        if text.strip():
            rows.append((line, _parse_row(path, line, text)))
    kinds = {ex.conversational for _, ex in rows}
    if len(kinds) > 1:
        first_chat = next(n for n, ex in rows if ex.conversational)
        first_text = next(n for n, ex in rows if not ex.conversational)
        raise TaskFileError(
            f"{path}: prompts must all be text or all be chat messages, but line {first_text} "
            f"has a text prompt and line {first_chat} a list of messages")
    return rows


def prompt_key(prompt: Prompt) -> str:
    """A prompt as one comparable string (messages as canonical JSON, text stripped)."""
    return prompt.strip() if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _overlap_warnings(path: Path, rows: list[tuple[int, Example]]) -> list[str]:
    """One warning per test split whose prompts also appear in train (naming one example)."""
    train = {prompt_key(ex.prompt): line for line, ex in rows if ex.split == "train"}
    out = []
    for split in ("id_test", "ood_test"):
        hits = [(line, train[prompt_key(ex.prompt)]) for line, ex in rows
                if ex.split == split and prompt_key(ex.prompt) in train]
        if hits:
            n_split = sum(1 for _, ex in rows if ex.split == split)
            out.append(
                f"{path}: {len(hits)} of {n_split} {split} prompts also appear in train (e.g. "
                f"line {hits[0][0]} repeats line {hits[0][1]}); the {split} score then measures "
                "memorisation, not generalisation. Remove them from one of the splits.")
    return out


def _user_suite(path: Path, scorer: str) -> TaskSuite:
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist; pass 'builtin' or a JSONL path")
    rows = _read_rows(path)
    examples = [ex for _, ex in rows]
    by_split = {s: [ex for ex in examples if ex.split == s] for s in SPLITS}
    for s in SPLITS:
        if not by_split[s]:
            raise TaskFileError(
                f"{path}: the {s!r} split is empty; a task file needs rows in each of "
                f"{', '.join(SPLITS)}.")
    infos = {
        t: TaskInfo(t, "user", f"user task from {path.name}", "rows with split id_test",
                    "rows with split ood_test", scorer)
        for t in dict.fromkeys(ex.task for ex in examples)
    }
    return TaskSuite(f"file:{path.name}", by_split["train"], by_split["id_test"],
                     by_split["ood_test"], infos, warnings=_overlap_warnings(path, rows),
                     path=path)


def task_file_sizes(path: Path) -> dict[str, int]:
    """``{"n_train", "n_id_test", "n_ood_test"}``: the rows a task file holds per split."""
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist; pass 'builtin' or a JSONL path")
    rows = _read_rows(path)
    return {f"n_{s}": sum(1 for _, ex in rows if ex.split == s) for s in SPLITS}


def resolve_task_path(source: str, base_dir: Path | None = None) -> Path:
    """The task file ``source`` names: ``~`` expanded, relative paths against ``base_dir``."""
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def load_suite(source: str = "builtin", names: Sequence[str] = (), n_train: int | None = None,
               n_id_test: int | None = None, n_ood_test: int | None = None, seed: int = 0,
               scorer: str | None = None, base_dir: Path | None = None,
               answer: str | None = None, format_reward: float | None = None,
               max_new_tokens: int | None = None) -> TaskSuite:
    """Load the built-in suite (``source="builtin"``) or a user JSONL task file.

    Built-in sizes are per-suite totals split evenly across tasks (default BUILTIN_SIZES);
    ``seed`` is the data seed. For a JSONL file, relative paths are resolved against
    ``base_dir`` and sizes, when given, must match the rows the file holds. ``scorer`` is a
    name of SCORERS or ``package.module:function`` (default "exact"), ``answer`` an
    extraction of EXTRACTIONS (default "full"); the scorer is imported and called on one
    example here, so a broken one fails before any compute. ``max_new_tokens`` caps
    evaluation generation (default: see :func:`stagebudget.training.evaluate.max_new_tokens_for`).
    """
    if source == "builtin":
        for label, value in (("n_train", n_train), ("n_id_test", n_id_test),
                             ("n_ood_test", n_ood_test)):
            if value is not None and value < 0:
                raise TaskFileError(f"{label} must be >= 0, but got {value}")
        given = {"n_train": n_train, "n_id_test": n_id_test, "n_ood_test": n_ood_test}
        sizes = {k[2:]: BUILTIN_SIZES[k] if v is None else v for k, v in given.items()}
        suite = _builtin_suite(names, sizes, seed)
        if scorer is not None:
            suite.tasks = {k: TaskInfo(i.name, i.domain, i.description, i.id_split, i.ood_split,
                                       scorer) for k, i in suite.tasks.items()}
    else:
        if names:
            raise TaskFileError(f"task names {list(names)} apply to the built-in suite only, "
                                f"not to the task file {source!r}")
        suite = _user_suite(resolve_task_path(source, base_dir), scorer or "exact")
        _check_file_sizes(suite, {"n_train": n_train, "n_id_test": n_id_test,
                                  "n_ood_test": n_ood_test})
    suite.base_dir = Path(base_dir) if base_dir is not None else None
    _configure_scoring(suite, source, answer, format_reward)
    suite.max_new_tokens = max_new_tokens
    return suite


def _check_file_sizes(suite: TaskSuite, given: dict[str, int | None]) -> None:
    held = suite.sizes()
    wrong = {k: v for k, v in given.items() if v is not None and v != held[k]}
    if wrong:
        raise TaskFileError(
            f"{suite.path}: the schedule says {', '.join(f'{k}={v}' for k, v in wrong.items())}, "
            f"but the file holds {', '.join(f'{k}={held[k]}' for k in wrong)} rows; a task file's "
            "splits are its rows (the file changed since the schedule was written, or the sizes "
            "were set by hand: remove them)")


def _configure_scoring(suite: TaskSuite, source: str, answer: str | None,
                       format_reward: float | None) -> None:
    """Set the answer extraction and format term; import and call every task's scorer once."""
    where = f"task file {suite.path}" if suite.path is not None else f"tasks {source!r}"
    suite.answer_mode = answer or "full"
    suite.format_reward = FORMAT_BONUS if format_reward is None else float(format_reward)
    try:
        check_extraction(suite.answer_mode)
        for task, info in suite.tasks.items():
            example = next((ex for ex in (*suite.train, *suite.id_test, *suite.ood_test)
                            if ex.task == task), None)
            if example is not None:
                check_scorer(info.scorer, suite.scorer(task), example.answer, example.answer)
    except ScorerError as exc:
        raise TaskFileError(f"{where}: {exc}") from None
