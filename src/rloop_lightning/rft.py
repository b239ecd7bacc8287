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

Micro-batches: by default a batch is one forward and one backward (Lightning's automatic optimisation;
``accumulate_grad_batches`` for more records per step). ``micro_batch_tokens`` cuts each batch into
micro-batches of at most that many tokens (``micro_batches.by_tokens``: rows sorted by length, padded size
rows x longest row, real tokens under ``policy.packing``) and accumulates their gradients into one
optimizer step (manual optimisation). Each micro-batch's token-mean is weighted by its share of the
batch's completion tokens, so the step's gradient is the uncut batch's (up to float rounding). Ranks agree
on the number of micro-batches; a rank with fewer runs filler micro-batches of weight 0.

A non-finite loss skips the batch's update on every rank (``max_bad_steps`` in a row abort the phase).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rloop_lightning.agreement import raise_together
from rloop_lightning.algorithms import micro_batch_weight
from rloop_lightning.algorithms.kl import kl_penalty
from rloop_lightning.forwards import PolicyBatch
from rloop_lightning.micro_batches import MicroBatching, check_budget
from rloop_lightning.policy import Policy
from rloop_lightning.policy_module import PolicyModule

WITHOUT_BUDGET = "to run each batch in one forward"  # what micro_batch_tokens: null does in RFT

log = logging.getLogger(__name__)


def record_lengths(policy: Policy, records: Sequence[dict], limit: Optional[int],
                   chunk: int = 1024) -> list[tuple[int, int]]:
    """(prompt, completion + EOS) tokens of each record, before truncation; ``ValueError`` naming the first
    record whose prompt alone is ``limit`` tokens or more."""
    lengths = []
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        prompts = policy.encode_prompts([r["prompt"] for r in part])
        completions = policy.encode_completions([r["completion"] for r in part])
        for offset, (prompt, completion) in enumerate(zip(prompts, completions)):
            if limit is not None and len(prompt) >= limit:
                raise ValueError(
                    f"record {start + offset} ({part[offset]['prompt'][:60]!r}...): its prompt has {len(prompt)} "
                    f"tokens, not below the length limit of {limit} (max_length, or the model context): no "
                    "completion token would be trained")
            lengths.append((len(prompt), len(completion)))
    return lengths


