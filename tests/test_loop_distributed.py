"""The whole loop on 2 CPU processes (gloo), with DDP and with FSDP2, K = 2, as a user starts it:
``rloop fit --config LOOP --config configs/loop/{ddp,fsdp2}_cpu.yaml``. Lightning's launcher starts the
second rank at the first GRPO phase; the expert set, evaluations and report are written once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_loop import COMPLETIONS_PER_STEP, manifest, read_jsonl, write_loop_config

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS = 3  # the loop test config's GRPO override


def run_loop(config: Path, strategy: str, log_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w") as log:
        return subprocess.run([sys.executable, "-m", "rloop_lightning", "fit", "--config", str(config),
                               "--config", str(REPO / "configs" / "loop" / f"{strategy}.yaml")],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_cpu", "fsdp2_cpu"])
def test_loop_on_two_processes(tmp_path, strategy):
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    log_path = tmp_path / "loop.log"
    result = run_loop(config, strategy, log_path)
    log = log_path.read_text()
    assert result.returncode == 0, log[-4000:]
    run_dir = tmp_path / "run"
    assert set(manifest(run_dir)["completed"]) == {"eval/theta_0"} | {
        f"iter_{k:02d}/{phase}" for k in (0, 1) for phase in ("grpo", "expert_set", "rft", "eval")}
    for k in (0, 1):
        experts = run_dir / f"iter_{k:02d}" / "grpo" / "experts"
        # both ranks explored: each wrote its own shards and prompt statistics, every step
        harvested = 0
        for rank in ("rank00", "rank01"):
            stats = json.loads((experts / f"prompt_stats.{rank}.json").read_text())
            assert sum(s["attempts"] for s in stats.values()) == STEPS * COMPLETIONS_PER_STEP
            records = [r for shard in sorted((experts / rank).glob("*.jsonl")) for r in read_jsonl(shard)]
            assert len(records) == sum(s["successes"] for s in stats.values()) > 0
            harvested += len(records)
        # one expert set, built once from both ranks' harvest
        summary = json.loads((run_dir / f"iter_{k:02d}" / "expert_set" / "summary.json").read_text())
        assert summary["harvested"] == harvested
        assert log.count(f"iteration {k} expert set:") == 1
        assert (run_dir / f"iter_{k:02d}" / "rft" / "policy" / "model.safetensors").exists()
    assert log.count("evaluation of ") == 3  # theta_0, theta_1, theta_2: once each
    assert log.count("RLoop finished") == 1
    assert "theta_2" in (run_dir / "report.md").read_text()
