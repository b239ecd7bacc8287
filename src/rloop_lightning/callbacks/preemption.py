"""Preemption: SIGTERM or SIGINT ends a phase after its current training batch, with a non-zero exit.

Slurm and Kubernetes send SIGTERM before they preempt a job, and requeue it only when it exits
non-zero. Lightning's own SIGTERM handling stops ``fit`` with a ``SystemExit`` that carries no code
(exit status 0: the job reads as finished), and Ctrl-C with exit status 1. ``PhaseCheckpoint``
instead records the first SIGTERM or SIGINT (``StopSignals``), lets the running training batch end
(for GRPO: its rollouts, optimizer steps and harvest shard), saves a checkpoint there when the phase
has a checkpoint cadence, and raises ``Preempted``: exit status 128 + signal number (143 for
SIGTERM, 130 for SIGINT), as a process killed by that signal reports to a shell. The rerun resumes
from that checkpoint. A second Ctrl-C interrupts at once (``KeyboardInterrupt``).

On several ranks, every rank stops after the same batch: the ranks gather their signals after each
batch (``PhaseCheckpoint``), so one rank's signal stops them all.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """A phase stopped on a signal after a whole training batch; the exit status is 128 + the signal."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message or f"stopped by {signal.Signals(self.signum).name}"


class StopSignals:
    """SIGTERM/SIGINT handlers that record the first signal (``received``) instead of stopping at once.

    A second SIGINT raises ``KeyboardInterrupt`` (the user insists); further SIGTERMs are ignored.
    Handlers can only be set in the main thread; elsewhere ``install`` does nothing.
    """

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        log.warning("%s received: the phase stops after its current training batch (a checkpoint is saved "
                    "there when the phase has a checkpoint cadence); press Ctrl-C again to stop at once",
                    signal.Signals(signum).name)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def first_signal(signals: list[Optional[int]]) -> Optional[int]:
    """The signal that stops every rank: the first rank's that received one (None: none did)."""
    return next((signum for signum in signals if signum is not None), None)