def count_truncated(policy: Policy, records: Sequence[dict], limit: int, chunk: int = 1024) -> int:
    """How many (prompt, completion + EOS) records exceed ``limit`` tokens (their completions are truncated);
    ``ValueError`` naming the first record whose prompt alone is ``limit`` tokens or more."""
    return sum(prompt + completion > limit for prompt, completion in record_lengths(policy, records, limit, chunk))


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
        micro_batch_tokens: cut each batch into micro-batches of at most this many tokens (rows x the longest
            prompt + completion among them; real tokens under ``policy.packing``), rows sorted by length, and
            accumulate their gradients into one optimizer step: the gradient is the uncut batch's, the memory
            that of this many tokens. At least the longest record (checked before the model loads when the
            datamodule holds its records, else at each batch). Not with ``trainer.accumulate_grad_batches``
            or ``trainer.gradient_clip_val`` (set ``data.batch_size`` to the records of one step instead).
            ``None``: each batch is one forward (automatic optimisation).
    """

    def __init__(
        self,
        policy: Policy,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        max_length: Optional[int] = None,
        kl_coef: float = 0.0,
        max_bad_steps: int = 3,
        micro_batch_tokens: Optional[int] = None,
    ):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or null, got {max_length}")
        if micro_batch_tokens is not None and micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1 or null, got {micro_batch_tokens}")
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
        # the size is unused: with a token budget the rows are cut by tokens
        self.micro_batching = None if micro_batch_tokens is None else MicroBatching(1, micro_batch_tokens,
                                                                                     policy.packing)
        self.automatic_optimization = self.micro_batching is None
        self.records_fit_budget = False  # every record of the datamodule is known to fit micro_batch_tokens

    def configure_callbacks(self) -> list:
        """Under ``micro_batch_tokens`` (manual optimisation), refuse the Trainer's automatic accumulation and
        clipping by name, before any model loads (Lightning would refuse them right after, in its own words)."""
        if self.micro_batching is None or self.trainer.state.fn != "fit":
            return []
        budget = f"micro_batch_tokens={self.micro_batching.max_tokens}"
        if self.trainer.accumulate_grad_batches != 1:
            raise ValueError(f"{budget} with trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches}: "
                             "under a token budget each batch is one optimizer step whose micro-batches accumulate "
                             "their gradients. Set data.batch_size to the records of one optimizer step (batch_size "
                             "x accumulate_grad_batches) and drop accumulate_grad_batches, or set micro_batch_tokens "
                             "to null")
        if self.trainer.gradient_clip_val:
            raise ValueError(f"{budget} with trainer.gradient_clip_val={self.trainer.gradient_clip_val}: RFT under a "
                             "token budget steps its optimizer itself (manual optimisation), which Lightning does "
                             "not clip. Remove gradient_clip_val, or set micro_batch_tokens to null")
        return []

    def setup(self, stage: str) -> None:
        """The length limit: ``max_length``, at most the model context; records over it are counted and warned.
        Under ``micro_batch_tokens``, the longest record (after truncation) must fit it."""
        if stage != "fit":
            return
        context = self.policy.context_length
        self.length_limit = min(filter(None, (self.max_length, context)), default=None)
        records = getattr(getattr(self.trainer.datamodule, "dataset", None), "records", None)
        if not records or (self.length_limit is None and self.micro_batching is None):
            return
        lengths = record_lengths(self.policy, records, self.length_limit)
        limit = self.length_limit
        truncated = 0 if limit is None else sum(prompt + completion > limit for prompt, completion in lengths)
        if truncated:
            log.warning("%d of %d records are longer than %d tokens (max_length=%s, model context %s): their "
                        "completions are truncated to fit", truncated, len(records), limit, self.max_length, context)
        if self.micro_batching is not None:
            totals = [min(prompt + completion, limit or prompt + completion) for prompt, completion in lengths]
            longest = max(range(len(totals)), key=totals.__getitem__)
            check_budget(self.micro_batching.max_tokens, totals[longest],
                         f"record {longest} of the training data ({records[longest]['prompt'][:40]!r}...): "
                         f"{lengths[longest][0]} prompt + {totals[longest] - lengths[longest][0]} completion tokens",
                         WITHOUT_BUDGET)
            self.records_fit_budget = True

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rloop_rft"] = {"bad_steps_in_a_row": self.bad_steps_in_a_row}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.bad_steps_in_a_row = checkpoint.get("rloop_rft", {}).get("bad_steps_in_a_row", 0)

    def loss(self, batch: PolicyBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on ``batch`` (token-means over its completion tokens) and its terms, detached."""
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
        return loss, metrics

    def training_step(self, records: list[dict], batch_index: int) -> torch.Tensor:
        batch = self.policy.encode_pairs(
            [r["prompt"] for r in records], [r["completion"] for r in records], self.length_limit
        ).to(self.device)
        if self.micro_batching is not None:
            loss, metrics = self.update_by_tokens(batch)
        else:
            loss, metrics = self.loss(batch)
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

    @property
    def _several_ranks(self) -> bool:
        return self.trainer.world_size > 1

    def update_by_tokens(self, batch: PolicyBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step on ``batch`` in micro-batches of at most ``micro_batch_tokens`` tokens, each
        micro-batch's loss weighted by its share of the batch's completion tokens; (the batch's loss and terms,
        detached). A non-finite loss on any rank stops every rank before its backward and skips the step."""
        self._check_batch_fits_budget(batch)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)
        mask = batch.completion_mask
        total = torch.zeros((), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        for rows in self.micro_batching.split(batch, agree=self._several_ranks):
            loss, terms = self.loss(self.micro_batching.micro(batch, rows))  # an empty micro-batch: a filler
            bad_ranks = self.ranks_with(not bool(torch.isfinite(loss.detach())))  # every rank leaves together
            if bad_ranks:
                optimizer.zero_grad(set_to_none=True)
                self._count_bad_batch(bad_ranks)
                return loss.detach(), terms
            weight = micro_batch_weight("token_mean", mask[rows], mask) if len(rows) else 0.0
            self.manual_backward(loss * weight)
            total = total + loss.detach() * weight
            for key, value in terms.items():
                metrics[key] = metrics.get(key, 0.0) + value * weight
        self.bad_steps_in_a_row = 0
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return total, metrics

    def _check_batch_fits_budget(self, batch: PolicyBatch) -> None:
        """Where ``setup`` could not read the records: the batch's longest row fits ``micro_batch_tokens``, or
        every rank raises (one rank's error would leave the others waiting in a collective)."""
        if self.records_fit_budget:
            return
        error = None
        prompts, completions = batch.lengths()
        longest = max(range(len(prompts)), key=lambda row: prompts[row] + completions[row])
        try:
            check_budget(self.micro_batching.max_tokens, prompts[longest] + completions[longest],
                         f"a record of step {self.trainer.global_step}'s batch: {prompts[longest]} prompt + "
                         f"{completions[longest]} completion tokens", WITHOUT_BUDGET)
        except ValueError as raised:
            error = raised
        if self._several_ranks:
            raise_together(error, "the check of micro_batch_tokens")
        elif error is not None:
            raise error

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
