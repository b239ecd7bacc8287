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
  (e.g. whether an expert set is empty and RFT skipped).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)
MAIN_PID_ENV = "RLOOP_MAIN_PID"  # set by the main process for the ranks Lightning's launcher starts


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


def start_ranks(accelerator: Any = "auto", devices: Any = "auto", num_nodes: int = 1) -> None:
    """Start every rank of the loop and initialise the process group, once; no-op on one process.

    ``accelerator``, ``devices`` and ``num_nodes`` are the phases' Trainer settings. Lightning decides
    from the environment who starts the processes: its own launcher (the ranks re-run this command),
    or ``torchrun``/SLURM, which started them already. The group's backend is the accelerator's (gloo
    on CPU, NCCL on CUDA); every phase's strategy (DDP, FSDP2) then works inside it.
    """
    if dist.is_available() and dist.is_initialized():
        return
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    if fabric.world_size == 1:
        return
    from lightning.fabric.plugins.environments import LightningEnvironment

    if type(fabric.strategy.cluster_environment) is LightningEnvironment:
        if fabric.local_rank > 0:  # a rank Lightning's launcher started: it must not outlive the main process
            end_with_parent(int(os.environ.get(MAIN_PID_ENV, os.getppid())))
        else:
            os.environ[MAIN_PID_ENV] = str(os.getpid())  # the launcher copies the environment to the ranks
    fabric.launch()  # starts the other ranks (unless the cluster did), then initialises the group
    log.info("rank %d of %d started (%s)", dist.get_rank(), dist.get_world_size(),
             type(fabric.strategy.cluster_environment).__name__)


def end_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` (the main process that launched it) dies,
    however it dies (SIGKILL included): a rank left running would hold its GPU and wait in collectives,
    outside the run lock. Exits at once when ``parent`` is gone already. Linux only
    (``prctl(PR_SET_PDEATHSIG)``); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        log.error("the main process %d is gone: rank exits", parent)
        os._exit(1)
