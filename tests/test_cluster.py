"""The cluster path: a two-node Ray cluster on loopback, a search driven through ``address``.

The nodes are started with ``ray start --block`` in their own process groups and stopped by
signalling those groups, not with ``ray stop --force`` (which would kill every Ray process on the
machine, including other users' clusters).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from stagebudget.rundir import RunDir

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ.copy())


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_nodes(address: str, n: int, timeout: float = 180, log: Path | None = None) -> None:
    """Until ``ray status`` lists ``n`` nodes (on a loaded 2-core machine a node takes a minute
    or more to start); the failure shows the end of the node's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([RAY, "status", "--address", address], capture_output=True,
                             text=True, env=os.environ.copy()).stdout
        if out.count("node_") >= n:
            return
        time.sleep(1)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.is_file() else ""
    raise AssertionError(f"cluster at {address} did not reach {n} nodes in {timeout:.0f} s\n{tail}")


@pytest.mark.slow
def test_search_on_a_two_node_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray 2.60 turns token auth on for a head when ~/.ray/auth_token exists, but `ray start
    # --address` and `ray status` then stay "disabled" and are refused: one explicit mode for
    # every process (this driver included; a local ray.init() sets "token" in os.environ too).
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = _start(["--head", f"--port={port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                   "--include-dashboard=false"], tmp_path / "head.log")
    nodes = [head]
    try:
        _wait_for_nodes(address, 1, log=tmp_path / "head.log")  # a worker joins a head that is up
        nodes.append(_start([f"--address={address}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", f"--resources={WORKER_MARK}"],
                            tmp_path / "worker.log"))
        _wait_for_nodes(address, 2, log=tmp_path / "worker.log")
        head_id, worker_id = _node_ids(address)
        data = yaml.safe_load(DEMO.read_text())
        data.update(trials=3, concurrency=2, references=False)
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump(data))
        _refused_without_token(space, address, tmp_path / "runs")
        # The driver runs in a fresh process: Ray caches its auth mode per process, and earlier
        # tests in this pytest process already initialised a local Ray.
        driver = (
            "import functools, sys\n"
            "from pathlib import Path\n"
            "from stagebudget.searching.driver import run_search\n"
            "from stagebudget.testing.fakes import fake_trial_fn\n"
            "print(run_search(Path(sys.argv[1]), name='cluster', runs_dir=Path(sys.argv[2]),\n"
            "      address=sys.argv[3], live=False,\n"
            "      trial_fn=functools.partial(fake_trial_fn, seconds=3)))\n"
        )
        res = subprocess.run([sys.executable, "-c", driver, str(space), str(tmp_path / "runs"),
                              address], capture_output=True, text=True, timeout=300,
                             env=os.environ.copy())
        assert res.returncode == 0, res.stderr[-3000:]
        run = RunDir(tmp_path / "runs" / "cluster")
        meta = run.read_meta()
        assert meta["address"] == address
        study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
        records = run.records()
        assert sorted(r.status for r in records) == ["COMPLETE"] * 3
        # Each node has 1 CPU and two trials run at once: one of them ran on the worker node,
        # and its record (written there, read here) says so.
        ran_on = {r.node.get("node_id") for r in records}
        assert worker_id in ran_on, (ran_on, head_id, worker_id)
        assert ran_on <= {head_id, worker_id}
    finally:
        for proc in reversed(nodes):
            _stop(proc)


WORKER_MARK = '{"stagebudget_test_worker": 1}'  # a resource only the worker node has


def _node_ids(address: str) -> tuple[str, str]:
    """(head, worker) Ray node ids of the two-node cluster, the worker told by WORKER_MARK."""
    code = ("import json, sys, ray\n"
            "ray.init(address=sys.argv[1], log_to_driver=False)\n"
            "print(json.dumps({n['NodeID']: 'stagebudget_test_worker' in n['Resources']\n"
            "                  for n in ray.nodes() if n['Alive']}))\n")
    res = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                         timeout=120, env=os.environ.copy())
    assert res.returncode == 0, res.stderr[-2000:]
    nodes = json.loads(res.stdout.strip().splitlines()[-1])
    [head] = [n for n, worker in nodes.items() if not worker]
    [worker] = [n for n, worker in nodes.items() if worker]
    return head, worker


def _refused_without_token(space: Path, address: str, runs: Path) -> None:
    """A driver without the cluster's auth settings, or with a dead address, gets one paragraph
    naming the address and what to set (exit 2, no traceback), and no run directory."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    for addr, said in ((address, "Set RAY_AUTH_MODE=token"),
                       (f"127.0.0.1:{_free_port()}", "nothing accepts connections")):
        res = subprocess.run([sys.executable, "-m", "stagebudget.cli", "search", str(space),
                              "--address", addr, "--name", "refused", "--runs-dir", str(runs),
                              "--no-live"], capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"--address {addr}" in res.stderr and said in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert not (runs / "refused").exists()
