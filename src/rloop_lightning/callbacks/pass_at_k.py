"""Periodic held-out evaluation (avg@n, pass@k, greedy accuracy) during any phase's fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from rloop_lightning.evaluation import EvaluationResult, Evaluator
from rloop_lightning.rollout.base import RolloutEngine
from rloop_lightning.rollout.hf import HFGenerateEngine


class PassAtKEvaluation(L.Callback):
    """Evaluate ``pl_module.policy`` every ``every_n_steps`` optimizer steps and when fit ends.

    Metrics are logged as ``{split}/pass@k`` etc. through the trainer's loggers and appended to
    ``evaluations.jsonl`` in the trainer's log directory.

    Args:
        evaluators: one per (task, split) to evaluate.
        every_n_steps: evaluation period in optimizer steps; 0 evaluates only at the end.
        at_start: also evaluate before the first step.
        engine: rollout engine (default: the module's own engine if it has one, so vLLM runs are
            evaluated with the synced vLLM copy; else Hugging Face ``generate``).
    """

    def __init__(self, evaluators: list[Evaluator], every_n_steps: int = 0, at_start: bool = False,
                 engine: Optional[RolloutEngine] = None):
        self.evaluators = evaluators
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.engine = engine
        self.history: list[dict] = []
        self._last_step = -1

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[EvaluationResult]:
        step = trainer.global_step
        if step == self._last_step:
            return []
        self._last_step = step
        engine = self.engine or getattr(pl_module, "engine", None) or HFGenerateEngine()
        if engine is getattr(pl_module, "engine", None) and not getattr(pl_module, "engine_follows_policy", True):
            engine.load_policy(pl_module.policy)  # asynchronous rollouts: the module's engine here is not synced
        results = [e.evaluate(pl_module.policy, engine) for e in self.evaluators]
        metrics = {f"{r.split}/{k}": v for r in results for k, v in r.metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.append({"step": step, **metrics})
        if trainer.is_global_zero:
            rank_zero_info(f"step {step} evaluation: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
            if trainer.log_dir:
                path = Path(trainer.log_dir) / "evaluations.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as handle:
                    handle.write(json.dumps({"step": step, **metrics}) + "\n")
        return results

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.run(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for evaluator in self.evaluators:
            evaluator.close()
