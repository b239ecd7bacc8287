"""Loop-level experiment tracking on Weights & Biases: one W&B run per ``rloop fit``.

Phases log their own step metrics through their trainers' loggers (``configs/loggers/wandb.yaml``);
this run holds what only the loop knows: held-out metrics per iteration and expert-set sizes, with
the metrics of the policy the loop hands over (``final.json``, its ``output``) as ``final/...`` (what ``configs/sweeps/rloop_expert_set.yaml`` optimises).
The API key is read by wandb from the environment or its netrc; it is never written to a config.

In a sweep each run gets its own directory, ``run_dir/<W&B run id>``, with W&B's own files inside
it: a ``wandb agent`` starts every run with ``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set (and the
sweep's parameters as command-line arguments), so the directory is known before ``wandb.init``.
Only the main process tracks; ``loop.controller`` shares the directory with the other ranks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from rloop_lightning.loop.layout import BASE_EVALUATION, RunLayout

log = logging.getLogger(__name__)


def agent_run_id() -> Optional[str]:
    """The run id a ``wandb agent`` gave this process (``WANDB_RUN_ID`` with ``WANDB_SWEEP_ID``), else None."""
    return (os.environ.get("WANDB_RUN_ID") or None) if os.environ.get("WANDB_SWEEP_ID") else None


class WandbTracker:
    """The loop's W&B run. ``run_dir`` is the run directory the loop was given; ``self.run_dir`` is the
    one this run writes: ``run_dir/<W&B run id>`` in a sweep, else ``run_dir`` itself."""

    def __init__(self, project: str, config: dict, run_dir: Path):
        try:
            import wandb
        except ImportError as error:
            raise ImportError("wandb_project needs wandb: pip install 'rloop-lightning[wandb]'") from error
        run_id = agent_run_id()
        self.run_dir = run_dir / run_id if run_id else run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, config=config, dir=str(self.run_dir), job_type="rloop")
        if getattr(self.run, "sweep_id", None) and self.run.id != run_id:  # a sweep run started another way
            self.run_dir = run_dir / self.run.id
            log.warning("W&B sweep run %s: its W&B files are under %s, its outputs under %s",
                        self.run.id, run_dir if run_id is None else run_dir / run_id, self.run_dir)

    def log_results(self, completed: dict[str, dict]) -> None:
        """Log evaluations and expert-set summaries of the manifest's completed phases, in order."""
        evaluations = [(0, completed[BASE_EVALUATION])] if BASE_EVALUATION in completed else []
        for name, info in sorted(completed.items()):
            k = RunLayout.iteration_of(name)
            if k is None:
                continue
            if name == RunLayout.phase("eval", k):
                evaluations.append((k + 1, info))
            elif name == RunLayout.phase("expert_set", k):
                self.run.log({"iteration": k, "expert_set/size": info["size"],
                              "expert_set/hard_share": info["hard_share"]})
        for theta, info in evaluations:
            flat = {f"eval/{split}/{metric}": value for split, metrics in info["metrics"].items()
                    for metric, value in metrics.items()}
            self.run.log({"theta": theta, **flat})
        final = RunLayout(self.run_dir).final  # the policy the loop hands over (its ``output``)
        metrics = json.loads(final.read_text())["metrics"] if final.exists() else (
            evaluations[-1][1]["metrics"] if evaluations else None)
        if metrics:
            self.run.summary.update({f"final/{s}/{m}": v for s, ms in metrics.items() for m, v in ms.items()})

    def finish(self) -> None:
        self.run.finish()
