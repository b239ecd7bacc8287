"""Preemption: SIGTERM (what Slurm and Kubernetes send before they preempt) or SIGINT mid-phase ends the
phase after its current batch with a checkpoint and exit status 143/130; the rerun resumes to the
uninterrupted outputs.

Before ``callbacks.preemption``, Lightning's SIGTERM handling ended ``rloop fit`` with exit status 0
(a ``SystemExit`` with no code) and no checkpoint, so a scheduler would not requeue the job.
"""

from __future__ import annotations

import os
from pathlib import Path
import signal
import time

import lightning as L
import pytest
import yaml

from rloop_lightning.callbacks import PhaseCheckpoint
from rloop_lightning.callbacks.preemption import Preempted, first_signal
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.rft import RFTModule
from test_loop import manifest, start_loop, write_loop_config
import test_resume
from rloop_lightning.loop.phases import PhaseCLI, build_phase
from test_resume import grpo_config, phase_outputs, rft_config, run_phase


class SignalAt(L.Callback):
    """Send ``signum`` to this process at the start of training batch ``batch`` (counted over the fit)."""

    def __init__(self, batch: int, signum: int):
        self.batch, self.signum, self.seen = batch, signum, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            os.kill(os.getpid(), self.signum)
        self.seen += 1


class SignalAtTrainEnd(L.Callback):
    """Send ``signum`` once the last training batch has ended (while the phase exports its policy)."""

    def __init__(self, signum: int):
        self.signum = signum

    def on_train_end(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), self.signum)


@pytest.fixture
def signal_at(monkeypatch):
    """``signal_at(batch, signum)``: ``run_phase``'s Trainers get ``SignalAt(batch, signum)`` too."""
    def arm(batch: int | None, signum: int) -> None:
        def with_signal(*args, **kwargs) -> PhaseCLI:
            cli = build_phase(*args, **kwargs)
            cli.trainer.callbacks.append(SignalAt(batch, signum) if batch is not None else SignalAtTrainEnd(signum))
            return cli

        monkeypatch.setattr(test_resume, "build_phase", with_signal)
    return arm


def test_the_first_rank_with_a_signal_stops_every_rank():
    assert first_signal([None, None]) is None
    assert first_signal([None, signal.SIGINT, signal.SIGTERM]) == signal.SIGINT
    assert first_signal([signal.SIGTERM]) == signal.SIGTERM


@pytest.mark.parametrize("module, make_config, signum, every_n_steps, step", [
    (GRPOModule, grpo_config, signal.SIGTERM, 4, 6),  # 2 optimizer steps a batch: stopped after batch 2 (0-based)
    (RFTModule, rft_config, signal.SIGINT, 100, 3),  # 1 step a batch, no cadence save yet; the epoch's last batch
], ids=["grpo_sigterm", "rft_sigint"])
def test_a_signal_mid_phase_saves_a_checkpoint_exits_128_plus_signal_and_resumes(
        tmp_path, signal_at, module, make_config, signum, every_n_steps, step):
    config = make_config(tmp_path)
    run_phase(module, config, tmp_path / "reference", every_n_steps=None)
    resumed = tmp_path / "resumed"
    signal_at(2, signum)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Preempted) as stopped:
        run_phase(module, config, resumed, every_n_steps=every_n_steps)
    assert stopped.value.code == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    assert f"{signal.Signals(signum).name}: phase stopped after step {step}" in str(stopped.value)
    assert PhaseCheckpoint.latest(resumed / "checkpoints").name == f"step{step:07d}.ckpt"  # the batch finished
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the process's own handlers are back
    signal_at(10_000, signum)  # never
    run_phase(module, config, resumed, every_n_steps=every_n_steps)
    assert phase_outputs(resumed) == phase_outputs(tmp_path / "reference")


def test_a_phase_without_checkpoint_cadence_stops_with_no_checkpoint_and_a_non_zero_status(tmp_path, signal_at):
    config = rft_config(tmp_path)
    signal_at(1, signal.SIGTERM)
    with pytest.raises(Preempted, match="no checkpoint") as stopped:
        run_phase(RFTModule, config, tmp_path / "run", every_n_steps=None)  # and every_seconds None: no cadence
    assert stopped.value.code == 143
    assert PhaseCheckpoint.latest(tmp_path / "run" / "checkpoints") is None
    assert not (tmp_path / "run" / "policy").exists()  # not exported: the phase did not finish


def test_a_signal_after_the_last_batch_still_stops_the_run_with_a_non_zero_status(tmp_path, signal_at):
    config = rft_config(tmp_path)
    signal_at(None, signal.SIGTERM)
    with pytest.raises(Preempted, match="SIGTERM after the last training batch: the phase finished but is not "
                                        "marked done") as stopped:
        run_phase(RFTModule, config, tmp_path / "run", every_n_steps=2)
    assert stopped.value.code == 143


