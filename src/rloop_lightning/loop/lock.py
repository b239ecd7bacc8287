"""One process per run directory: an exclusive OS lock held by the run's main process for its life.

Two loops on one run directory wipe each other's phase directories and append to the same metrics
files, so the second ``rloop fit`` is refused at once, with the holder's PID, host and command:

    with RunLock(run_dir, main=is_main_process()):
        ...   # the loop

The lock is ``fcntl.flock`` on the run directory itself and on ``run_dir/.lock``, which also tells
the holder's PID, host and command. The kernel drops both when the holder exits, however it exits
(SIGKILL, OOM), so a crashed run never blocks its resume, and a lock file left on disk means nothing
by itself. A lock held on the directory is not lost when someone deletes ``.lock`` (a second run would
otherwise lock a fresh file and wipe the running phase); the holder is then named from
``/proc/locks``. Only the main process of a run (global rank 0) takes it; the other ranks of the same
run, which Lightning's launcher starts by re-running the command, must not be refused. ``flock`` does
not work across machines on some network file systems (NFS without lock support): there it does not
protect a directory shared by two hosts, and where a file system cannot lock a directory (NFSv4 locks
only files opened for writing) only ``.lock`` is locked.
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
        self._directory: Optional[int] = None
        self._descriptor: Optional[int] = None

    def acquire(self) -> None:
        if not self.main or self._descriptor is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._directory = lock(os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY), optional=True)
            self._descriptor = lock(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        except BlockingIOError:
            self.release()
            raise RunDirectoryBusy(self.busy_message()) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        """Drop the lock. The file stays: deleting it would let a third process lock a new file while a
        second still waits on the old one."""
        if self._descriptor is not None:
            os.ftruncate(self._descriptor, 0)
        for descriptor in (self._descriptor, self._directory):
            if descriptor is not None:
                fcntl.flock(descriptor, fcntl.LOCK_UN)
                os.close(descriptor)
        self._descriptor = self._directory = None

    def holder(self) -> Optional[dict]:
        """Who holds the lock: what the lock file says, or, when it says nothing (deleted, not written
        yet), the process ``/proc/locks`` names as the directory's holder; None when neither tells."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return directory_holder(self.path.parent)

    def busy_message(self) -> str:
        holder = None
        for _ in range(20):  # the holder writes its details right after locking
            holder = self.holder()
            if holder:
                break
            time.sleep(0.05)
        started = f"started {holder['started']}: " if holder and holder.get("started") else ""
        who = f"process {holder['pid']} on {holder['host']} ({started}{holder['command']})" if holder \
            else "another process"
        stop = f" (kill {holder['pid']})" if holder and holder["host"] == socket.gethostname() else ""
        return (f"{self.path.parent} is in use by {who}. Two runs in one run directory would delete each other's "
                f"phases: wait for that run to finish or stop it{stop}, or use another run_dir. A run that "
                "crashed or was killed holds no lock; its rerun resumes.")

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(descriptor: int, optional: bool = False) -> Optional[int]:
    """``descriptor`` exclusively locked (``flock``), or closed and ``BlockingIOError`` when another process
    holds it. ``optional``: where the file system cannot lock it (``EBADF``, ``ENOLCK``, ...) it is closed
    and None returned."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if optional and not isinstance(error, BlockingIOError):
            return None
        raise
    return descriptor


def directory_holder(directory: Path) -> Optional[dict]:
    """The process holding a ``flock`` on ``directory``, from Linux's ``/proc/locks`` (lines such as
    ``1: FLOCK  ADVISORY  WRITE 4711 fe:00:260072 0 EOF``: PID, then device major:minor:inode); None where
    there is no such file or no such lock."""
    try:
        status = os.stat(directory)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    inode = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    for fields in map(str.split, lines):
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
            pid = int(fields[4])
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                command = "its command is unknown"
            return {"pid": pid, "host": socket.gethostname(), "command": command}
    return None
