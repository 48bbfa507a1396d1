"""Task suites: the built-in biology tasks and user JSONL tasks.

Light module: imports neither torch nor transformers.

>>> suite = load_suite(n_train=30, n_id_test=6, n_ood_test=6)
>>> suite.train[0].prompt.split(":")[0] in {"tl1", "tl11", "rc", "tx", "ch7", "ch8"}
True
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stagebudget.errors import UserError
from stagebudget.tasks import data
from stagebudget.tasks.builtin import BUILTIN_TASKS, DEFAULT_TASKS, BuiltinTask
from stagebudget.tasks.scoring import SCORERS

__all__ = [
    "DEFAULT_TASKS",
    "SCORERS",
    "SPLITS",
    "Example",
    "TaskFileError",
    "TaskInfo",
    "TaskSuite",
    "builtin_task_names",
    "load_suite",
    "pretrain_corpus",
    "render_examples",
    "task_infos",
]

SPLITS = ("train", "id_test", "ood_test")
MAX_CHARS = 64  # prompt + answer must fit the base model's context
FORMAT_BONUS = 0.1


class TaskFileError(UserError):
    """A user task file or task selection is invalid; the message says where and why."""


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair, e.g. ``Example("tl11:ATGTGG=", "MW", "translate", "train")``."""

    prompt: str
    answer: str
    task: str
    split: str


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
    _alphabets: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for ex in (*self.train, *self.id_test, *self.ood_test):
            self._alphabets.setdefault(ex.task, frozenset())
            self._alphabets[ex.task] = self._alphabets[ex.task] | set(ex.answer)

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name`` (one of SPLITS)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return list(getattr(self, name))

    def score(self, example: Example, prediction: str) -> float:
        """Score in [0, 1] of ``prediction`` with the scorer of the example's task."""
        return SCORERS[self.tasks[example.task].scorer](prediction, example.answer)

    def reward(self, example: Example, completion: str) -> float:
        """RL reward in [0, 1.1]: exact-match correctness (1 or 0) plus a 0.1 format term.

        The format term is paid when the stripped completion is non-empty, uses only
        characters seen in this task's answers, and is at most twice the answer's length
        plus one. ``reward(ex, ex.answer) == 1.1``.
        """
        text = completion.strip()
        correct = 1.0 if text == example.answer.strip() else 0.0
        alphabet = self._alphabets.get(example.task, frozenset(example.answer))
        well_formed = bool(text) and set(text) <= alphabet and (
            len(text) <= 2 * len(example.answer) + 1)
        return correct + (FORMAT_BONUS if well_formed else 0.0)


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


def _sequence_of(prompt: str) -> str:
    """The sequence inside a built-in prompt ``rule:SEQ=``."""
    return prompt.split(":", 1)[1].rstrip("=")


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
        f"{path}, line {line}: {why}. Each line must be a JSON object with non-empty string "
        f"fields \"prompt\" and \"answer\", a \"split\" that is one of {', '.join(SPLITS)}, and "
        f"an optional string \"task\".")


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
        if not isinstance(row[key], str) or not row[key].strip():
            raise _row_error(path, line, f"field {key!r} must be a non-empty string")
    if row["split"] not in SPLITS:
        raise _row_error(path, line, f"unknown split {row['split']!r}")
    task = row.get("task", "user")
    if not isinstance(task, str) or not task:
        raise _row_error(path, line, "field 'task' must be a non-empty string when given")
    return Example(row["prompt"], row["answer"], task, row["split"])


def _user_suite(path: Path, scorer: str) -> TaskSuite:
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist; pass 'builtin' or a JSONL path")
    examples: list[Example] = []
    for line, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _row_error(path, line, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                                         f"column {err.start + 1})") from None
        if text.strip():
            examples.append(_parse_row(path, line, text))
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
                     by_split["ood_test"], infos)


def load_suite(source: str = "builtin", names: Sequence[str] = (), n_train: int = 4000,
               n_id_test: int = 200, n_ood_test: int = 200, seed: int = 0,
               scorer: str | None = None, base_dir: Path | None = None) -> TaskSuite:
    """Load the built-in suite (``source="builtin"``) or a user JSONL task file.

    Built-in sizes are per-suite totals split evenly across tasks; ``seed`` is the data
    seed. For a JSONL file, ``scorer`` (default "exact") names one of SCORERS and
    relative paths are resolved against ``base_dir``.
    """
    if scorer is not None and scorer not in SCORERS:
        raise TaskFileError(f"unknown scorer {scorer!r}; allowed: {', '.join(SCORERS)}")
    if source == "builtin":
        for label, value in (("n_train", n_train), ("n_id_test", n_id_test),
                             ("n_ood_test", n_ood_test)):
            if value < 0:
                raise TaskFileError(f"{label} must be >= 0, but got {value}")
        suite = _builtin_suite(names, {"train": n_train, "id_test": n_id_test,
                                       "ood_test": n_ood_test}, seed)
        if scorer is not None:
            suite.tasks = {k: TaskInfo(i.name, i.domain, i.description, i.id_split, i.ood_split,
                                       scorer) for k, i in suite.tasks.items()}
        return suite
    if names:
        raise TaskFileError(f"task names {list(names)} apply to the built-in suite only, "
                            f"not to the task file {source!r}")
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return _user_suite(path, scorer or "exact")


# ---------------------------------------------------------------- pre-training corpus
RAW_SOURCES = ("ecoli_genome", "cdip_genome", "hgc_genome", "ecoli_cds", "myco_cds",
               "proteome", "ecoli_prot")


def pretrain_corpus(seed: int = 0, n: int = 30000) -> list[str]:
    """Texts for base pre-training (and cpt): raw sequence chunks and task examples.

    About 10% raw 16-60 char chunks of real DNA and protein, 80% default-task examples
    and 10% other built-in tasks, each task under ALL its variants (ID and OOD rules),
    drawn from the train pool only, as ``prompt + answer`` strings.
    """
    rng = random.Random(f"{seed}:pretrain")
    n_raw, n_default = n // 10, int(n * 0.8)
    texts = [_raw_chunk(rng) for _ in range(n_raw)]
    others = [t for t in BUILTIN_TASKS if t not in DEFAULT_TASKS]
    for count, pool_names in ((n_default, DEFAULT_TASKS), (n - n_raw - n_default, others)):
        drawn = 0
        while drawn < count:
            task = BUILTIN_TASKS[rng.choice(pool_names)]
            variants = (*task.id_variants, *task.ood_variants)
            idx = rng.randrange(len(variants))
            got = task.draw(rng, variants[idx], "train", idx >= len(task.id_variants))
            if got is not None:
                texts.append(got[0] + got[1])
                drawn += 1
    rng.shuffle(texts)
    return texts


def _raw_chunk(rng: random.Random) -> str:
    recs = data.pool(rng.choice(RAW_SOURCES), "train")
    rec = recs[rng.randrange(len(recs))]
    length = min(len(rec), rng.randint(16, 60))
    start = rng.randrange(len(rec) - length + 1)
    return rec[start:start + length]
