"""Which process of a multi-process loop this is, and how the loop's processes wait for each other.

``rloop fit`` with a multi-device phase (``trainer: {devices: 2, strategy: ddp}``) runs as one process
per device. Lightning's launcher starts ranks 1..N-1 when the first multi-device phase starts; each
re-runs ``rloop fit`` from the top and skips the phases the manifest already marks complete, so every
rank reaches that phase's ``trainer.fit`` (under ``torchrun`` or on several nodes, every rank starts
at once and meets the others in the same place). From then on the ranks stay in step:

- training phases (GRPO, RFT) run on every rank;
- the run directory's bookkeeping (manifest, phase directories, expert sets, held-out evaluations,
  report, lock, W&B run) is done by the main process (global rank 0) alone;
- around each phase every rank passes the same barriers and re-reads the manifest, so all ranks
  agree on what is complete (e.g. whether an expert set is empty and RFT skipped).

Before any process group exists the other ranks are not running yet (or are waiting in their first
``fit``), so a barrier there is rightly a no-op.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Global rank 0: from the process group once there is one, else from the launcher's environment
    (Lightning sets ``LOCAL_RANK``/``NODE_RANK`` for the ranks it starts, ``torchrun`` sets ``RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def barrier() -> None:
    """Wait for every rank (no-op in a single process, or before the first multi-device phase)."""
    if distributed():
        dist.barrier()
