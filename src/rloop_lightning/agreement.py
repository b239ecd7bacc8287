"""Decisions that every rank of a ``torch.distributed`` group takes together.

On several ranks, a decision that changes which collective calls run next (skip a micro-batch's
backward, skip an update, abort on failed rewards, sample one more dynamic-sampling round, stop at
the end of the data) must come out the same on every rank: a rank that leaves a loop the others stay
in waits forever in their next all-reduce, or mixes its gradients with the wrong step's. Each rank
states its own view (a flag, a count) and one all-reduce makes it everybody's:

    bad = ranks_with(not torch.isfinite(loss))   # [1] on every rank when rank 1's loss is NaN
    if bad: ...                                  # the same skip, or the same error, everywhere

A failure is a decision too. A rank that raises where the others go on to a collective leaves them
waiting until the group's timeout, or lets them fail on the dead peer's closed connection, an error
that names nothing the user did. So a step whose failure could be one rank's (a reward function on
one rank, a file only the main process writes) ends with ``raise_together``: every rank passes it,
and when any rank failed, every rank raises that rank's error:

    error = None
    try:
        write_expert_set()        # on the main process only
    except Exception as caught:
        error = caught
    raise_together(error, "the expert set")   # rank 0 raises its error; rank 1 a copy of it, noted

(``on_main_process`` is that pattern for work only the main process does.) A step may end with it only
where no rank can be inside another collective: after collective-free work, never around it.

Without a process group (one process) these are the local answers, with no communication.
"""

from __future__ import annotations

import pickle
from typing import Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


def sums_of_ranks(values: Sequence[float]) -> list[float]:
    """The element-wise sums of every rank's ``values`` (the same length on every rank), in float64; the same
    list on every rank (one all-reduce). Counts stay exact up to 2**53."""
    if _group_size() == 1:
        return [float(value) for value in values]
    totals = torch.tensor([float(value) for value in values], dtype=torch.float64, device=_device())
    dist.all_reduce(totals)
    return totals.tolist()


class PeerFailure(RuntimeError):
    """Another rank's step failed with an error that cannot be copied to this rank; names that rank and error."""


def _portable(error: BaseException) -> bytes | str:
    """``error`` pickled for the other ranks, or, if it cannot be, its type and message."""
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001 -- an exception with unpicklable state: its text still travels
        return f"{type(error).__name__}: {error}"


def raise_together(error: Optional[BaseException], where: str) -> None:
    """Every rank calls this at the same point, with the exception its step raised (``None``: it did not).
    When any rank's step failed, every rank raises: a failed rank its own ``error``, the others a copy of
    the lowest failed rank's error (same type and message; a note names the rank and ``where``), or a
    ``PeerFailure`` with its text when it cannot be copied. One all-reduce when no rank failed."""
    if _group_size() == 1:
        if error is not None:
            raise error
        return
    failed = ranks_with(error is not None)
    if not failed:
        return
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else _portable(error))
    if error is not None:
        raise error
    rank, theirs = failed[0], errors[failed[0]]
    note = f"raised on rank {rank} in {where}; rank {dist.get_rank()} stops with it"
    if isinstance(theirs, bytes):
        copy = pickle.loads(theirs)  # the same job's code: the class imports here too
        copy.add_note(note)
        raise copy
    raise PeerFailure(f"{theirs} ({note})")


def on_main_process(where: str, work: Callable[[], T]) -> Optional[T]:
    """``work()`` on global rank 0 alone (its result there, ``None`` elsewhere); every rank calls this, waits
    for it, and raises the main process's error if ``work`` raised (``raise_together``). Replaces the
    barrier after work that only the main process does, which would hold the other ranks until the group's
    timeout when that work fails."""
    if _group_size() == 1:
        return work()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = work()
        except Exception as caught:  # noqa: BLE001 -- re-raised on every rank below
            error = caught
    raise_together(error, where)
    return result
