"""Helper processes (the async sampler, reward workers) that end with their parent and leave stop signals to it.

A cluster stops a job by signalling every process of it: Slurm sends SIGTERM to each process of the
step, systemd to each of the unit's cgroup, a terminal's Ctrl-C SIGINT to the foreground process
group. The training process handles those (``callbacks.preemption``: it finishes its batch, saves a
checkpoint and exits 143/130), and it may need its helpers for that batch: a helper therefore ignores
SIGTERM and SIGINT, and its parent stops it when the phase ends (``SIGUSR1`` or SIGKILL, see its
owner). A helper must never outlive its parent either: it asks Linux to SIGKILL it when the parent
dies, and, since the parent may die before that request is made, checks at once that its parent is
still the process that started it.

Nothing here imports torch: a spawned helper calls these first, before its heavy imports.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def end_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies, however it dies (SIGKILL included), and
    exit at once when ``parent`` is gone already (this process was re-parented before it got here).
    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere it only checks the parent. Linux counts the
    *thread* that started this process as its parent: start helpers from a thread that lives as long as
    they should (the main thread)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def leave_stop_signals_to_parent() -> None:
    """Ignore SIGTERM and SIGINT: a job-wide signal is the training process's to act on; it stops this one."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
