"""Loop-level experiment tracking on Weights & Biases: one W&B run per ``rloop fit``.

Phases log their own step metrics through their trainers' loggers (``configs/loggers/wandb.yaml``);
this run holds what only the loop knows: held-out metrics per iteration and expert-set sizes, with
the final theta's metrics as ``final/...`` (what ``configs/sweeps/rloop_expert_set.yaml`` optimises).
The API key is read by wandb from the environment or its netrc; it is never written to a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rloop_lightning.loop.layout import BASE_EVALUATION, RunLayout


class WandbTracker:
    def __init__(self, project: str, config: dict, run_dir: Path):
        try:
            import wandb
        except ImportError as error:
            raise ImportError("wandb_project needs wandb: pip install 'rloop-lightning[wandb]'") from error
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, config=config, dir=str(run_dir), job_type="rloop")

    @property
    def sweep_run_id(self) -> Optional[str]:
        """The W&B run id when this run belongs to a sweep (each needs its own run directory)."""
        return self.run.id if getattr(self.run, "sweep_id", None) else None

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
        if evaluations:
            self.run.summary.update({key.replace("eval/", "final/", 1): value for key, value in
                                     {f"eval/{s}/{m}": v for s, ms in evaluations[-1][1]["metrics"].items()
                                      for m, v in ms.items()}.items()})

    def finish(self) -> None:
        self.run.finish()
