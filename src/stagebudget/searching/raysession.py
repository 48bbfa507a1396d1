"""The Ray session a search drives: the driver lock, reaping a dead driver's Ray processes
(read from ``/proc``), starting or joining Ray, and the environment Tune runs under.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stagebudget.errors import ClusterError, UserError
from stagebudget.rundir import RunDir
from stagebudget.space.schema import SearchSpace

log = logging.getLogger(__name__)


def reap_ray_session(meta: dict[str, Any]) -> list[int]:
    """End the processes of the private local Ray a killed driver left behind (its
    DashboardAgent, RuntimeEnvAgent, raylet...): those whose command line names the session
    directory recorded in run.json, on this host. Call only while holding the run's
    :class:`DriverLock` (the driver that started that Ray is then gone). Returns the pids ended.
    """
    session, host = meta.get("ray_session_dir"), meta.get("ray_host")
    proc = Path("/proc")
    if not session or host != os.uname().nodename or not proc.is_dir():
        return []
    mine = {os.getpid(), os.getppid()}
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        if _uses_session(entry, session):
            pids.append(int(entry.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(map(_alive, pids)):
            time.sleep(0.1)
    if pids:
        log.info("ended %d processes left by the killed driver's Ray (%s)", len(pids), session)
    return pids


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent that never reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _uses_session(proc_entry: Path, session: str) -> bool:
    """Whether a /proc entry belongs to the Ray session: its command line names the session
    directory, or (agents retitle themselves, e.g. ``ray::DashboardAgent``) it holds a log file
    open there."""
    try:
        if session.encode() in (proc_entry / "cmdline").read_bytes():
            return True
        for fd in (proc_entry / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(session + os.sep):
                    return True
    except OSError:  # gone, or not ours to read
        return False
    return False


class DriverLock:
    """One driver per run: an exclusive ``flock`` on ``RUN/.driver.lock`` for the whole search
    or resume. The kernel drops it when the process dies, so a killed driver never blocks a
    resume; a second driver on a live run is refused, naming the one that holds it."""

    def __init__(self, run: RunDir) -> None:
        import fcntl

        self.path = run.root / ".driver.lock"
        self._fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise UserError(
                f"run {run.root} is being driven right now by {holder}; one driver per run: "
                "wait for it to finish (or stop it), then resume with --resume") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"stagebudget pid {os.getpid()} on {os.uname().nodename}, started "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fh.flush()

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock)."""
        if not self._fh.closed:
            self._fh.close()


def choose_local_ray_auth() -> None:
    """Ray turns token authentication on for a new local cluster and warns that it did unless
    ``RAY_AUTH_MODE`` says so; say so, with the same mode, while Ray can still read it (its
    config is read once, when ``ray`` is first imported: later it would refuse its own token).
    A user's own ``RAY_AUTH_MODE`` wins; a process that imported Ray already keeps the notice."""
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def refuses_driver(address: str) -> bool:
    """Whether the Ray cluster at ``address`` (``host:port``, known to accept connections)
    refuses this driver for its token authentication: asked of the cluster's GCS, in well under
    a second, where ``ray.init`` retries for 20 s before it raises."""
    # Ray has no public call that only connects to a cluster's GCS: ``ray._raylet.GcsClient``
    # is an internal (its constructor raises AuthenticationError on a refused token, Ray 2.60).
    # A Ray that renames or moves it fails here with ImportError/TypeError, and
    # tests/test_cluster.py (the refused driver) fails with it.
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.exceptions import AuthenticationError

    try:
        with _quiet_stderr():  # Ray's C++ client logs the refusal on stderr as well
            GcsClient(address=address, cluster_id=None)
    except AuthenticationError:
        return True
    return False


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C++ log lines) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def init_ray(address: str | None, space: SearchSpace) -> str | None:
    """Start (or join) Ray; return the session directory of a private local Ray."""
    import ray

    if address is None:
        # "local" always starts a private Ray: a bare ray.init() would join any cluster that
        # `ray start` left running on this machine.
        ctx = ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                       log_to_driver=False, ignore_reinit_error=True, configure_logging=False)
        info = getattr(ctx, "address_info", None) or {}
        return str(info.get("session_dir") or "") or None
    else:
        try:
            ray.init(address=address, log_to_driver=False, ignore_reinit_error=True,
                     configure_logging=False)
        except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at --address {address}: "
                               f"{str(exc).splitlines()[0]}") from None
    return None


def shutdown_ray() -> None:
    """``ray.shutdown()``, then Python's crash report back on.

    Ray's core worker puts its own handlers on SIGSEGV and the like in place of
    :mod:`faulthandler`'s and removes them when it shuts down: a crash later in the process (at
    interpreter exit) then ended it with signal 11 and not one line on stderr (a search on a
    cluster did, once, in CI). Where stderr is no file (a test's captured stream) it is left.
    """
    import ray

    ray.shutdown()
    try:
        sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return
    faulthandler.disable()  # enable() alone keeps the handlers Ray removed as "enabled"
    faulthandler.enable(file=sys.stderr, all_threads=True)


# Tune settings read from the environment when ``fit`` starts (Ray's documented variables).
TUNE_ENV = {
    # Ctrl-C raises KeyboardInterrupt in the driver instead of Ray Tune's own handler (which
    # ends the experiment as if it had finished and prints a ``Tuner.restore`` hint that does
    # not apply): the search then settles the run for ``--resume`` and exits non-zero.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
    # No automatic loggers: build_tuner passes Tune's CSV and JSON loggers itself and leaves out
    # its TensorBoard logger, whose mere presence prints "To visualize your results with
    # TensorBoard, run: tensorboard --logdir <Ray's temporary session folder>". The curves are
    # in RUN/tensorboard/ (stagebudget.searching.tbcurves), which the search names instead.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


@contextlib.contextmanager
def ctrl_c_latch() -> Iterator[threading.Event]:
    """Ctrl-C ends the search even where Python drops its ``KeyboardInterrupt``.

    Python raises it wherever the main thread is; inside a ``__del__`` or a weakref callback
    (SQLAlchemy's, run by the garbage collector) it is printed as "Exception ignored" and lost,
    and the search ran on to its end and exited 0. The handler also sets the yielded event:
    :class:`~stagebudget.searching.tune_adapter.CtrlCCheck` raises again at Tune's next loop
    step, and leaving the block raises if the body ended normally after a Ctrl-C. Where SIGINT
    is not Python's default (ignored in a background job, or a caller's own handler), it is
    left as it is.
    """
    seen = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    installed = (previous is signal.default_int_handler
                 and threading.current_thread() is threading.main_thread())

    def on_sigint(signum: int, frame: Any) -> None:
        seen.set()
        signal.default_int_handler(signum, frame)

    if installed:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield seen
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)
    if seen.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def tune_env() -> Iterator[None]:
    """:data:`TUNE_ENV` set while Tune runs, the previous values restored after."""
    old = {k: os.environ.get(k) for k in TUNE_ENV}
    os.environ.update(TUNE_ENV)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
