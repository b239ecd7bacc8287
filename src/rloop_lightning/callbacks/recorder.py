"""Record every step's logged metrics to a jsonl file (what the RLoop report plots)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class MetricsRecorder(L.Callback):
    """Append ``{"step": ..., metric: value, ...}`` per training batch to ``path`` (rank zero only).

    A checkpoint records the file's length; resuming from it cuts off the rows written after it.
    """

    def __init__(self, path: str):
        self.path = Path(path)

    def state_dict(self) -> dict:
        return {"bytes": self.path.stat().st_size if self.path.exists() else 0}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.path.exists() and self.path.stat().st_size > state_dict["bytes"]:
            with open(self.path, "r+b") as handle:
                handle.truncate(state_dict["bytes"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        row = {"step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            row[key] = float(value) if isinstance(value, torch.Tensor) else value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
