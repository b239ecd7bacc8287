"""Faults injected on ONE rank of a multi-process phase, and a per-rank record of what each rank did.

Imported by name from the phase YAMLs of ``test_agreement.py`` (its subprocesses get
``PYTHONPATH=tests``); light on imports, as reward workers import it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch

from rloop_lightning.data.datamodules import PromptDataModule


def this_rank() -> int:
    """The global rank from the launcher's environment (also inside reward worker processes)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class RankFault(L.Callback):
    """On rank ``rank`` only, during the batches ``batches`` (0-based batch indices of the phase):

    - ``kind="loss"``: the training forward's token embeddings become NaN (the sampling forwards,
      without grad, stay finite), so that rank's loss is NaN (whichever way the head is applied);
    - ``kind="grad"``: that rank's gradient norm is NaN (as an overflow after the all-reduce would be).
    """

    def __init__(self, kind: str, batches: list[int], rank: int = 1):
        self.kind, self.batches, self.rank = kind, set(batches), rank
        self.armed = False
        self._hooked = False

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != self.rank or self._hooked:
            return
        self._hooked = True
        if self.kind == "loss":
            def poison(module, inputs, output):
                return output * float("nan") if self.armed and torch.is_grad_enabled() else output

            pl_module.policy.require_model().get_input_embeddings().register_forward_hook(poison)
        elif self.kind == "grad":
            clip = pl_module._clip_gradients
            pl_module._clip_gradients = lambda: float("nan") if self.armed else clip()
        else:
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.armed = trainer.global_rank == self.rank and batch_idx in self.batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.armed = False


class RankRecord(L.Callback):
    """Writes ``rank{r}.json`` into ``directory``: at the end of fit the rank's optimizer steps, batches,
    generate calls per batch (engine calls, and the Hugging Face engine's ``model.generate`` calls) and
    weight checksum; on an exception, its message."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.generate_calls: list[int] = []
        self.generate_chunks: list[int] = []

    def _write(self, trainer, **fields) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(fields))

    def on_train_start(self, trainer, pl_module) -> None:
        engine = getattr(pl_module, "engine", None)
        if engine is not None:
            generate = engine.generate

            def counted(*args, **kwargs):
                self.generate_calls[-1] += 1
                return generate(*args, **kwargs)

            engine.generate = counted
        chunk = getattr(engine, "_generate_chunk", None)
        if chunk is not None:
            def counted_chunk(*args, **kwargs):
                self.generate_chunks[-1] += 1
                return chunk(*args, **kwargs)

            engine._generate_chunk = counted_chunk

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.generate_calls.append(0)
        self.generate_chunks.append(0)

    def on_fit_end(self, trainer, pl_module) -> None:
        checksum = sum(float(p.detach().double().sum()) for p in pl_module.policy.parameters()
                       if not hasattr(p, "full_tensor"))
        self._write(trainer, global_step=trainer.global_step, batches=len(self.generate_calls),
                    generate_calls=self.generate_calls, generate_chunks=self.generate_chunks, checksum=checksum,
                    bad_steps_in_a_row=getattr(pl_module, "bad_steps_in_a_row", None))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._write(trainer, error=f"{type(exception).__name__}: {exception}")


def alternating_reward(completions, **columns) -> list[float]:
    """1, 0, 1, 0, ...: every group of an even size is informative."""
    return [float(index % 2) for index in range(len(completions))]


def informative_on_rank_zero_only(completions, **columns) -> list[float]:
    """Informative groups on rank 0; equal rewards (never informative) on every other rank."""
    return alternating_reward(completions) if this_rank() == 0 else [0.0] * len(completions)


def fails_on_rank_one(completions, completion_ids, **columns) -> list[float]:
    """Raises on rank 1 for sampled completions (the set-up check's empty probes pass)."""
    if this_rank() == 1 and any(completion_ids):
        raise KeyError("gold")
    return alternating_reward(completions)


def exits_on_rank_one(completions, completion_ids, **columns) -> list[float]:
    """Calls ``sys.exit(3)`` on rank 1 for sampled completions (the set-up check's empty probes pass)."""
    if this_rank() == 1 and any(completion_ids):
        raise SystemExit(3)
    return alternating_reward(completions)


class FewerProblemsOnRankOne(PromptDataModule):
    """Rank 1 loads a quarter of the problems: its epoch ends first."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.trainer is not None and self.trainer.global_rank == 1:
            self.problems = self.problems[: len(self.problems) // 4]
