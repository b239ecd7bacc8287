"""Periodic held-out evaluation (avg@n, pass@k, greedy accuracy) during any phase's fit.

With a ``seed`` it is the loop's learning curve (``RLoop.curve_every_n_steps``): each point is
``evaluate_policy`` with that seed, the very evaluation of the loop's end points, so a point of the
curve and an end point of the same policy give the same numbers; training's random state is put
back afterwards, so a run trains alike with and without its curve.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng

from rloop_lightning.evaluation import EvaluationResult, Evaluator, evaluate_policy
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
        seed: evaluate as the loop does (``evaluate_policy`` with this seed; ``engine`` default: Hugging
            Face ``generate``, released after each evaluation), with training's random state kept; steps
            are then RL steps (rollout batches, ``GRPOModule.rollout_step``) and each evaluation is a
            row ``{"step", "seconds", "metrics": {"task/split": {...}}}``, ``seconds`` being the phase's
            training time so far, this callback's evaluations left out.
        path: the jsonl file of the rows (default: ``evaluations.jsonl`` in the trainer's log directory).
        at_end: also evaluate when fit ends.
        end_step: a step evaluated elsewhere (the loop's RL end point, which evaluates the same weights with
            the same seed): the periodic evaluation skips it.
    """

    def __init__(self, evaluators: list[Evaluator], every_n_steps: int = 0, at_start: bool = False,
                 engine: Optional[RolloutEngine] = None, seed: Optional[int] = None, path: Optional[str] = None,
                 at_end: bool = True, end_step: Optional[int] = None):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: at the end only), got {every_n_steps}")
        self.evaluators = evaluators
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.engine = engine
        self.seed = seed
        self.path = path
        self.at_end = at_end
        self.end_step = end_step
        self.history: list[dict] = []
        self._last_step = -1
        self._training_seconds = 0.0  # of the phase before this process's fit (a resumed phase's earlier part)
        self._clock = time.perf_counter()  # training time since then is perf_counter() - _clock

    def step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Optimizer steps; with a ``seed`` (the loop's curve), RL steps where the module counts them."""
        return getattr(pl_module, "rollout_step", trainer.global_step) if self.seed is not None else trainer.global_step

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[EvaluationResult]:
        step = self.step(trainer, pl_module)
        if step == self._last_step:
            return []
        self._last_step = step
        if self.seed is not None:
            self.run_seeded(trainer, pl_module, step)
            return []
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
            self.append(trainer, {"step": step, **metrics})
        return results

    def run_seeded(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """One point of the loop's curve: ``evaluate_policy`` with ``seed``, training's RNG untouched."""
        seconds = self._training_seconds + time.perf_counter() - self._clock
        started = time.perf_counter()
        try:
            with isolate_rng():
                metrics = evaluate_policy(pl_module.policy, self.evaluators, self.engine, seed=self.seed)
        finally:
            if self.engine is not None:
                self.engine.release()
        self._clock += time.perf_counter() - started  # the evaluation is not training time
        row = {"step": step, "seconds": round(seconds, 3), "metrics": metrics}
        self.history.append(row)
        flat = {f"{split}/{name}": value for split, values in metrics.items() for name, value in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
        if trainer.is_global_zero:
            rank_zero_info(f"RL step {step} evaluation: " + ", ".join(f"{k}={v:.3f}" for k, v in flat.items()))
            self.append(trainer, row)

    def append(self, trainer: L.Trainer, row: dict) -> None:
        path = Path(self.path) if self.path else Path(trainer.log_dir) / "evaluations.jsonl" if trainer.log_dir else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, seed=self.seed, path=self.path)

    def state_dict(self) -> dict:
        """The training time so far, so that a phase resumed from a checkpoint goes on counting it."""
        return {"training_seconds": self._training_seconds + time.perf_counter() - self._clock}

    def load_state_dict(self, state_dict: dict) -> None:
        self._training_seconds = state_dict.get("training_seconds", 0.0)
        self._clock = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self._clock = time.perf_counter()
        if self.at_start:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self.step(trainer, pl_module)
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0 and step != self.end_step:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.run(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for evaluator in self.evaluators:
            evaluator.close()
