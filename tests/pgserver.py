"""A throw-away PostgreSQL server on loopback for tests (the Debian ``postgresql`` package).

``initdb`` into a fresh directory, ``pg_ctl start`` on a free port bound to 127.0.0.1 with trust
authentication, yield a ``postgresql+psycopg2://`` URL, then stop the server and delete the
directory. PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` user.

When the binaries are missing the tests that need a server skip with the reason, unless
``STAGEBUDGET_REQUIRE_POSTGRES=1`` (CI sets it), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

REQUIRE_ENV = "STAGEBUDGET_REQUIRE_POSTGRES"


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (Debian keeps them off PATH)."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def missing_reason() -> str | None:
    """Why no server can be started here, or None when one can."""
    if find_bindir() is None:
        return ("PostgreSQL binaries (initdb, pg_ctl) not found; install the Debian package "
                "`postgresql`")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], as_postgres: bool) -> None:
    if as_postgres:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield its URL (database ``postgres``, user ``postgres``)."""
    bindir = find_bindir()
    assert bindir is not None, missing_reason()
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="stagebudget-pg-"))
    data = root / "data"
    data.mkdir()
    if as_postgres:
        user = pwd.getpwnam("postgres")
        for path in (root, data):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = _free_port()
    _run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
          "--no-sync"], as_postgres)
    opts = f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off"
    _run([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "server.log"),
          "-w", "start"], as_postgres)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(Exception):
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                 as_postgres)
        shutil.rmtree(root, ignore_errors=True)
