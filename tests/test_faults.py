"""Faults and bad input at the loop's edges: one process per run directory, errors before any compute or
write, errors that name the culprit, resume after a change that computes nothing differently.

Each test failed before the fix it covers: two ``rloop fit`` on one run directory deleted each other's
phases, a missing base path gave a hub error after the manifest and ``eval/`` were written, a corrupt
manifest a bare ``JSONDecodeError``, a copied run directory refused to resume (``run_dir`` changed),
``--iteration 3`` passed for ``--iterations 3``, and ``rloop grpo fit``'s tip named ``rloop fit --help``.
Reward faults are in test_reward_faults.py; ``scripts/fault_probes.py`` runs all of them as a table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rloop_lightning.cli import cli_main
from rloop_lightning.loop import RLoop
from rloop_lightning.loop import lock as lock_module
from rloop_lightning.loop.lock import RunDirectoryBusy, RunLock
from rloop_lightning.loop.manifest import ManifestError
from rloop_lightning.records import RecordError
from rloop_lightning.tasks import GSM8K
from test_loop import REPO, manifest, start_loop, write_loop_config

# ---------------------------------------------------------------------------- one process per run directory


def lock_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) or None
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def concurrent_runs(tmp_path_factory):
    """A one-iteration ``rloop fit`` in a subprocess and, while it holds the run directory and after its
    ``.lock`` was deleted, a second ``rloop fit`` on it in this process: (loop YAML, run directory, holder's
    PID, the second's error and seconds, the first's return code)."""
    root = tmp_path_factory.mktemp("concurrent")
    run_dir = root / "run"
    config = write_loop_config(root / "configs", run_dir)
    loop = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**loop, "iterations": 1}))
    log_path = root / "first.log"
    first = start_loop(config, log_path)
    try:
        deadline = time.monotonic() + 120
        while lock_holder(run_dir / ".lock") is None:
            assert first.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        (run_dir / ".lock").unlink()  # the lock is the holder's, not the file's
        started = time.monotonic()
        with pytest.raises(RunDirectoryBusy) as error:
            cli_main(["fit", "--config", str(config)])
        seconds = time.monotonic() - started
        returncode = first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert returncode == 0, log_path.read_text()[-3000:]
    return config, run_dir, first.pid, str(error.value), seconds


def test_a_second_fit_on_a_run_directory_is_refused_at_once_naming_the_holder(concurrent_runs):
    config, run_dir, pid, message, seconds = concurrent_runs
    assert f"{run_dir} is in use by process {pid} on " in message and f"kill {pid}" in message
    assert "fit --config" in message  # the holder's command
    assert seconds < 30  # parsing the phase configs; no phase ran
    completed = manifest(run_dir)["completed"]  # the first run finished undisturbed
    assert set(completed) == {"eval/theta_0", "iter_00/grpo", "iter_00/expert_set", "iter_00/rft", "iter_00/eval"}
    assert len([line for line in (run_dir / "iter_00/grpo/metrics.jsonl").read_text().splitlines() if line]) == 3
    assert not (run_dir / ".lock").exists()  # the first run never wrote a new one


HOLD = ("import importlib.util, sys, time; spec = importlib.util.spec_from_file_location('lock', sys.argv[2]); "
        "lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock); "
        "lock.RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")
"""Holds the lock of the directory ``argv[1]`` with ``loop/lock.py`` alone (standard library: no torch import)."""


def hold_lock(directory: Path) -> subprocess.Popen:
    """A process that holds ``directory``'s lock until killed (it has printed ``locked``)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), lock_module.__file__],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_killed_holder_blocks_nothing_and_other_ranks_are_never_refused(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunDirectoryBusy, match=f"in use by process {holder.pid} "):
            RunLock(tmp_path).acquire()
        with RunLock(tmp_path, main=False):  # a rank > 0 of the holder's own run
            pass
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
        (tmp_path / ".lock").write_text(json.dumps({"pid": holder.pid}))  # a file left by the killed holder...
        with RunLock(tmp_path):  # ...but not its lock
            assert lock_holder(tmp_path / ".lock")["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_a_live_holder_keeps_the_lock_when_its_file_is_deleted(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        (tmp_path / ".lock").unlink()  # held by the live process, not by the file
        (tmp_path / "iter_00").mkdir()
        with pytest.raises(RunDirectoryBusy, match=f"in use by process {holder.pid} on .*-c import importlib.* \\(kill "
                                                   f"{holder.pid}\\)"):  # named from /proc/locks
            RunLock(tmp_path).acquire()
        assert not (tmp_path / ".lock").exists() and (tmp_path / "iter_00").is_dir()
        with RunLock(tmp_path / "iter_00"):  # another directory (a W&B sweep's run_dir/<run id>) has its own lock
            pass
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
        with RunLock(tmp_path):  # its holder killed: free
            assert lock_holder(tmp_path / ".lock")["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_a_copied_run_directory_resumes_after_changes_that_compute_nothing_differently(concurrent_runs, tmp_path,
                                                                                        monkeypatch):
    config, run_dir, *_ = concurrent_runs
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    loop = yaml.safe_load(config.read_text())
    for evaluator in loop["evaluators"]:
        evaluator["reward_workers"] = 1  # was 0
    changed = tmp_path / "loop.yaml"
    changed.write_text(yaml.safe_dump({**loop, "run_dir": str(copy)}))
    for work in ("run_grpo", "build_experts", "run_rft", "evaluate_held_out"):
        monkeypatch.setattr(RLoop, work, lambda *args, **kwargs: pytest.fail("a completed phase was re-run"))
    cli_main(["fit", "--config", str(changed)])
    recorded = manifest(copy)["config"]
    assert recorded["run_dir"] == str(copy) and recorded["evaluators"][0]["init_args"]["reward_workers"] == 1
    assert manifest(copy)["completed"] == manifest(run_dir)["completed"]
    with pytest.raises(ValueError, match="refusing to resume") as error:  # what phases computed may not change
        cli_main(["fit", "--config", str(changed), "--seed", "1"])
    differing = str(error.value).split("Differing fields:\n")[1].split("\nUse")[0]
    assert differing.split("\n") == ["  seed: 0 -> 1"]


# ---------------------------------------------------------------------------- errors before anything is written


@pytest.fixture
def loop_config(tmp_path) -> Path:
    return write_loop_config(tmp_path / "configs", tmp_path / "run")


def test_a_typo_in_a_phase_override_fails_before_anything_is_written(loop_config, tmp_path):
    overrides = json.dumps({"trainer.max_epochz": 1})
    with pytest.raises(ValueError, match=r"phase config .*rft.yaml .*unrecognized arguments: --trainer.max_epochz=1"):
        cli_main(["fit", "--config", str(loop_config), "--rft.overrides", overrides])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("policy", ["./no/such/policy", "runs/no/such/policy", str(Path("/no/such/policy"))])
def test_a_missing_base_path_fails_before_anything_is_written(loop_config, tmp_path, policy):
    with pytest.raises(FileNotFoundError, match=f"base.policy '{policy}' does not exist"):
        cli_main(["fit", "--config", str(loop_config), "--base.policy", policy])
    assert not (tmp_path / "run").exists()


def test_an_unknown_built_in_policy_fails_before_anything_is_written(loop_config, tmp_path):
    with pytest.raises(ValueError, match="'rloop/mikro-llama' is not a built-in model; built-ins: .*rloop/micro-llama"):
        cli_main(["fit", "--config", str(loop_config), "--base.policy", "rloop/mikro-llama"])
    assert not (tmp_path / "run").exists()


def test_a_corrupt_manifest_is_named_with_what_to_do(loop_config, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text('{"config": {"seed": 0}, "completed": {"eval/th')
    with pytest.raises(ManifestError, match=f"{tmp_path / 'run' / 'manifest.json'} is corrupt .*move "
                                            f"{tmp_path / 'run'} aside"):
        cli_main(["fit", "--config", str(loop_config)])


def test_a_local_dataset_with_a_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    good = json.dumps({"question": "1+1?", "answer": "#### 2"})
    path.write_bytes(f"{good}\n{good}\n".encode() + '{"question": "caf\u00e9", "answer": "#### 1"}\n'.encode("latin-1"))
    with pytest.raises(RecordError, match=rf"{path}:3: not UTF-8 text \(byte 0xe9"):
        GSM8K(test_path=str(path)).load("test")


# ---------------------------------------------------------------------------- command lines


@pytest.mark.parametrize("command, abbreviation, tip", [
    (["fit", "--config", "configs/tiny_cpu.yaml"], ["--iteration", "3"], "rloop fit --help"),
    (["grpo", "fit", "--config", "configs/grpo/tiny_countdown.yaml"], ["--trainer.max_step", "3"],
     "rloop grpo fit --help"),
    (["rft", "fit", "--config", "configs/rft/tiny_countdown.yaml"], ["--trainer.max_epoch", "1"],
     "rloop rft fit --help"),
    (["eval", "--policy.model_name_or_path", "rloop/micro-llama", "--evaluators", "[]"], ["--se", "1"],
     "rloop eval --help"),
    (["report", "runs/none"], ["--base", "x"], "rloop report --help"),
])
def test_long_options_are_never_abbreviated_and_the_tip_names_the_command(command, abbreviation, tip, capsys,
                                                                          monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        cli_main([*command, *abbreviation])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert f"unrecognized arguments: {' '.join(abbreviation)}" in stderr
    assert f"tip: For details of accepted options run: {tip}\n" in stderr


def test_every_fault_probe_is_a_test_here():
    """scripts/fault_probes.py replays the faults through these tests: each probe names an existing one."""
    from script_modules import load_script

    for probe in load_script("fault_probes").PROBES:
        path, name = probe.test.split("::")
        assert f"def {name.split('[')[0]}(" in (REPO / path).read_text(), probe.test
