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
