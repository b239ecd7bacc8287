"""Save the trained policy in Hugging Face format (safetensors) when a fit ends."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from rloop_lightning.agreement import on_main_process

SHARDED_STRATEGIES = (FSDPStrategy, ModelParallelStrategy)  # parameters are shards: gather before saving


class ExportPolicy(L.Callback):
    """Write ``pl_module.policy`` to ``dirpath`` at the end of ``fit``.

    Args:
        dirpath: output directory, loadable as ``Policy(model_name_or_path=dirpath)``;
            default ``{trainer.default_root_dir}/policy``.
        merged: under LoRA, merge adapters into the base weights instead of saving the adapter only.
    """

    def __init__(self, dirpath: Optional[str] = None, merged: bool = False):
        self.dirpath = dirpath
        self.merged = merged

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state_dict = None
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):  # every rank joins the gather; rank 0 gets it all
            prefix = "policy.model."
            gathered = trainer.strategy.lightning_module_state_dict()
            state_dict = {key[len(prefix):]: value for key, value in gathered.items() if key.startswith(prefix)}

        def save() -> None:
            dirpath = self.dirpath or Path(trainer.default_root_dir) / "policy"
            path = pl_module.policy.save(dirpath, merged=self.merged, state_dict=state_dict)
            rank_zero_info(f"policy saved to {path}")

        on_main_process("ExportPolicy (saving the policy)", save)  # a failed save stops every rank at once
