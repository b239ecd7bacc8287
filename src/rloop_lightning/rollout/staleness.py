"""Rollout settings and the staleness bound of asynchronous rollouts, as small pure functions.

Versions count rollout batches: the policy after training on batches 0..v-1 is version v, so the
synchronous phase samples batch k with version k (staleness 0). Asynchronous rollouts sample
batch k with version ``v >= k - max_staleness`` and train on it at step k:

    staleness(k, v) = k - v,        batch k may be submitted once version k - max_staleness exists.

The bound is kept by *waiting*, never by dropping: a batch is submitted to the sampler only when
the version it would be sampled with is recent enough, and the trainer waits for it; no sample is
thrown away, so every prompt of the data order is trained on, as in the synchronous phase.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

DEFAULT_TIMEOUT_SECONDS = 1800.0
"""``rollout.timeout``'s default: 30 minutes, ``torch.distributed``'s default timeout (``timedelta(minutes=30)``)."""


@dataclass
class RolloutSettings:
    """Where and when rollouts are sampled. ``sync`` (default): in the trainer, between updates.
    ``async``: in a sampler process with its own engine and its own copy of the weights, up to
    ``max_staleness`` batches ahead of the trainer (``rloop_lightning.rollout.async_sampler``)."""

    mode: Literal["sync", "async"] = "sync"
    """``sync`` samples in the training process; ``async`` in a separate sampler process, overlapping training."""
    max_staleness: int = 1
    """Async: the sampler may run this many rollout batches ahead, so a batch trained at step k was
    sampled by policy version k - max_staleness or newer (0: the synchronous phase, bit for bit)."""
    seed: Optional[int] = None
    """Sampling seed; each request's seed derives from it, the rollout step, the rank and the
    dynamic-sampling round (``rollout.base.sampling_seed``). Default: the torch seed at fit start
    (``seed_everything``)."""
    sampler_cores: Optional[list[int]] = None
    """Async: CPU cores the sampler process is pinned to (torch threads = their number). Default:
    the upper half of the cores this process may use."""
    trainer_cores: Optional[list[int]] = None
    """Async: CPU cores the training process is pinned to while the phase runs. Default: the other
    cores (all when ``sampler_cores`` is given and covers them)."""
    sampler_device: str = "cpu"
    """Async: the device of the sampler's policy and engine: ``cpu``, or ``cuda:N`` (the sampler process
    then sees GPU N alone, as its ``cuda:0``; give the trainer other GPUs with CUDA_VISIBLE_DEVICES /
    ``trainer.devices`` for a disaggregated set-up, or the same GPU to share it)."""
    timeout: Optional[float] = DEFAULT_TIMEOUT_SECONDS
    """Async: seconds the trainer waits for one batch (the sampler's start, vLLM's included, counts
    toward the first) before it stops with a ``TimeoutError`` naming this setting. Default 1800:
    ``torch.distributed``'s own default for one process waiting on another, so that a sampler that is
    alive but stuck ends the phase in bounded time; raise it for batches that really take longer.
    ``null`` waits as long as the sampler process lives (a dead one is noticed within half a second)."""

    def __post_init__(self):
        if self.mode not in ("sync", "async"):
            raise ValueError(f"rollout.mode must be 'sync' or 'async', got {self.mode!r}")
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0 (0: synchronous results), got {self.max_staleness}")
        if self.sampler_device != "cpu" and not (self.sampler_device.startswith("cuda:")
                                                  and self.sampler_device[5:].isdigit()):
            raise ValueError(f"rollout.sampler_device must be 'cpu' or 'cuda:N', got {self.sampler_device!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"rollout.timeout must be positive seconds or null, got {self.timeout}")

    @property
    def is_async(self) -> bool:
        return self.mode == "async"


def staleness(step: int, version: int) -> int:
    """How many updates behind the trained policy (version ``step``) the sampling policy was."""
    return step - version


def may_submit(step: int, version: int, max_staleness: int) -> bool:
    """Whether batch ``step`` may be sampled now, with the newest pushed version ``version``."""
    return staleness(step, version) <= max_staleness


def check_admissible(step: int, version: int, max_staleness: int) -> None:
    """Refuse to train at ``step`` on a batch sampled by ``version`` beyond the bound (a bug, never data)."""
    if not 0 <= staleness(step, version) <= max_staleness:
        raise RuntimeError(f"rollout batch of step {step} was sampled by policy version {version}: staleness "
                           f"{staleness(step, version)} is outside 0..max_staleness={max_staleness}")


def split_cores(available: list[int], sampler_cores: Optional[list[int]],
                trainer_cores: Optional[list[int]]) -> tuple[list[int], list[int]]:
    """(trainer cores, sampler cores) of an asynchronous phase, from the cores this process may use.

    Default: the sampler takes the upper half, the trainer the rest. Errors name the cores: fewer
    than two (one sampler process needs a core of its own beside the trainer), cores not available,
    an empty set."""
    available = sorted(available)
    if sampler_cores is None and len(available) < 2:
        raise ValueError(f"rollout.mode=async runs one sampler process beside the trainer, each on its own cores, "
                         f"but this process may use {len(available)} core(s) {available}: use mode=sync")
    sampler = sorted(sampler_cores) if sampler_cores is not None else available[len(available) // 2:]
    if trainer_cores is not None:
        trainer = sorted(trainer_cores)
    else:
        trainer = [core for core in available if core not in sampler] or available
    for name, cores in (("sampler_cores", sampler), ("trainer_cores", trainer)):
        if not cores:
            raise ValueError(f"rollout.{name} is empty: give at least one core")
        missing = [core for core in cores if core not in available]
        if missing:
            raise ValueError(f"rollout.{name} {cores} names cores {missing} that this process may not use "
                             f"(available: {available})")
    return trainer, sampler


def check_rollout_mode(settings: RolloutSettings, world_size: int, strategy: str) -> None:
    """Asynchronous rollouts run one sampler process beside a single training process: refused, before
    any model loads, on several ranks (DDP/FSDP) and without a spare core for the sampler."""
    if not settings.is_async:
        return
    if world_size > 1:
        raise ValueError(f"rollout.mode=async runs one sampler process beside one training process; this phase "
                         f"has {world_size} ranks ({strategy}): use rollout.mode=sync on several ranks")
    split_cores(available_cores(), settings.sampler_cores, settings.trainer_cores)


def available_cores() -> list[int]:
    """The CPU cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
