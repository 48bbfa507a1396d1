"""The one place a study storage URL becomes an Optuna storage object, for writing and reading.

``search`` (which writes the study) and ``load_run`` (which reads it for status, pareto and
export) both call :func:`open_storage`, so every storage a search can write is one a reader can
open: an SQLite URL, a server URL (``postgresql+psycopg2://user:pw@host:5432/db``) or a journal
file (``journal:PATH`` or a path ending in ``.log``/``.journal``/``.jsonl``; Optuna's
``JournalStorage``, the choice when several drivers write and no server is at hand).

Optuna is imported inside the functions, so importing this module stays light.

>>> normalize_url("runs/x/study.log")  # doctest: +SKIP
'journal:/abs/runs/x/study.log'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagebudget.errors import RunError, UserError

if TYPE_CHECKING:
    from stagebudget.rundir import RunDir

JOURNAL_PREFIX = "journal:"
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
POSTGRES_SCHEMES = ("postgresql", "postgres")
POSTGRES_HINT = ("install the PostgreSQL driver with `pip install 'stagebudget[postgres]'` "
                 "(psycopg2-binary)")


def is_journal(url: str) -> bool:
    """Whether ``url`` names a journal file rather than a database URL."""
    return url.startswith(JOURNAL_PREFIX) or ("://" not in url and url.endswith(JOURNAL_SUFFIXES))


def journal_path(url: str) -> Path:
    """The file of a journal storage URL."""
    return Path(url.removeprefix(JOURNAL_PREFIX))


def normalize_url(url: str) -> str:
    """A storage URL as run.json keeps it: a journal file becomes ``journal:ABSOLUTE_PATH`` (so a
    resume or a reader works from any directory); database URLs are kept as given."""
    if is_journal(url):
        return JOURNAL_PREFIX + str(journal_path(url).resolve())
    if "://" not in url:
        raise UserError(f"--storage {url!r} is neither a database URL (sqlite:///run/study.db, "
                        "postgresql+psycopg2://user:password@host:5432/db) nor a journal file "
                        "(journal:PATH, or a path ending in .log, .journal or .jsonl)")
    return url


def open_storage(url: str, *, create: bool = True) -> Any:
    """An Optuna storage for ``url`` (see the module docstring).

    With ``create=False`` (readers) a journal file that does not exist is an error instead of a
    new empty study storage. A missing database driver or an unreachable server is a
    :class:`UserError` that names the URL (without its password) and the fix.
    """
    import optuna

    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = journal_path(url)
        if not create and not path.is_file():
            raise UserError(f"the study journal {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    url = normalize_url(url)
    try:
        return optuna.storages.RDBStorage(url)
    except ModuleNotFoundError as exc:
        hint = POSTGRES_HINT if url.split(":", 1)[0].split("+")[0] in POSTGRES_SCHEMES else (
            f"install the database driver it needs ({exc.name})")
        raise UserError(f"cannot open Optuna storage {redact(url)}: no module {exc.name!r}; "
                        f"{hint}") from None
    except Exception as exc:  # a bad URL, an unreachable server or a full disk, before compute
        cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
        why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if "disk is full" in why or "No space left" in why:
            why += " (free some space, then run the same command again)"
        raise UserError(f"cannot open Optuna storage {redact(url)}: {why}") from None


def finish_trial(study: Any, trial: Any, state: Any, values: Sequence[float] | None = None,
                 attrs: Mapping[str, Any] | None = None) -> None:
    """Finish a RUNNING ``trial`` of ``study`` that no live process asked (a killed driver's):
    set the user ``attrs`` in order, then ``state`` (an Optuna ``TrialState``) with ``values``.

    Written straight to the study's storage: ``Study.tell`` would also run the sampler's
    ``after_trial`` for a trial the sampler never proposed in this process.
    """
    # Optuna has no public way to write a trial by its id outside tell(): ``Study._storage``
    # and ``FrozenTrial._trial_id`` are internals (present through Optuna 5.1). A rename breaks
    # --resume after a killed driver (tests/test_resume.py) with an AttributeError.
    storage, trial_id = study._storage, trial._trial_id
    for key, value in (attrs or {}).items():
        storage.set_trial_user_attr(trial_id, key, value)
    if values is None:
        storage.set_trial_state_values(trial_id, state)
    else:
        storage.set_trial_state_values(trial_id, state, list(values))


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``.

    >>> redact("postgresql://me:secret@localhost:5432/db")
    'postgresql://me:***@localhost:5432/db'
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    if ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def study_storage_url(storage: Any, run_dir: RunDir) -> str:
    """The study storage URL of a run (see :meth:`RunDir.storage_url`), checked: a SQLite file
    must exist and be SQLite (Optuna would otherwise create or write into it)."""
    if not isinstance(storage, str) or not storage:
        raise RunError(f"{run_dir.meta} has no `storage` (an Optuna storage URL)")
    if is_journal(storage):
        path = journal_path(storage)
        moved = run_dir.root / path.name
        if not path.is_file() and moved.is_file():  # the run directory was moved or copied
            return JOURNAL_PREFIX + str(moved.resolve())
        return storage
    storage = run_dir.storage_url(storage)
    if not storage.startswith("sqlite:///"):
        return storage
    db = Path(storage.removeprefix("sqlite:///"))
    if db.is_file():
        _check_sqlite(db, run_dir)
        return storage
    # Never let Optuna create an empty database in place of a missing one.
    raise RunError(f"the study database {db} (from {run_dir.meta}) does not exist")


SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_sqlite(db: Path, run_dir: RunDir) -> None:
    """A study file that is empty or not SQLite is a clear error (Optuna would write into it)."""
    try:
        with db.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise RunError(f"cannot read the study database {db}: {exc.strerror or exc}") from None
    if head != SQLITE_MAGIC:
        what = "is empty" if not head else "is not an SQLite database"
        raise RunError(f"the study database {db} (from {run_dir.meta}) {what}; it is corrupted "
                       "or was overwritten. The trial records in trials/ are intact, but fronts "
                       "and exports need the study: restore study.db from a backup")
