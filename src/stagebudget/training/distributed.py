"""The few collective steps a trial needs when it trains on several workers.

Ray Train starts the workers and their ``torch.distributed`` process group
(:mod:`stagebudget.searching.workers`); transformers' Trainer picks the group up and trains
data-parallel. Everything else a trial does is rank 0's: it evaluates, writes the curve and the
records. The other ranks follow rank 0's decisions, which these helpers hand them, so every
rank takes the same path through the pipeline (a rank that skipped a collective step would
leave the others waiting). In a single process every helper is a no-op.
"""

from __future__ import annotations

from typing import Any


def world_size() -> int:
    """Processes in the trial's process group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the trial's process group (0 when there is none)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects); ``value`` itself in one process."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank; ``[value]`` in one process."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a stop decision all ranks must share)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait until every rank got here (nothing in one process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


class SharedCache:
    """A :class:`~stagebudget.prefixcache.PrefixCache` as the workers of one trial share it:
    rank 0 looks entries up, holds the locks, publishes and removes; every rank gets rank 0's
    answer to a lookup, so all restore, resume or train alike, and each prefix is written once.
    Every rank must make the same calls in the same order (the pipeline does)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.root = inner.root
        self.lead = rank() == 0

    def find(self, key: str, kind: str, steps: int) -> Any:
        return from_rank0(self.inner.find(key, kind, steps) if self.lead else None)

    def latest_checkpoint(self, key: str, steps: int) -> Any:
        return from_rank0(self.inner.latest_checkpoint(key, steps) if self.lead else None)

    def numerics_changes(self, context: dict[str, Any]) -> list[str]:
        return self.inner.numerics_changes(context) if self.lead else []  # type: ignore[no-any-return]

    def training(self, key: str, steps: int | None = None) -> Any:
        import contextlib

        return self.inner.training(key, steps) if self.lead else contextlib.nullcontext()

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.publish(*args, **kwargs) if self.lead else None

    def remove(self, entry: Any) -> None:
        if self.lead:
            self.inner.remove(entry)
