"""The LightningModule base of every phase: it owns a ``Policy`` and its optimizer.

Weights load in ``configure_model`` (sharded with FSDP2 when the strategy provides a device
mesh), and the optimizer covers the policy's trainable parameters only (LoRA adapters under LoRA).
"""

from __future__ import annotations

from typing import Optional

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rloop_lightning.policy import Policy
from rloop_lightning.strategies import is_sharded, shard_with_fsdp2

# what bitsandbytes stores beside each 4-bit weight in a state dict (``Params4bit`` quantisation state)
QUANT_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                        ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


class PolicyModule(L.LightningModule):
    def __init__(self, policy: Policy, optimizer: OptimizerCallable,
                 lr_scheduler: Optional[LRSchedulerCallable] = None):
        super().__init__()
        self.policy = policy
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler

    def configure_model(self) -> None:
        model = self.policy.load_model()
        if self._device_mesh is not None and not is_sharded(model):  # ModelParallelStrategy: FSDP2
            shard_with_fsdp2(model, self._device_mesh)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Restore from a checkpoint. Under QLoRA the checkpoint also holds bitsandbytes' quantisation state
        of each frozen 4-bit weight, which no module of the freshly loaded policy takes back (it already
        has the same state, from the same base): those entries are dropped, the rest loads strictly."""
        if self.policy.load_in_4bit:
            state_dict = {key: value for key, value in state_dict.items() if not key.endswith(QUANT_STATE_SUFFIXES)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}
