"""A W&B sweep run of the loop on 2 CPU processes writes one run directory, ``run_dir/<W&B run id>``.

The run is started by wandb's own agent code (``wandb.wandb_agent.Agent._command_run``, the method
that launches each sweep run): it sets ``WANDB_SWEEP_ID``, ``WANDB_RUN_ID`` and
``WANDB_SWEEP_PARAM_PATH``, expands the sweep's ``command`` (``${program}``, ``${args}`` as
``--param=value``) and starts the process in its own process group. What needs the W&B server (the
agent asking it for the next run, reporting run states) does not run here: no server is reachable,
so the test hands ``_command_run`` the command a server would send, and wandb runs offline.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from test_loop import manifest, write_loop_config

wandb = pytest.importorskip("wandb")

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SWEEP_ID, RUN_ID = "swp18abc", "run18xyz"


@pytest.mark.slow
def test_a_sweep_run_on_two_processes_writes_every_rank_s_outputs_under_one_run_directory(tmp_path, monkeypatch):
    from wandb.wandb_agent import Agent

    run_dir, work = tmp_path / "sweep_runs", tmp_path / "cwd"
    work.mkdir()
    config = write_loop_config(tmp_path / "configs", run_dir)
    loop = yaml.safe_load(config.read_text())
    loop.update(iterations=1)
    loop["grpo"]["overrides"]["trainer.max_steps"] = 2
    config.write_text(yaml.safe_dump(loop))
    monkeypatch.chdir(work)  # anything written to the working directory would show here
    for name, value in {"WANDB_MODE": "offline", "WANDB_SWEEP_ID": SWEEP_ID, "WANDB_DIR": str(tmp_path / "agent"),
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_SILENT": "true",
                        "WANDB_RUN_ID": "", "WANDB_SWEEP_PARAM_PATH": "", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}.items():
        monkeypatch.setenv(name, value)  # the agent sets WANDB_RUN_ID and WANDB_SWEEP_PARAM_PATH in os.environ
    agent = Agent(api=None, queue=None, sweep_id=SWEEP_ID)
    # the shipped sweep's command, on this test's loop config and run directory, on 2 processes
    agent._sweep_command = ["${program}", "fit", "--config", str(config), "--config",
                            str(REPO / "configs" / "loop" / "ddp_cpu.yaml"), "--run_dir", str(run_dir),
                            "--wandb_project", "rloop-lightning", "${args}"]
    agent._command_run({"run_id": RUN_ID, "program": str(Path(sys.executable).parent / "rloop"),
                        "args": {"expert_set.hard_threshold": {"value": 0.75}}})
    process = agent._run_processes[RUN_ID]
    try:
        code = process.wait(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process._popen.pid, signal.SIGKILL)  # the run and the rank Lightning started
    assert code == 0

    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_ID]  # one directory for the whole run
    assert list(work.iterdir()) == []  # nothing in the working directory either
    root = run_dir / RUN_ID
    recorded = manifest(root)
    assert set(recorded["completed"]) == {"eval/theta_0"} | {
        f"iter_00/{phase}" for phase in ("grpo", "expert_set", "rft", "eval")}
    assert recorded["config"]["expert_set"]["hard_threshold"] == 0.75  # the sweep's parameter reached the loop
    experts = root / "iter_00" / "grpo" / "experts"
    for rank in ("rank00", "rank01"):  # both ranks harvested into the sweep run's directory
        assert sorted((experts / rank).glob("*.jsonl"))
        assert json.loads((experts / f"prompt_stats.{rank}.json").read_text())
    for phase in ("eval/theta_0", "iter_00/eval"):
        assert json.loads((root / phase / "eval.json").read_text())["metrics"]
    assert (root / "iter_00" / "rft" / "policy" / "model.safetensors").exists()
    assert (root / "report.md").exists()
    offline = list((root / "wandb").glob(f"offline-run-*-{RUN_ID}"))  # W&B's files inside the run's directory
    assert len(offline) == 1
    # the agent's own file, where the agent keeps it (WANDB_DIR), with the parameter it passed
    params = yaml.safe_load((tmp_path / "agent" / "wandb" / f"sweep-{SWEEP_ID}" / f"config-{RUN_ID}.yaml").read_text())
    assert params["expert_set.hard_threshold"]["value"] == 0.75
