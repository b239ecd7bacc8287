"""One process per run directory: an exclusive lock on ``run_dir/.lock``.

Two loops on one run directory wipe each other's phase directories and append to the same metrics
files, so the second ``rloop fit`` is refused at once, with the holder's PID, host and command:

    with RunLock(run_dir, main=is_main_process()):
        ...   # the loop

The lock is ``fcntl.flock`` on the file: the kernel drops it when the holder exits, however it exits
(SIGKILL, OOM), so a crashed run never blocks its resume, and a lock file left on disk means nothing
by itself. Only the main process of a run (global rank 0) takes it; the other ranks of the same run,
which Lightning's launcher starts by re-running the command, must not be refused. ``flock`` does not
work across machines on some network file systems (NFS without lock support): there it does not
protect a directory shared by two hosts.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = ".lock"


class RunDirectoryBusy(RuntimeError):
    """Another process holds the run directory's lock; the message names it."""


class RunLock:
    """Exclusive lock of ``run_dir`` for this process; a no-op when ``main`` is false.

    Args:
        run_dir: the run directory (created if missing).
        main: whether this process is the run's main process (global rank 0); only it takes the lock.
    """

    def __init__(self, run_dir: str | os.PathLike, main: bool = True):
        self.path = Path(run_dir) / LOCK_FILE
        self.main = main
        self._descriptor: Optional[int] = None

    def acquire(self) -> None:
        if not self.main or self._descriptor is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise RunDirectoryBusy(self.busy_message()) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        self._descriptor = descriptor

    def release(self) -> None:
        """Drop the lock. The file stays: deleting it would let a third process lock a new file while a
        second still waits on the old one."""
        if self._descriptor is not None:
            os.ftruncate(self._descriptor, 0)
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def holder(self) -> Optional[dict]:
        """What the lock file says about its holder (None when it does not say yet)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def busy_message(self) -> str:
        holder = None
        for _ in range(20):  # the holder writes its details right after locking
            holder = self.holder()
            if holder:
                break
            time.sleep(0.05)
        who = (f"process {holder['pid']} on {holder['host']} (started {holder['started']}: {holder['command']})"
               if holder else "another process")
        stop = f" (kill {holder['pid']})" if holder and holder["host"] == socket.gethostname() else ""
        return (f"{self.path.parent} is in use by {who}. Two runs in one run directory would delete each other's "
                f"phases: wait for that run to finish or stop it{stop}, or use another run_dir. A run that "
                "crashed or was killed holds no lock; its rerun resumes.")

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
