"""The LightningModule base of every phase: it owns a ``Policy`` and its optimizer.

Weights load in ``configure_model`` (sharded with FSDP2 when the strategy provides a device
mesh), and the optimizer covers the policy's trainable parameters only (LoRA adapters under LoRA).
On several ranks, training starts only when every rank has as many batches per epoch.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rloop_lightning.agreement import ranks_with, values_of_ranks
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
        self.strict_loading = not self.policy.is_peft  # a LoRA checkpoint holds the adapter only
        if self.needs_reference:  # the frozen copy of theta_k, made before a resume restores later weights
            with self.policy.reference():
                pass

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Under LoRA/QLoRA a checkpoint keeps the trained adapter only (with its optimizer state, which
        covers nothing else): the base and the frozen reference adapter load from their own files."""
        if "state_dict" in checkpoint and self.policy.is_peft:
            trained = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    @property
    def needs_reference(self) -> bool:
        """Whether the objective uses the reference policy (a KL penalty)."""
        return False

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

    def on_train_start(self) -> None:
        """Refuse, on every rank, ranks with different numbers of batches per epoch: the rank whose data
        ends first would leave the others waiting in their next all-reduce (end of data is a decision
        all ranks must take together)."""
        if self.trainer.world_size == 1:
            return
        counts = values_of_ranks(float(self.trainer.num_training_batches))
        if len(set(counts)) > 1:
            listing = ", ".join(f"rank {rank}: {count:g}" for rank, count in enumerate(counts))
            raise RuntimeError(f"the ranks have different numbers of training batches per epoch ({listing}); "
                               "every rank must see as many batches (a DistributedSampler over the same dataset "
                               "gives that)")

    def ranks_with(self, flag: bool) -> list[int]:
        """``agreement.ranks_with`` over this Trainer's ranks: the same list on every rank. A one-device
        Trainer decides alone, even inside a larger process group."""
        if self.trainer.world_size == 1:
            return [self.global_rank] if flag else []
        return ranks_with(flag)
