"""Checks a search makes before it starts anything: the space, the flags, the machine's
resources, the prefix cache folder, the Ray cluster and the MLflow server.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from pathlib import Path

from stagebudget.errors import ClusterError, ConfigError, UserError
from stagebudget.searching.raysession import refuses_driver
from stagebudget.space.sampler import make_sampler
from stagebudget.space.schema import SearchSpace
from stagebudget.training.vllmcheck import check_vllm


def check_mlflow(uri: str) -> None:
    """``--mlflow URI`` needs the mlflow package (Ray's MLflowLoggerCallback uses it)."""
    try:
        import mlflow
    except ImportError:
        raise UserError(f"--mlflow {uri!r} needs MLflow: pip install mlflow (or mlflow-skinny), "
                        "or leave --mlflow out") from None
    try:  # reach the tracking store now, not after the run directory exists
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--mlflow {uri!r}: MLflow cannot use this tracking URI: {first} "
                        "(e.g. sqlite:///mlflow.db or http://HOST:5000)") from None


def check_prefix_cache_dir(space: SearchSpace) -> None:
    """With reuse on, this machine must be able to create and write the prefix cache: else
    every trial would train alone and warn at every stage. Checked without writing anything
    (the nearest existing folder must be a writable directory)."""
    cache = space.reuse.cache()
    if cache is None:
        return
    root = Path(cache.root)
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    problem = None
    if existing is None or not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user"
    if problem is not None:
        raise ConfigError(
            f"the prefix cache directory {root} cannot be used: {problem}. Give reuse.cache_dir "
            "a directory this user can write (or set $STAGEBUDGET_PREFIX_CACHE), or turn reuse "
            "off with reuse: {enabled: false}", source=space.source_file, field="reuse.cache_dir")


def check_prefix_cache_size(space: SearchSpace) -> None:
    """A ``reuse.max_gb`` cap must hold the largest entry a trial writes (else the cache would
    evict every entry as it lands: reuse would silently do nothing)."""
    from stagebudget.plan.cost import CostModel, ModelShape
    from stagebudget.space.points import largest_cache_entry

    cap = space.reuse.max_gb
    if not space.reuse.enabled or cap is None:
        return
    largest = largest_cache_entry(space, CostModel.analytic(ModelShape.for_ref(space.base_model)))
    if largest > cap * 1e9:
        raise ConfigError(
            f"reuse.max_gb = {cap:g} cannot hold one prefix-cache entry of this space: the "
            f"largest, a Trainer checkpoint of its widest stage on {space.base_model}, is about "
            f"{largest / 1e9:.2g} GB (weights or adapter plus optimizer state). Give reuse.max_gb "
            f"at least {largest / 1e9:.2g} (or leave it out: the default is chosen from the model "
            "size), or turn reuse off with reuse: {enabled: false}",
            source=space.source_file, field="reuse.max_gb")


def check_local_resources(space: SearchSpace) -> None:
    """``concurrency`` trials at once must fit this machine's CPUs (and GPUs)."""
    res, n = space.resources_per_trial, space.concurrency
    cpus = os.cpu_count() or 1
    where = f"{space.source_file}: " if space.source_file else ""
    # each of a trial's workers holds cpu/gpu
    w, times = res.workers, (f" x workers {res.workers}" if res.workers > 1 else "")
    if n * w * res.cpu > cpus:
        raise UserError(
            f"{where}concurrency x resources_per_trial.cpu{times} = {n} x {res.cpu:g}"
            f"{f' x {w}' if w > 1 else ''} = {n * w * res.cpu:g} CPUs, but this machine has "
            f"{cpus}; lower `concurrency` (--concurrency), `resources_per_trial.cpu` or "
            "`resources_per_trial.workers`, or give --address of a Ray cluster")
    if res.gpu > 0:
        gpus = _local_gpus()
        if n * w * res.gpu > gpus:
            raise UserError(
                f"{where}concurrency x resources_per_trial.gpu{times} = {n} x {res.gpu:g}"
                f"{f' x {w}' if w > 1 else ''} = {n * w * res.gpu:g} GPUs, but this machine has "
                f"{gpus}; lower `concurrency`, `resources_per_trial.workers` or "
                "`resources_per_trial.gpu` (fractions such as 0.5 share a GPU)")


def check_cluster(address: str) -> None:
    """Before anything is written: a ``host:port`` address must answer, and let this driver in.

    Without this, Ray retries an unreachable address for 40 s and an authentication refusal for
    20 s, then raises with a traceback. ``ray://`` (Ray Client), ``auto`` and ``local`` are left
    to Ray.
    """
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach a Ray cluster at --address {address}: nothing accepts connections on "
            f"{host}:{port} ({exc.strerror or exc}). Give the address that `ray start --head` "
            "printed (host:6379 by default), or leave --address out to run on this machine; "
            "nothing was written") from None
    if refuses_driver(address):
        mode = os.environ.get("RAY_AUTH_MODE")
        now = f"RAY_AUTH_MODE is {mode!r}" if mode else "RAY_AUTH_MODE is not set"
        raise ClusterError(
            f"the Ray cluster at --address {address} refused this driver: it uses token "
            f"authentication and {now} here, or the token differs. Set RAY_AUTH_MODE=token and "
            "give the cluster's token: copy the head's ~/.ray/auth_token to this machine (or "
            "point RAY_AUTH_TOKEN_PATH at a copy, or set RAY_AUTH_TOKEN); every node started "
            "with `ray start` needs the same two settings. Nothing was written") from None


def _local_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        import torch

        return int(torch.cuda.device_count())
    except ImportError:
        return 0


def check_space(path: str | Path, *, trials: int | None = None, concurrency: int | None = None,
                search_hours: float | None = None, address: str | None = None,
                warn: Callable[[str], None] | None = None) -> SearchSpace:
    """Every check on a space, as ``validate`` and ``search`` both run it: the file and its
    feasibility at every corner, task files and a local model, this machine's resources, the
    sampler and its options, and the search budget. Nothing is written and Ray is not started.
    ``trials``, ``concurrency`` and ``search_hours`` are the CLI overrides; ``warn`` receives
    the input checks' warnings (default: printed as ``warning: ...``).
    """
    if search_hours is not None and not (math.isfinite(search_hours) and search_hours > 0):
        raise UserError(f"--search-hours/--budget-hours must be a positive number of "
                        f"device-hours (the search-wide budget), got {search_hours}")
    space = SearchSpace.load(path, trials=trials, concurrency=concurrency)
    for warning in space.check_inputs():
        if warn is not None:
            warn(warning)
        else:
            print(f"warning: {warning}", flush=True)
    if address is None:
        check_vllm(space.stages.items(), space.source_file)  # on a cluster: when a stage starts
        check_local_resources(space)
        check_prefix_cache_dir(space)  # on a cluster: the nodes' storage
    else:
        check_cluster(address)
    check_prefix_cache_size(space)
    make_sampler(space, space.trials)  # a bogus sampler option is an error now, not in Ray
    if search_hours is not None:
        space = space.with_search_hours(search_hours)
    search, per_trial = space.budget.search_hours, space.budget.per_trial_hours
    if search is not None and search < per_trial:
        raise UserError(
            f"{path}: the search budget ({search:g} device-hours, --search-hours or "
            f"budget.search_hours) is smaller than one trial's budget (budget.per_trial_hours = "
            f"{per_trial:g}), so no trial could start; give at least {per_trial:g}")
    return space
