"""Decisions that every rank of a ``torch.distributed`` group takes together.

On several ranks, a decision that changes which collective calls run next (skip a micro-batch's
backward, skip an update, abort on failed rewards, sample one more dynamic-sampling round, stop at
the end of the data) must come out the same on every rank: a rank that leaves a loop the others stay
in waits forever in their next all-reduce, or mixes its gradients with the wrong step's. Each rank
states its own view (a flag, a count) and one all-reduce makes it everybody's:

    bad = ranks_with(not torch.isfinite(loss))   # [1] on every rank when rank 1's loss is NaN
    if bad: ...                                  # the same skip, or the same error, everywhere

Without a process group (one process) these are the local answers, with no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device() -> torch.device:
    """Where this group's collectives take tensors: the current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def ranks_with(flag: bool) -> list[int]:
    """The ranks (ascending) whose ``flag`` is true; the same list on every rank (one all-reduce)."""
    if _group_size() == 1:
        return [0] if flag else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_device())
    flags[dist.get_rank()] = int(bool(flag))
    dist.all_reduce(flags)
    return [rank for rank, value in enumerate(flags.tolist()) if value]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    return bool(ranks_with(flag))


def values_of_ranks(value: float) -> list[float]:
    """Every rank's ``value``, indexed by rank; the same list on every rank (one all-reduce)."""
    if _group_size() == 1:
        return [float(value)]
    values = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=_device())
    values[dist.get_rank()] = float(value)
    dist.all_reduce(values)
    return values.tolist()
