"""Mid-phase resume: a GRPO or RFT phase stopped at any point and resumed from its last checkpoint
(``PhaseCheckpoint``) writes what an uninterrupted phase writes, byte for byte on CPU.

The phase tests stop a phase in-process (an exception at the start of a step) and resume it in a
fresh Trainer; the loop test SIGKILLs ``rloop fit`` mid-GRPO and mid-RFT and reruns the same
command. Phases use the micro model and the shrunken YAMLs of ``test_loop.py``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import yaml

from rloop_lightning.callbacks import MetricsRecorder, PhaseCheckpoint
from rloop_lightning.cli import cli_main
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.loop.phases import PhaseSettings, build_phase
from rloop_lightning.rft import RFTModule
from test_loop import expert_files, kill_when, manifest, start_loop, write_loop_config

import lightning as L

VOLATILE = ("perf/", "time")  # wall-clock metrics differ between any two runs


class StopAt(L.Callback):
    """Raise at the start of training batch ``batch`` (counted over the whole fit): a crash."""

    def __init__(self, batch: int):
        self.batch, self.seen = batch, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            raise RuntimeError("crash")
        self.seen += 1


def run_phase(module: type, config: Path, directory: Path, every_n_steps: int, stop_at: int | None = None,
              overrides: dict | None = None) -> None:
    """Fit one phase as the loop does (metrics file, checkpoints, resume from the latest)."""
    cli = build_phase(module, PhaseSettings(str(config)), {"trainer.default_root_dir": str(directory),
                                                           **(overrides or {})})
    trainer = cli.trainer
    trainer.callbacks.append(MetricsRecorder(str(directory / "metrics.jsonl")))
    if stop_at is not None:
        trainer.callbacks.append(StopAt(stop_at))
    checkpoints = directory / "checkpoints"
    trainer.callbacks.append(PhaseCheckpoint(str(checkpoints), every_n_steps=every_n_steps, keep_last=False))
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=PhaseCheckpoint.latest(checkpoints),
                weights_only=False)


def phase_outputs(directory: Path) -> dict[str, bytes]:
    """Every file a phase wrote but checkpoints and its config (which names the directory); metrics
    rows without the wall-clock ones, and with sorted keys (a resumed phase logs them in another order)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and "checkpoints" not in path.parts and path.name != "config.yaml":
            files[str(path.relative_to(directory))] = path.read_bytes()
    rows = [json.loads(line) for line in files.pop("metrics.jsonl").splitlines()]
    files["metrics.jsonl"] = json.dumps([{k: v for k, v in row.items() if not k.startswith(VOLATILE)}
                                         for row in rows], sort_keys=True).encode()
    return files


def grpo_config(tmp_path: Path) -> Path:
    from test_loop import grpo_yaml

    config = grpo_yaml(digit_reward=True)
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]  # the harvester only
    # 2 optimizer steps per rollout batch, 5 batches; 16 prompts, 4 a batch: a new pass over them at batch 4
    config["trainer"]["max_steps"] = 10
    config["model"].update(dynamic_sampling=True, num_mini_batches=2)  # dynamic sampling: refill draws
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("stop_at", [2, 4])  # 4: the last checkpoint ended a pass over the prompts
def test_grpo_phase_resumes_to_the_uninterrupted_outputs(tmp_path, stop_at):
    config = grpo_config(tmp_path)
    run_phase(GRPOModule, config, tmp_path / "reference", every_n_steps=2)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="crash"):
        run_phase(GRPOModule, config, resumed, every_n_steps=2, stop_at=stop_at)
    assert PhaseCheckpoint.latest(resumed / "checkpoints") is not None
    run_phase(GRPOModule, config, resumed, every_n_steps=2)
    reference = phase_outputs(tmp_path / "reference")
    assert any(name.startswith("experts/rank00/step") for name in reference)
    assert phase_outputs(resumed) == reference
    assert not (resumed / "checkpoints").exists()  # cleaned up once the phase completed