@pytest.mark.slow
def test_sigterm_then_sigint_mid_loop_exit_143_and_130_and_the_rerun_resumes(tmp_path):
    """``rloop fit`` in a subprocess: SIGTERM once GRPO has saved a harvest shard (exit 143, the manifest
    without the phase, a checkpoint), SIGINT during RFT (exit 130); the third run resumes both phases
    from their checkpoints and completes the iteration. (That a resumed phase writes what an
    uninterrupted one does is the phase tests' above, and tests/test_resume.py's.)"""
    run_dir = tmp_path / "run"
    config = write_loop_config(tmp_path / "configs", run_dir)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "iterations": 1}))
    log_path = tmp_path / "loop.log"
    grpo, rft = run_dir / "iter_00" / "grpo", run_dir / "iter_00" / "rft"

    def signal_when(condition, signum: int) -> int:
        process = start_loop(config, log_path)
        try:
            deadline = time.monotonic() + 240
            while not condition():
                assert process.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "signal point not reached"
                time.sleep(0.01)
            process.send_signal(signum)
            return process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()

    assert signal_when(lambda: any((grpo / "experts").glob("rank00/*.jsonl")), signal.SIGTERM) == 143, \
        log_path.read_text()[-3000:]
    assert "iter_00/grpo" not in manifest(run_dir)["completed"]
    assert PhaseCheckpoint.latest(grpo / "checkpoints") is not None
    assert "SIGTERM: phase stopped after step" in log_path.read_text()
    assert signal_when(lambda: (rft / "metrics.jsonl").exists() and (rft / "metrics.jsonl").read_text(),
                       signal.SIGINT) == 130, log_path.read_text()[-3000:]
    assert "iter_00/rft" not in manifest(run_dir)["completed"]
    assert "SIGINT: phase stopped after step" in log_path.read_text()
    rft_checkpoint = PhaseCheckpoint.latest(rft / "checkpoints")
    assert rft_checkpoint is not None
    process = start_loop(config, log_path)
    assert process.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    assert f"Restoring states from the checkpoint path at {rft_checkpoint}" in log_path.read_text()
    assert set(manifest(run_dir)["completed"]) == {"eval/theta_0", "iter_00/grpo", "iter_00/expert_set",
                                                   "iter_00/rft", "iter_00/eval"}


def test_lightning_sigterm_stop_outside_a_phase_checkpoint_exits_143(monkeypatch):
    """A fit without ``PhaseCheckpoint`` (the base build, a standalone phase YAML without it) stops on SIGTERM
    with Lightning's ``SIGTERMException``, a ``SystemExit`` with no code: ``rloop`` exits 143 instead of 0."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from rloop_lightning import cli

    def stopped(args):
        raise SIGTERMException

    monkeypatch.setitem(cli.COMMANDS, "rft", stopped)
    with pytest.raises(SystemExit) as exit_:
        cli.cli_main(["rft", "fit"])
    assert exit_.value.code == 143


@pytest.mark.slow
def test_sigterm_to_the_main_process_of_two_ranks_stops_both_after_the_same_batch(tmp_path):
    """Two DDP processes (gloo): SIGTERM reaches only the main one; the ranks gather their signals after
    each batch, so both stop after the same step, and the run exits 143 at once instead of hanging."""
    run_dir = tmp_path / "run"
    config = write_loop_config(tmp_path / "configs", run_dir)
    loop = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**loop, "iterations": 1, "trainer": {"devices": 2, "strategy": "ddp"}}))
    log_path = tmp_path / "loop.log"
    grpo = run_dir / "iter_00" / "grpo"
    process = start_loop(config, log_path)
    try:
        deadline = time.monotonic() + 300
        while not any((grpo / "experts").glob("rank00/*.jsonl")):
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no harvest shard in time"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    stops = [line.split("] ", 1)[1] for line in log_path.read_text().splitlines() if "phase stopped after step" in line]
    assert len(stops) == 2 and stops[0] == stops[1], stops  # one line per rank, the same step and checkpoint
    assert PhaseCheckpoint.latest(grpo / "checkpoints") is not None
    assert "iter_00/grpo" not in manifest(run_dir)["completed"]


GROUP_SIGTERM_SCRIPT = """
import sys

if __name__ == "__main__":  # the sampler and the reward workers are spawned and import this file: nothing heavy above
    import os
    import signal
    from pathlib import Path

    import lightning as L
    import test_resume
    from rloop_lightning.grpo import GRPOModule

    class SignalTheGroupAt(L.Callback):
        seen = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.seen == 2:
                os.killpg(0, signal.SIGTERM)  # as Slurm or systemd: every process of the job, helpers too
            self.seen += 1

    build_phase = test_resume.build_phase

    def with_signal(*args, **kwargs):
        cli = build_phase(*args, **kwargs)
        cli.trainer.callbacks.append(SignalTheGroupAt())
        return cli

    test_resume.build_phase = with_signal
    test_resume.run_phase(GRPOModule, Path(sys.argv[1]), Path(sys.argv[2]), every_n_steps=2)
"""


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_a_sampler_and_reward_workers_stops_after_the_batch(tmp_path):
    """SIGTERM to every process of the job (Slurm's preemption, systemd's stop) while an asynchronous GRPO phase
    runs with 2 reward workers: the sampler and the workers ignore it, the batch is sampled and scored, the
    trainer checkpoints and exits 143 in bounded time. (The sampler used to die at once, and the trainer with it:
    exit 1, "died with exit code -15"; the reward workers died too, the batch scored 0 after its time limit, and
    the interpreter then hung in ``multiprocessing.Pool``'s exit for 880 s.)"""
    import subprocess
    import sys

    config_path = grpo_config(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    # max_staleness 0: batch 2 is sent to the sampler only after the signal, so the trainer needs the sampler then
    config["model"].update(reward_workers=2,
                           rollout={"mode": "async", "max_staleness": 0, "sampler_cores": [1], "trainer_cores": [0]})
    config_path.write_text(yaml.safe_dump(config))
    script = tmp_path / "phase.py"
    script.write_text(GROUP_SIGTERM_SCRIPT)
    tests = str(Path(__file__).parent)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(script), str(config_path), str(run_dir)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, output[-3000:]
    assert "SIGTERM: phase stopped after step 6" in output, output[-3000:]  # batch 2 (2 steps each) finished
    assert "did not return within the batch limit" not in output  # its rewards were scored, not lost
    assert PhaseCheckpoint.latest(run_dir / "checkpoints").name == "step0000006.ckpt"
