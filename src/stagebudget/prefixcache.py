"""Stage-prefix reuse: a content-addressed cache of stage checkpoints that trials share.

Trials of one search often agree on their first stages: the same SFT settings for a different
number of steps, or the same SFT followed by different RL. With a constant learning rate, k
steps of a stage are exactly the first k steps of a longer run of the same stage, so a trial can
start from the longest prefix any trial has already trained and train only the rest.

A stage's **key** hashes everything that decides what it trains: the base model's content, the
task data, the seed, the numerics of this machine (device, torch threads, CPU kernels, package versions),
every earlier stage's full spec and this stage's spec without its step count (evaluation
intervals excepted: they do not change training). Under a key live:

- ``step-<s>/``: a Trainer checkpoint after ``s`` steps (the adapter or weights, optimizer,
  scheduler and RNG states; what ``Trainer.train(resume_from_checkpoint=...)`` reads), with the
  stage's curve rows, log rows and spend up to ``s`` in ``records.json``. Kept where another
  trial can go on from it: at the stage's end and at the steps the search space plans for the
  same stage (``checkpoint_steps``). A recovery checkpoint at an evaluation point (every
  ``recovery_seconds`` of training; 0, outside a search: every point) lets an interrupted trial
  go on; its trial removes it when a newer one lands and when the stage ends.
- ``end-<s>/``: a stage of ``s`` steps, with the whole stage's rows, metrics and spend. A LoRA
  stage keeps its adapter (``adapter/``, as PEFT saves it: MBs where the model is GBs); a
  restored stage's model is rebuilt by merging it onto the model the stage started from, which
  the stages before it restored or trained (the same computation as the merge at the stage's
  end, so the same weights bit for bit). A full fine-tuning stage keeps its weights
  (``merged/``, safetensors, in the dtype it trained in). A later stage starts from it.
- ``eval-0/`` under the key of the context alone (:func:`context_key`): the base model's
  evaluation, the same for every trial that starts from it.

Every entry is built under ``tmp/`` and renamed into place after its ``MANIFEST.json`` (SHA-256
and size of every file) is written, so a half-written entry is never seen; an entry whose files
no longer match its manifest is removed and rebuilt. One trial at a time trains a key (a file
lock beside the entries), so two trials that need the same prefix never both train it: the
second waits, then starts from what the first published. Entries are evicted least recently
used first when the cache grows past its size cap. The cache must live where every node reads
when trials run on several machines (``reuse.cache_dir`` in the space).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagebudget.fileio import atomic_write_json
from stagebudget.paths import default_prefix_cache_dir
from stagebudget.schedule import StageSpec
from stagebudget.version import numerics_changes

LOG = logging.getLogger("stagebudget")

MANIFEST = "MANIFEST.json"
RECORDS = "records.json"
CHECKPOINT = "checkpoint"
MERGED = "merged"
ADAPTER = "adapter"
CONTEXTS = "contexts"  # one JSON per context ever used: why entries of other numerics are missed
NUMERICS_FIELDS = frozenset({"cpu_capability", "versions"})
STEP, END, EVAL = "step", "end", "eval"
DEFAULT_MAX_GB = 20.0  # the least a default cap holds; larger models get more (default_max_gb)
# A Trainer checkpoint's bytes per trained parameter: fp32 weights (or adapter) plus AdamW's two
# moments (bench/cache_bytes.py measured 12.00 on a ~130M Llama and 12.06 on its adapter).
CHECKPOINT_BYTES_PER_PARAM = 12
ENTRIES_UNDER_DEFAULT_CAP = 8  # the default cap holds this many of a search's largest entries
LOCK_POLL_SECONDS = 1.0  # how often a trial waiting on a prefix looks for the step it needs
# Stage fields that do not change what trains: where a stage is measured (greedy decoding,
# which draws no random numbers) is left out of keys, so trials planned with different
# evaluation intervals share prefixes; a reused prefix brings the curve points it measured.
NOT_TRAINING = frozenset({"eval_interval"})
# Bump when an entry's layout or what a stage trains changes (the reward, the data order, the
# seeding...): older entries are then never hit. Releases also change keys (package versions).
CACHE_FORMAT = 4  # 4: the CPU capability joined the context


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class Entry:
    """One published entry: ``kind`` (``step`` or ``end``) after ``steps`` steps of its key."""

    key: str
    kind: str
    steps: int
    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def merged(self) -> Path:
        return self.path / MERGED

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    def holds(self) -> str:
        """What the entry stores: ``adapter`` or ``weights`` (a stage's end), the same plus
        ``+optimizer`` (a Trainer checkpoint: optimizer, scheduler and RNG states too), or
        ``records`` (an evaluation only)."""
        if self.kind == STEP:
            weights = "adapter" if (self.checkpoint / "adapter_config.json").is_file() else "weights"
            return f"{weights}+optimizer"
        if self.adapter.is_dir():
            return "adapter"
        return "weights" if self.merged.is_dir() else "records"

    def records(self) -> dict[str, Any]:
        """Curve rows, log rows, spend (and for an end entry the stage metrics)."""
        return json.loads((self.path / RECORDS).read_text(encoding="utf-8"))  # type: ignore[no-any-return]

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def stage_keys(context: dict[str, Any], stages: Sequence[StageSpec]) -> list[str]:
    """The key of each stage of a schedule: ``context`` (what every stage depends on: base
    model, data, seed, numerics) + the earlier stages' full specs + this stage's spec without
    its steps.

    >>> a = stage_keys({"seed": 0}, [StageSpec(kind="sft", steps=10)])
    >>> b = stage_keys({"seed": 0}, [StageSpec(kind="sft", steps=20)])
    >>> a == b   # the same stage, run for longer: one key, entries at different steps
    True
    >>> stage_keys({"seed": 1}, [StageSpec(kind="sft", steps=10)]) == a
    False
    """
    keys = []
    for index, spec in enumerate(stages):
        earlier = [s.model_dump(mode="json", exclude_none=True, exclude=set(NOT_TRAINING))
                   for s in stages[:index]]
        this = spec.model_dump(mode="json", exclude_none=True, exclude={"steps", *NOT_TRAINING})
        keys.append(_digest({"format": CACHE_FORMAT, "context": context, "earlier": earlier,
                             "stage": this})[:32])
    return keys


def context_key(context: dict[str, Any]) -> str:
    """The key of what every stage shares (the base model's evaluation lives under it)."""
    return _digest({"format": CACHE_FORMAT, "context": context, "base": True})[:32]


def checkpoint_bytes(trained_params: int) -> int:
    """The bytes of a Trainer checkpoint of a stage that trains ``trained_params`` parameters:
    the largest entry such a stage writes."""
    return CHECKPOINT_BYTES_PER_PARAM * trained_params


def default_max_gb(largest_entry_bytes: int) -> float:
    """The cap when ``reuse.max_gb`` is not set: :data:`DEFAULT_MAX_GB`, or room for
    :data:`ENTRIES_UNDER_DEFAULT_CAP` of the search's largest entries when that is more.

    >>> default_max_gb(10**6), default_max_gb(84 * 10**9)  # a 7B model's full-FT checkpoint
    (20.0, 672.0)
    """
    return max(DEFAULT_MAX_GB, ENTRIES_UNDER_DEFAULT_CAP * largest_entry_bytes / 1e9)


class PrefixCache:
    """Stage checkpoints under ``root`` (see the module docstring); ``max_gb`` caps its size."""

    def __init__(self, root: Path | str | None = None, max_gb: float = DEFAULT_MAX_GB) -> None:
        self.root = Path(root) if root is not None else default_prefix_cache_dir()
        self.max_bytes = int(max_gb * 1e9)

    # --- layout ----------------------------------------------------------------------------
    def key_dir(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / key

    def _name(self, kind: str, steps: int) -> str:
        return f"{kind}-{steps}"

    @contextmanager
    def training(self, key: str, steps: int | None = None) -> Iterator[None]:
        """Hold the lock of ``key`` while a stage of it trains; while another trial holds it,
        wait, unless ``steps`` is given and the other trial publishes the checkpoint or the
        end of ``key`` at ``steps`` meanwhile: then go on without the lock, since what this
        stage needs is there. (A trial training a longer stage of the same prefix passes the
        step a shorter one ends at long before its stage ends and it lets the lock go.)"""
        from filelock import FileLock, Timeout

        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        while True:
            try:
                lock.acquire(timeout=LOCK_POLL_SECONDS)
                break
            except Timeout:
                if steps is not None and self._published(key, steps):
                    yield
                    return
        try:
            yield
        finally:
            lock.release()

    def _published(self, key: str, steps: int) -> bool:
        """A checkpoint or an end of ``key`` at ``steps`` is in place (not verified: the
        lookup that takes it verifies it)."""
        return any((self.key_dir(key) / self._name(kind, steps) / MANIFEST).is_file()
                   for kind in (STEP, END))

    # --- lookup ----------------------------------------------------------------------------
    def entries_of(self, key: str) -> list[Entry]:
        """Published entries of ``key`` (not verified)."""
        folder = self.key_dir(key)
        out = []
        for path in folder.glob("*-*") if folder.is_dir() else []:
            kind, _, steps = path.name.partition("-")
            if kind in (STEP, END, EVAL) and steps.isdigit() and (path / MANIFEST).is_file():
                out.append(Entry(key, kind, int(steps), path))
        return out

    def find(self, key: str, kind: str, steps: int) -> Entry | None:
        """The verified ``kind`` entry of ``key`` at exactly ``steps`` steps, if any."""
        entry = Entry(key, kind, steps, self.key_dir(key) / self._name(kind, steps))
        return entry if (entry.path / MANIFEST).is_file() and self.verify(entry) else None

    def latest_checkpoint(self, key: str, steps: int) -> Entry | None:
        """The verified checkpoint of ``key`` with the most steps, at most ``steps``."""
        found = sorted((e for e in self.entries_of(key) if e.kind == STEP and e.steps <= steps),
                       key=lambda e: e.steps, reverse=True)
        return next((e for e in found if self.verify(e)), None)

    def verify(self, entry: Entry) -> bool:
        """True when every file matches the manifest; a damaged entry is removed (and will be
        rebuilt by whoever needs it) and False returned."""
        try:
            manifest = json.loads((entry.path / MANIFEST).read_text(encoding="utf-8"))
            files = manifest["files"]
            ok = all((entry.path / name).is_file()
                     and (entry.path / name).stat().st_size == meta["size"]
                     and _file_digest(entry.path / name) == meta["sha256"]
                     for name, meta in files.items())
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            LOG.warning("prefix cache: %s is damaged (its files do not match its manifest); "
                        "removing it, it will be trained again", entry.path)
            self._remove(entry.path)
            return False
        self._touch(entry.path)
        return True

    def _touch(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            os.utime(path / MANIFEST)  # last use, for least-recently-used eviction

    def numerics_changes(self, context: dict[str, Any]) -> list[str]:
        """Record ``context`` and say how the numerics (CPU kernels, package versions) of earlier
        contexts of the same base model, data and seed differ from it: their entries are never
        hit from here, and a user who sees stages train again should learn why."""
        folder = self.root / CONTEXTS
        mine = folder / f"{context_key(context)}.json"
        with contextlib.suppress(OSError):
            if not mine.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_json(mine, context)
        rest = {k: v for k, v in context.items() if k not in NUMERICS_FIELDS}
        changes: list[str] = []
        for path in sorted(folder.glob("*.json")):
            try:
                other = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if path != mine and {k: v for k, v in other.items()
                                 if k not in NUMERICS_FIELDS} == rest:
                changes += [c for c in numerics_changes(other, context) if c not in changes]
        return changes

    # --- publishing ------------------------------------------------------------------------
    def publish(self, key: str, kind: str, steps: int, records: dict[str, Any],
                fill: Callable[[Path], Any]) -> Entry | None:
        """Build an entry in a scratch folder (``fill(folder)`` writes its files), write its
        records and manifest, then rename it into place. Returns None when the same entry was
        published meanwhile (by another trial) or when writing failed: a cache that cannot be
        written slows a search down but never fails a trial."""
        final = self.key_dir(key) / self._name(kind, steps)
        if (final / MANIFEST).is_file():
            return None
        scratch = self.root / "tmp" / f"{uuid.uuid4().hex}"
        try:
            scratch.mkdir(parents=True)
            fill(scratch)
            atomic_write_json(scratch / RECORDS, records)
            files = {str(f.relative_to(scratch)): {"size": f.stat().st_size,
                                                    "sha256": _file_digest(f)}
                     for f in sorted(scratch.rglob("*")) if f.is_file()}
            atomic_write_json(scratch / MANIFEST, {"key": key, "kind": kind, "steps": steps,
                                                   "created": time.time(), "files": files})
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(scratch, final)
        except OSError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            if not (final / MANIFEST).is_file():
                LOG.warning("prefix cache: could not publish %s (%s)", final, exc)
            return None
        self.evict()
        return Entry(key, kind, steps, final)

    def remove(self, entry: Entry) -> None:
        """Remove a published entry (a recovery checkpoint its trial no longer needs)."""
        self._remove(entry.path)

    def _remove(self, path: Path) -> None:
        """Move ``path`` out of sight atomically, then delete it."""
        grave = self.root / "tmp" / f"removed-{uuid.uuid4().hex}"
        try:
            grave.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, grave)
        except OSError:
            return
        shutil.rmtree(grave, ignore_errors=True)

    # --- housekeeping ----------------------------------------------------------------------
    def all_entries(self) -> list[Entry]:
        """Every published entry (not verified), oldest use first."""
        found = []
        for folder in (self.root / "entries").glob("*/*") if self.root.is_dir() else []:
            found.extend(self.entries_of(folder.name))
        return sorted(found, key=lambda e: _last_used(e.path))

    def size(self) -> int:
        """Bytes held by published entries."""
        return sum(e.size() for e in self.all_entries())

    def evict(self, max_bytes: int | None = None) -> list[Entry]:
        """Remove least recently used entries until the cache holds at most ``max_bytes``
        (default: its cap). Returns what was removed."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        entries = self.all_entries()
        sizes = {e.path: e.size() for e in entries}
        total, removed = sum(sizes.values()), []
        for entry in entries:
            if total <= cap:
                break
            self._remove(entry.path)
            total -= sizes[entry.path]
            removed.append(entry)
        return removed

    def clean_scratch(self, older_than_seconds: float = 3600.0) -> None:
        """Delete scratch folders left by writers that died (older than an hour)."""
        now = time.time()
        for path in (self.root / "tmp").glob("*") if (self.root / "tmp").is_dir() else []:
            if now - path.stat().st_mtime > older_than_seconds:
                shutil.rmtree(path, ignore_errors=True)


def _last_used(path: Path) -> float:
    try:
        return (path / MANIFEST).stat().st_mtime
    except OSError:
        return 0.0


__all__ = ["DEFAULT_MAX_GB", "Entry", "PrefixCache", "checkpoint_bytes", "context_key",
           "default_max_gb", "stage_keys"]
