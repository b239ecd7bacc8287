"""Under ``torchrun`` every rank starts at once and ranks 1..N-1 wait at the process group's rendezvous
while the main process checks the configuration and builds theta_0. The wait is bounded by the loop's
``distributed_timeout`` (the group's timeout), not ``torch.distributed``'s default 30 minutes, and
running out of it gives an error naming the setting. Real ``torchrun`` on localhost, 2 gloo processes;
the main process's build is a sleep before ``start_ranks``, as in ``RLoop._run``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rloop_lightning.cli import fit_command
from rloop_lightning.loop import RLoop
from rloop_lightning.loop.distributed import DEFAULT_TIMEOUT_SECONDS, rendezvous_timeout_message

REPO = Path(__file__).resolve().parents[1]
RANKS = """\
import os, sys, time
import torch.distributed as dist
from rloop_lightning.loop.distributed import RendezvousTimeout, start_ranks

build_seconds, timeout_seconds = float(sys.argv[1]), float(sys.argv[2])
if os.environ["RANK"] == "0":
    time.sleep(build_seconds)  # the main process builds theta_0 before it joins the group
try:
    start_ranks(accelerator="cpu", devices=2, timeout_seconds=timeout_seconds)
except RendezvousTimeout as error:
    sys.stdout.write(f"ERROR {error}\\n")
    sys.stdout.flush()
    sys.exit(3)
dist.barrier()
sys.stdout.write(f"JOINED {dist.get_rank()} of {dist.get_world_size()}\\n")  # one write: ranks share the pipe
sys.stdout.flush()
"""


def torchrun_ranks(tmp_path: Path, build_seconds: float, timeout_seconds: float) -> tuple[int, str, float]:
    from test_strategies import free_port

    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), str(build_seconds),
         str(timeout_seconds)],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


@pytest.mark.slow
def test_ranks_wait_for_the_main_process_within_the_timeout_and_fail_clearly_past_it(tmp_path):
    code, log, _ = torchrun_ranks(tmp_path, build_seconds=4, timeout_seconds=60)
    assert code == 0, log[-3000:]
    assert "JOINED 0 of 2" in log and "JOINED 1 of 2" in log

    code, log, seconds = torchrun_ranks(tmp_path, build_seconds=120, timeout_seconds=5)
    assert code != 0
    # rank 1 gave up after distributed_timeout, not after the main process's build (torchrun then ends rank 0)
    waited = re.search(r"ERROR rank 1 of 2 waited (\d+) s for the main process", log)
    assert waited and 5 <= int(waited[1]) < 30, log[-3000:]
    assert "within distributed_timeout = 5 s" in log and "--distributed_timeout 7200" in log
    assert seconds < 100, log[-3000:]


def test_the_timeout_message_names_the_setting_and_who_was_waited_for():
    waiting = rendezvous_timeout_message(rank=1, world_size=4, waited=30.4, timeout_seconds=30)
    assert waiting.startswith("rank 1 of 4 waited 30 s for the main process (rank 0)")
    assert "within distributed_timeout = 30 s" in waiting and "--distributed_timeout 7200" in waiting
    main = rendezvous_timeout_message(rank=0, world_size=2, waited=9000, timeout_seconds=9000)
    assert "for the other ranks" in main and "--distributed_timeout 18000" in main  # twice the setting


def test_distributed_timeout_is_a_fit_argument_checked_before_anything_is_written(tmp_path, monkeypatch):
    loops: list[RLoop] = []
    monkeypatch.setattr(RLoop, "run", lambda self, config: loops.append(self))
    base = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--run_dir", str(tmp_path / "run")]
    fit_command([*base, "--distributed_timeout", "5"])
    fit_command(base)
    assert [loop.distributed_timeout for loop in loops] == [5.0, DEFAULT_TIMEOUT_SECONDS] == [5.0, 7200.0]
    with pytest.raises(ValueError, match="distributed_timeout must be > 0 seconds, got 0"):
        fit_command([*base, "--distributed_timeout", "0"])
    assert not (tmp_path / "run").exists()  # nothing written
