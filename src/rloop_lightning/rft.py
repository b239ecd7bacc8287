"""The RFT phase: supervised fine-tuning on verified (prompt, completion) records.

Objective (per batch):  L = - sum_{i,t} m_it log pi(y_it | x_i, y_i<t) / sum_{i,t} m_it
                            + beta * mean_{i,t} KL_k3(pi || pi_ref)      (beta = ``kl_coef``, default 0)
where m masks completion tokens (the prompt carries no loss) and pi_ref is the policy the phase
started from (``Policy.reference``: theta_k in RLoop iteration k, also under LoRA, where it is a
frozen copy of theta_k's adapter). In RLoop this is the *exploit* step: starting again from
theta_k, fit the expert set harvested during exploration. The same module warms up the tiny base on solver demonstrations.

Length: a record longer than ``max_length`` (default: the model context) has its completion truncated
to fit; the set-up counts and warns about such records. A record whose prompt alone leaves no room for
a completion token is refused, naming it.

A non-finite loss skips the batch's update on every rank (``max_bad_steps`` in a row abort the phase).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rloop_lightning.algorithms.kl import kl_penalty
from rloop_lightning.policy import Policy
from rloop_lightning.policy_module import PolicyModule

log = logging.getLogger(__name__)


def count_truncated(policy: Policy, records: Sequence[dict], limit: int, chunk: int = 1024) -> int:
    """How many (prompt, completion + EOS) records exceed ``limit`` tokens (their completions are truncated);
    ``ValueError`` naming the first record whose prompt alone is ``limit`` tokens or more."""
    truncated = 0
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        prompts = policy.encode_prompts([r["prompt"] for r in part])
        completions = policy.encode_completions([r["completion"] for r in part])
        for offset, (prompt, completion) in enumerate(zip(prompts, completions)):
            if len(prompt) >= limit:
                raise ValueError(
                    f"record {start + offset} ({part[offset]['prompt'][:60]!r}...): its prompt has {len(prompt)} "
                    f"tokens, not below the length limit of {limit} (max_length, or the model context): no "
                    "completion token would be trained")
            truncated += len(prompt) + len(completion) > limit
    return truncated


class RFTModule(PolicyModule):
    """SFT with the loss on completion tokens only.

    Args:
        policy: the model to fine-tune.
        optimizer: optimizer factory (``class_path`` in YAML).
        lr_scheduler: optional scheduler factory, stepped every optimizer step.
        max_length: cap on prompt + completion tokens (completions are truncated to fit).
        kl_coef: weight of the k3 KL penalty to the policy the phase started from; 0 disables it.
        max_bad_steps: abort after this many consecutive batches with a non-finite loss (each is
            skipped: no backward, no update, on every rank).
    """

    def __init__(
        self,
        policy: Policy,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        max_length: Optional[int] = None,
        kl_coef: float = 0.0,
        max_bad_steps: int = 3,
    ):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or null, got {max_length}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        super().__init__(policy, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["policy", "optimizer", "lr_scheduler"])
        self.max_length = max_length
        self.kl_coef = kl_coef
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.bad_steps_in_a_row = 0
        self._bad_ranks: list[int] = []
        self._step_started = time.perf_counter()
        self.length_limit = max_length

    def setup(self, stage: str) -> None:
        """The length limit: ``max_length``, at most the model context; records over it are counted and warned."""
        if stage != "fit":
            return
        context = self.policy.context_length
        self.length_limit = min(filter(None, (self.max_length, context)), default=None)
        records = getattr(getattr(self.trainer.datamodule, "dataset", None), "records", None)
        if self.length_limit is None or not records:
            return
        truncated = count_truncated(self.policy, records, self.length_limit)
        if truncated:
            log.warning("%d of %d records are longer than %d tokens (max_length=%s, model context %s): their "
                        "completions are truncated to fit", truncated, len(records), self.length_limit,
                        self.max_length, context)

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rloop_rft"] = {"bad_steps_in_a_row": self.bad_steps_in_a_row}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.bad_steps_in_a_row = checkpoint.get("rloop_rft", {}).get("bad_steps_in_a_row", 0)

    def training_step(self, records: list[dict], batch_index: int) -> torch.Tensor:
        batch = self.policy.encode_pairs(
            [r["prompt"] for r in records], [r["completion"] for r in records], self.length_limit
        ).to(self.device)
        logprobs, entropy = self.policy.completion_logprobs(batch, with_entropy=True)
        mask = batch.completion_mask.to(logprobs.dtype)
        tokens = mask.sum().clamp(min=1)
        nll = -(logprobs * mask).sum() / tokens
        loss = nll
        metrics = {"train/nll": nll.detach(), "train/entropy": (entropy * mask).sum() / tokens}
        if self.kl_coef > 0:
            kl = (kl_penalty(logprobs, self.policy.reference_logprobs(batch), "k3") * mask).sum() / tokens
            loss = loss + self.kl_coef * kl
            metrics["train/kl"] = kl.detach()
        bad_ranks = self.ranks_with(not bool(torch.isfinite(loss.detach())))  # the same list on every rank
        if bad_ranks:
            self._bad_ranks = sorted(set(self._bad_ranks) | set(bad_ranks))  # over the accumulated batches
            self._count_bad_batch(bad_ranks)
        else:
            self.bad_steps_in_a_row = 0
        elapsed = time.perf_counter() - self._step_started
        self._step_started = time.perf_counter()
        metrics["perf/tokens_per_s"] = float(batch.attention_mask.sum()) / max(elapsed, 1e-9)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(records))
        self.log_dict(metrics, batch_size=len(records))
        return loss

    def optimizer_step(self, epoch, batch_index, optimizer, optimizer_closure=None) -> None:
        """Step, unless the batch's loss was non-finite on some rank: then every rank runs its backward
        (DDP's all-reduce needs each rank's) and drops the gradients (Lightning cannot skip
        ``training_step`` on several ranks by returning None)."""
        if optimizer_closure is not None:
            optimizer_closure()  # training_step and backward
        skip, self._bad_ranks = bool(self._bad_ranks), []
        if skip:
            optimizer.zero_grad(set_to_none=True)
            return
        optimizer.step()

    def _count_bad_batch(self, ranks: list[int]) -> None:
        """Count a batch whose update every rank skips; raise on every rank after ``max_bad_steps`` in a row."""
        self.bad_steps_in_a_row += 1
        where = f" on rank(s) {ranks}" if self.trainer.world_size > 1 else ""
        log.warning("non-finite RFT loss%s at step %d: batch skipped (%d in a row)", where,
                    self.trainer.global_step, self.bad_steps_in_a_row)
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise RuntimeError(f"{self.bad_steps_in_a_row} consecutive non-finite RFT losses{where} (max_bad_steps="
                               f"{self.max_bad_steps}); lower the learning rate or check the expert records")
