"""Safe YAML/JSON reading and atomic writes.

Every write goes to a temporary file in the same directory and is renamed into place, so a crash
or a full disk never leaves a half-written record, export or cache entry behind.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from stagebudget.errors import ConfigError, UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def read_yaml(path: str | Path) -> Any:
    """Load a YAML file with ``yaml.safe_load``; a missing or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("file not found (give the path to an existing YAML file)", source=p)
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a UTF-8 text file ({_byte_hint(exc)}); a YAML file must be UTF-8 "
                          "text", source=p) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"malformed YAML{where}: {problem}", source=p) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except (FileExistsError, NotADirectoryError) as exc:  # a parent path is a file
        raise UserError(f"cannot write {p}: {exc.filename or p.parent} exists and is not a "
                        "directory") from None
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise
        raise UserError(f"cannot write {p}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except IsADirectoryError:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {p}: it is a directory; give a file path") from None
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in DISK_FULL:  # not the user's input: kept an OSError (retryable, and the
            raise OSError(exc.errno, f"{exc.strerror}; nothing was changed", str(p)) from None
        raise UserError(f"cannot write {p}: {exc.strerror or exc}; nothing was changed") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_yaml(path: str | Path, data: Any) -> None:
    """Write ``data`` as block-style YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a corrupted or non-UTF-8 file raises a UserError naming it."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not a UTF-8 text file ({_byte_hint(exc)}), so not JSON") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{p}: unreadable or corrupted JSON ({exc})") from None


def _byte_hint(exc: UnicodeDecodeError) -> str:
    """Where decoding failed: ``byte 0xff at offset 12``."""
    return f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a ``.safetensors`` file's framing, or None: the 8-byte header length,
    the JSON header and the file size its tensors' offsets imply (a truncated copy fails here).
    Reads only the header, so it is quick on any model size."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or n > size - 8:
                return f"{p.name}: no valid safetensors header (file of {size} bytes)"
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{p.name}: unreadable safetensors header ({exc})"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"{p.name}: truncated ({size} bytes, its header needs {expected})"
    return None
