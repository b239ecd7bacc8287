"""Which process of a multi-process loop this is, and how the loop's processes start and wait for each other.

``rloop fit`` with multi-device phases (``trainer: {devices: 2, strategy: ddp}``) runs as one process
per device, all of them from the start (``start_ranks``): after the main process has checked the
configuration and built theta_0 (a single-process job), Lightning's launcher starts ranks 1..N-1,
each re-running ``rloop fit``, and every rank joins one process group, initialised once through
Lightning's cluster-environment plugins (``LightningEnvironment`` for its own launch,
``TorchElasticEnvironment`` under ``torchrun``, ``SLURMEnvironment`` under ``srun``, which start every
rank themselves). Everything after that happens inside the group, on every rank:

- theta_0's and every later held-out evaluation split their problems over the ranks;
- every phase's Trainer finds the group (``LOCAL_RANK`` set, ``torch.distributed`` initialised) and
  neither launches processes nor initialises another group; its strategy (DDP, FSDP2) builds on it;
- every vLLM engine joins the group (``distributed_executor_backend="external_launcher"``), so it
  never creates a world-size-1 group of its own that the Trainers would then take for the world;
- the run directory's bookkeeping (manifest, phase directories, expert sets, held-out evaluations,
  report, lock, W&B run) is done by the main process (global rank 0) alone; around each phase every
  rank passes the same barriers and re-reads the manifest, so all ranks agree on what is complete
  (e.g. whether an expert set is empty and RFT skipped). The main process's own steps end in
  ``agreement.on_main_process``: when one fails, every rank raises its error at once.

How long a rank waits for the others is one setting, the loop's ``distributed_timeout``: the group
is initialised with it, so it bounds the rendezvous and every later collective and barrier. Under
``torchrun``/SLURM ranks 1..N-1 start with the main process and wait at the rendezvous while it
checks the configuration and builds theta_0 (a base build or a model download can take longer than
``torch.distributed``'s default 30 minutes); the main process's other work alone (e.g. writing an
expert set) is short. When the wait runs out, ``start_ranks`` raises an error naming the setting.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from rloop_lightning.child_processes import end_with_parent

log = logging.getLogger(__name__)
MAIN_PID_ENV = "RLOOP_MAIN_PID"  # set by the main process for the ranks Lightning's launcher starts
DEFAULT_TIMEOUT_SECONDS = 7200.0  # the loop's distributed_timeout


class RendezvousTimeout(RuntimeError):
    """The process group did not form within the loop's ``distributed_timeout``."""


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Global rank 0: from the process group once there is one, else from the launcher's environment
    (Lightning sets ``LOCAL_RANK``/``NODE_RANK`` for the ranks it starts, ``torchrun`` sets ``RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def share_from_main(value: Any) -> Any:
    """The main process's ``value`` on every rank (``value`` itself on one process): facts only the main
    process knows, such as the run directory a W&B sweep gives it."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process, or before the first multi-device phase)."""
    if distributed():
        dist.barrier()


def start_ranks(accelerator: Any = "auto", devices: Any = "auto", num_nodes: int = 1,
                timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """Start every rank of the loop and initialise the process group, once; no-op on one process.

    ``accelerator``, ``devices`` and ``num_nodes`` are the phases' Trainer settings. Lightning decides
    from the environment who starts the processes: its own launcher (the ranks re-run this command),
    or ``torchrun``/SLURM, which started them already. The group's backend is the accelerator's (gloo
    on CPU, NCCL on CUDA); every phase's strategy (DDP, FSDP2) then works inside it. Its timeout,
    ``timeout_seconds`` (the loop's ``distributed_timeout``), bounds the wait for the other ranks here
    and in every later collective; a rendezvous that runs out raises ``RendezvousTimeout``.
    """
    if dist.is_available() and dist.is_initialized():
        return
    if not timeout_seconds > 0:
        raise ValueError(f"distributed_timeout must be > 0 seconds, got {timeout_seconds}")
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy=DDPStrategy(timeout=timedelta(seconds=timeout_seconds)))
    if fabric.world_size == 1:
        return
    from lightning.fabric.plugins.environments import LightningEnvironment

    if type(fabric.strategy.cluster_environment) is LightningEnvironment:
        if fabric.local_rank > 0:  # a rank Lightning's launcher started: it must not outlive the main process
            end_with_parent(int(os.environ.get(MAIN_PID_ENV, os.getppid())))
        else:
            os.environ[MAIN_PID_ENV] = str(os.getpid())  # the launcher copies the environment to the ranks
    started = time.monotonic()
    try:
        fabric.launch()  # starts the other ranks (unless the cluster did), then initialises the group
    except Exception as error:
        waited = time.monotonic() - started
        if waited < 0.9 * timeout_seconds:  # not a wait that ran out: the error as it is
            raise
        raise RendezvousTimeout(rendezvous_timeout_message(fabric.global_rank, fabric.world_size, waited,
                                                           timeout_seconds)) from error
    log.info("rank %d of %d started (%s)", dist.get_rank(), dist.get_world_size(),
             type(fabric.strategy.cluster_environment).__name__)


def rendezvous_timeout_message(rank: int, world_size: int, waited: float, timeout_seconds: float) -> str:
    """What a rank says when the process group did not form within ``distributed_timeout``."""
    if rank == 0:
        waiting_for = "the other ranks (did they start, and can they reach MASTER_ADDR:MASTER_PORT?)"
    else:
        waiting_for = ("the main process (rank 0), which checks the configuration and builds or downloads theta_0 "
                       "before it joins (under torchrun/SLURM every rank starts at once)")
    return (f"rank {rank} of {world_size} waited {waited:.0f} s for {waiting_for}; the process group did not form "
            f"within distributed_timeout = {timeout_seconds:g} s. Raise distributed_timeout (e.g. "
            f"--distributed_timeout {max(2 * timeout_seconds, DEFAULT_TIMEOUT_SECONDS):g}) if the main process needs "
            "longer, or see the main process's log for why it did not join.")
