"""GRPO / DAPO / Dr.GRPO / GSPO / pass@k-training exploration phase as a LightningModule (manual optimization).

One training step: sample G completions for each of the batch's prompts with the rollout engine,
score them, keep informative groups (dynamic sampling, optional), compute group advantages, then
``num_iterations`` passes over the rollout batch, each split into ``num_mini_batches`` optimizer
steps with gradient accumulation over micro-batches of ``micro_batch_size`` completions, or of at
most ``micro_batch_tokens`` padded tokens (``rloop_lightning.micro_batches``):

    loss = aggregate_t,i( -min(rho_it A_i, clip(rho_it, 1-eps_low, 1+eps_high) A_i) + beta KL_it )

The maths lives in ``rloop_lightning.algorithms``; this module wires it. Every completion of every
step is returned from ``training_step`` as a trajectory record, which ``ExpertHarvester`` stores.
Departures from the GRPO paper: KL off by default (DAPO, Dr.GRPO); with ``num_iterations ==
num_mini_batches == 1`` the behaviour policy equals the current one, so ``old_logprobs`` are the
detached current log-probs (ratio 1) and no extra forward pass is spent on them. Dropout is off in
every pass (as in TRL's PPO/RLOO trainers), so a policy's log-probs do not depend on the pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rloop_lightning import micro_batches
from rloop_lightning.agreement import raise_together, sums_of_ranks
from rloop_lightning.algorithms import (
    DynamicSamplingBuffer, DynamicSamplingSignal, RankTotals, clipped_policy_loss, dynamic_sampling_signal,
    group_advantages, kl_penalty, micro_batch_weight, overlong_mask, soft_overlong_penalty,
)
from rloop_lightning.algorithms.importance import behaviour_weighted_advantages, pad_logprobs
from rloop_lightning.grpo import balance
from rloop_lightning.grpo.settings import (  # noqa: F401 - LossSettings & co. are imported from here too
    ImportanceSettings, LossSettings, OverlongSettings, check_reward_settings,
)
from rloop_lightning.grpo.groups import Group, ScoringStats, flatten_groups, score_groups, trainer_state, trajectories
from rloop_lightning.grpo.step_metrics import step_metrics, step_sums
from rloop_lightning.forwards import PolicyBatch, widen
from rloop_lightning.policy import Policy, disable_dropout
from rloop_lightning.policy_module import PolicyModule
from rloop_lightning.prompt_stats import PromptStats
from rloop_lightning.rewards.inputs import chat_format
from rloop_lightning.rewards.runner import RewardRunner, function_name
from rloop_lightning.rollout.base import RolloutEngine, Rollouts, SamplingParams, sampling_seed
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.rollout.staleness import RolloutSettings, check_admissible, check_rollout_mode

log = logging.getLogger(__name__)


class CloseSamplerOnException(L.Callback):
    """Stop an asynchronous phase's sampler process when the fit fails anywhere (a callback, a hook)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        pl_module.close_sampler()


class GRPOModule(PolicyModule):
    """Group-relative policy optimisation with the DAPO/Dr.GRPO/GSPO variants.

    Args:
        policy: the policy to train.
        engine: rollout engine (default: Hugging Face ``generate``).
        sampling: sampling parameters of the rollouts.
        num_generations: G, completions per prompt (>= 2: advantages are relative within a group).
        loss: the objective's variant.
        overlong: handling of truncated completions.
        importance: sampler/trainer log-prob mismatch correction (on by default with vLLM, and with
            asynchronous rollouts whose ``max_staleness`` > 0).
        rollout: synchronous rollouts (default) or asynchronous ones in a sampler process, with their
            staleness bound and sampling seed.
        dynamic_sampling: keep only groups whose rewards differ, refilling from the datamodule.
        dynamic_sampling_signal: what must differ within a group: ``accuracy`` (the verdicts, as DAPO;
            format rewards and the overlong penalty do not count) or the total ``reward``.
        max_sampling_rounds: cap on sampling rounds per step under dynamic sampling.
        num_iterations: mu, passes over each rollout batch.
        num_mini_batches: optimizer steps per pass.
        micro_batch_size: completions per forward/backward (gradient accumulation).
        micro_batch_tokens: instead of ``micro_batch_size``, cut each mini-batch into micro-batches of at
            most this many tokens (rows x the longest prompt + completion among them), rows sorted by length;
            the same for the old-policy and reference passes. ``None``: fixed counts. At least the longest
            prompt + ``max_new_tokens`` (checked before the model loads).
        balance_ranks: on several ranks, move the step's completions between ranks before the update so
            that each rank trains on about as many real tokens (``rloop_lightning.grpo.balance``); needs
            ``micro_batch_tokens``. The gradient is the same either way (the loss is normalised over all ranks).
        max_grad_norm: gradient clipping; 0 disables it.
        share_prompts: run each distinct prompt of a micro-batch through the model once and the G
            completions on top of its KV cache (same log-probs and gradients, prompt cost / G).
        reward_functions: TRL-signature rewards; default: the datamodule task's verifier.
        reward_weights: one weight per reward function.
        correctness_function: name of the reward function whose score decides correctness
            (harvesting, accuracy); default: the total reward.
        correct_threshold: score at or above which a completion is correct.
        reward_workers: verification worker processes (0 = in-process).
        reward_timeout: seconds per reward-function call on a chunk of completions; one batch waits at
            most two of them per function.
        max_bad_steps: abort after this many consecutive non-finite losses (each is skipped), or this
            many steps in a row in which every reward function call failed (raised, timed out, NaN/inf).
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory, stepped per optimizer step.
    """

    def __init__(
        self,
        policy: Policy,
        engine: Optional[RolloutEngine] = None,
        sampling: Optional[SamplingParams] = None,
        num_generations: int = 8,
        loss: Optional[LossSettings] = None,
        overlong: Optional[OverlongSettings] = None,
        importance: Optional[ImportanceSettings] = None,
        rollout: Optional[RolloutSettings] = None,
        dynamic_sampling: bool = False,
        dynamic_sampling_signal: DynamicSamplingSignal = "accuracy",
        max_sampling_rounds: int = 3,
        num_iterations: int = 1,
        num_mini_batches: int = 1,
        micro_batch_size: int = 64,
        micro_batch_tokens: Optional[int] = None,
        balance_ranks: bool = False,
        max_grad_norm: float = 1.0,
        share_prompts: bool = True,
        reward_functions: Optional[list[Callable]] = None,
        reward_weights: Optional[list[float]] = None,
        correctness_function: Optional[str] = None,
        correct_threshold: float = 1.0,
        reward_workers: int = 0,
        reward_timeout: float = 10.0,
        max_bad_steps: int = 3,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__(policy, optimizer, lr_scheduler)
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages are relative within a group), "
                             f"got {num_generations}")
        for name, value in (("num_iterations", num_iterations), ("num_mini_batches", num_mini_batches),
                            ("micro_batch_size", micro_batch_size), ("max_sampling_rounds", max_sampling_rounds),
                            ("micro_batch_tokens", 1 if micro_batch_tokens is None else micro_batch_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        check_reward_settings(reward_workers, reward_timeout, max_bad_steps)
        balance.check_balance_settings(balance_ranks, micro_batch_tokens)
        settings = loss or LossSettings()
        if settings.advantage == "pass_at_k" and not 1 <= settings.pass_k <= num_generations:
            raise ValueError(f"loss.pass_k must be in 1..num_generations={num_generations}, got {settings.pass_k}")
        self.save_hyperparameters(ignore=["policy", "engine", "reward_functions", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.engine = engine or HFGenerateEngine()
        self.sampling = sampling or SamplingParams()
        self.num_generations = num_generations
        self.loss_settings = settings
        self.overlong = overlong or OverlongSettings()
        self.importance = importance or ImportanceSettings()
        self.rollout = rollout or RolloutSettings()
        self.top_k_ties = "keep"  # the engine's rule for ties at the k-th logit (set up with the engine's)
        self.sampling_seed: Optional[int] = None  # set at fit start (rollout.seed or the torch seed), checkpointed
        self.sampler = None  # AsyncSampler while an asynchronous phase runs
        self.dynamic_sampling = dynamic_sampling
        self.dynamic_sampling_signal = dynamic_sampling_signal
        self.max_sampling_rounds = max_sampling_rounds
        self.num_iterations = num_iterations
        self.num_mini_batches = num_mini_batches
        self.micro_batch_size = micro_batch_size
        self.micro_batching = micro_batches.MicroBatching(micro_batch_size, micro_batch_tokens, policy.packing)
        self.balance_ranks = balance_ranks
        self.max_grad_norm = max_grad_norm
        self.share_prompts = share_prompts
        self.reward_functions = reward_functions
        self.reward_weights = reward_weights
        self.correctness_function = correctness_function
        self.correct_threshold = correct_threshold
        self.reward_workers = reward_workers
        self.reward_timeout = reward_timeout
        self.max_bad_steps = max_bad_steps
        self.runner: Optional[RewardRunner] = None
        self.prompt_stats = PromptStats()
        self.scoring_stats = ScoringStats()
        self.bad_steps_in_a_row = 0
        self.rollout_step = 0  # rollout batches sampled so far; optimizer steps may be more or fewer

    @property
    def engine_follows_policy(self) -> bool:
        """Whether ``self.engine`` holds the current weights after every rollout batch: not with asynchronous
        rollouts, whose engine runs in the sampler process (callbacks sampling with it load the policy first)."""
        return not self.rollout.is_async

    @property
    def needs_reference(self) -> bool:
        return self.loss_settings.kl_coef > 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rloop_grpo"] = {"rollout_step": self.rollout_step, "prompt_stats": self.prompt_stats.to_dict(),
                                    "scoring_stats": dataclasses.asdict(self.scoring_stats),
                                    "bad_steps_in_a_row": self.bad_steps_in_a_row, "sampling_seed": self.sampling_seed}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rloop_grpo", {})
        self.rollout_step = state.get("rollout_step", 0)
        self.prompt_stats = PromptStats.from_dict(state.get("prompt_stats", {}))
        self.scoring_stats = ScoringStats(**state.get("scoring_stats", {}))
        self.bad_steps_in_a_row = state.get("bad_steps_in_a_row", 0)
        if state.get("sampling_seed") is not None:
            self.sampling_seed = state["sampling_seed"]

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        """Load the policy, then turn its dropout off: the old/proximal log-probs, the training forward and
        the sampler must score one deterministic policy, or the ratio and the importance weights measure
        dropout noise, not off-policyness (``lora.dropout`` applies to RFT only)."""
        super().configure_model()
        disabled = disable_dropout(self.policy.require_model())
        if disabled:
            log.info("GRPO trains without dropout: %d dropout modules set to 0 (e.g. %s)", len(disabled), disabled[0])

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        functions = self.reward_functions or [datamodule.task.reward]
        self.runner = RewardRunner(functions, self.reward_weights, self.reward_workers, self.reward_timeout)
        if self.correctness_function and self.correctness_function not in self.runner.names:
            raise ValueError(f"correctness_function {self.correctness_function!r} is not one of the reward "
                             f"functions {self.runner.names}")
        self._validate_before_training(datamodule, functions)
        self._check_engine_memory()
        check_rollout_mode(self.rollout, self.trainer.world_size, type(self.trainer.strategy).__name__)
        self.top_k_ties = self.engine.top_k_ties() if self.sampling.top_k else "keep"  # scored as it samples
        self.sampling_seed = self.rollout.seed if self.rollout.seed is not None else torch.initial_seed()

    def _check_engine_memory(self) -> None:
        """vLLM engines alive together in this phase (the rollout engine, evaluation callbacks' own
        engines) must fit on the GPU: checked here, before ``configure_model`` loads any weights."""
        engines = {"model.engine": self.engine}
        for index, callback in enumerate(self.trainer.callbacks):
            if getattr(callback, "engine", None) is not None:
                engines[f"callbacks[{index}].engine ({type(callback).__name__})"] = callback.engine
        from rloop_lightning.rollout.vllm import check_gpu_memory_budget  # vllm itself is not imported

        check_gpu_memory_budget(engines)

    def _validate_before_training(self, datamodule, functions) -> None:
        """Catch configuration errors before any sampling: batch shapes, prompt lengths, reward arity."""
        completions = datamodule.batch_size * self.num_generations
        if completions % self.num_mini_batches:
            raise ValueError(f"{datamodule.batch_size} prompts x {self.num_generations} generations = "
                             f"{completions} completions do not split into {self.num_mini_batches} mini-batches")
        problems = datamodule.problems
        prompts = self.policy.encode_prompts([p["prompt"] for p in problems])
        self.engine.check_prompt_lengths(self.policy, prompts, self.sampling, self.policy.context_length,
                                         [p["id"] for p in problems])
        self.micro_batching.check_prompts([len(ids) for ids in prompts], self.sampling.max_new_tokens)
        self.runner.check_problems(problems, chat_format(self.policy), trainer_state(self.trainer))
        log.info("GRPO set-up checked: %d prompts, reward functions %s", len(problems),
                 [function_name(f) for f in functions])

    # ------------------------------------------------------------------ sampling
    def _request_seed(self, step: int, sampling_round: int) -> int:
        return sampling_seed(self.sampling_seed, step, self.global_rank, sampling_round)

    def _rollouts(self, problems: list[dict], sampling_round: int) -> tuple[Rollouts, int]:
        """Rollouts of ``problems`` for this step and the policy version that sampled them."""
        step = self.rollout_step
        if self.sampler is None:
            return self.engine.generate(self.policy, [p["prompt"] for p in problems], self.num_generations,
                                        self.sampling, seed=self._request_seed(step, sampling_round)), step
        if sampling_round == 0:
            return self.sampler.take(step, problems)
        return self.sampler.sample_now(step, problems, sampling_round)

    def _sample(self, problems: list[dict], sampling_round: int = 0) -> list[Group]:
        rollouts, version = self._rollouts(problems, sampling_round)
        check_admissible(self.rollout_step, version, self.rollout.max_staleness if self.sampler else 0)
        groups, error = [], None
        try:  # no collective inside: a rank's error (a reward that exits) can wait here for the others
            groups = score_groups(problems, rollouts, self.num_generations, self.runner, self.correctness_function,
                                  self.correct_threshold, self.scoring_stats, chat_format(self.policy),
                                  trainer_state(self.trainer))
        except Exception as caught:  # noqa: BLE001 -- raised below, on every rank
            error = caught
        # every rank raises the failed rank's named error, not the others' "Connection closed by peer" next
        raise_together(error, f"the rewards of step {self.rollout_step}")
        if self.overlong.mode == "soft_penalty":
            for group in groups:
                lengths = torch.tensor([len(ids) for ids in group.completion_ids])
                group.rewards = group.rewards + soft_overlong_penalty(
                    lengths, self.sampling.max_new_tokens, self.overlong.buffer_length, self.overlong.penalty_factor)
        for group in groups:
            group.policy_version = version
        return groups

    def _filter_values(self, groups: list[Group]) -> torch.Tensor:  # [B, G]
        """What dynamic sampling compares within each group (``dynamic_sampling_signal``)."""
        rewards, correct = torch.stack([g.rewards for g in groups]), torch.stack([g.correct for g in groups])
        return dynamic_sampling_signal(rewards, correct, self.dynamic_sampling_signal)

    def sample_groups(self, problems: list[dict]) -> tuple[list[Group], list[Group], dict[str, float]]:
        """(groups to train on, every group sampled, dynamic-sampling metrics). Dynamic sampling refills
        dropped groups."""
        groups = self._sample(problems)
        if not self.dynamic_sampling:
            return groups, groups, {}
        buffer = DynamicSamplingBuffer(target_groups=len(problems), max_rounds=self.max_sampling_rounds)
        sampled = list(groups)
        buffer.add(groups, self._filter_values(groups))
        sampling_round = 0
        while self.ranks_with(buffer.needs_more):  # every rank samples as many rounds (FSDP2 generate all-gathers)
            needs_more = buffer.needs_more
            sampling_round += 1
            groups = self._sample(self.trainer.datamodule.refill(max(len(problems) - buffer.num_groups, 1)),
                                  sampling_round)
            sampled.extend(groups)  # a rank already full harvests its extra round but does not train on it
            if needs_more:
                buffer.add(groups, self._filter_values(groups))
        sample = buffer.take()
        informative = sample.groups
        metrics = {"train/sampling_rounds": float(sample.rounds), "train/informative_share": sample.informative_fraction}
        if self.trainer.world_size > 1 and len(informative) < len(problems):
            # equal batch shapes on every rank (DDP): pad with zero-advantage groups, which add no gradient
            uninformative = [g for g in sampled if all(g is not kept for kept in informative)]
            informative = informative + uninformative[: len(problems) - len(informative)]
        return informative, sampled, metrics

    # ------------------------------------------------------------------ training
    def training_step(self, problems: list[dict], batch_index: int) -> dict:
        try:
            return self._training_step(problems)
        except BaseException:
            self.close_sampler()  # no sampler process outlives a failed phase
            raise

    def _training_step(self, problems: list[dict]) -> dict:
        started = time.perf_counter()
        train_groups, sampled, sampling_metrics = self.sample_groups(problems)
        failed_ranks = (self.ranks_with(not self.scoring_stats.step_has_reward)  # a step fails when it fails on any rank
                        if self.trainer.world_size > 1 else None)
        reward_health = self.scoring_stats.end_step(self.max_bad_steps, failed_ranks)  # raises after max_bad_steps
        rollout_seconds = time.perf_counter() - started
        step = self.rollout_step
        self.rollout_step += 1
        records = trajectories(sampled, step)
        metrics = {**self._sampling_metrics(sampled, rollout_seconds, step), **sampling_metrics, **reward_health}
        metrics["perf/rollout_seconds"] = rollout_seconds  # sampling and scoring, or waiting for the sampler
        metrics["rollout/staleness"] = float(sum(step - g.policy_version for g in sampled) / len(sampled))
        if self.sampler is not None:
            metrics["perf/sampler_seconds"] = self.sampler.last_seconds
        if train_groups or self.trainer.world_size > 1:  # DDP ranks must run the same backward passes
            metrics.update(self._train_on(train_groups or sampled[: len(problems)]))
        else:
            log.warning("step %d: every sampled group has equal rewards; no update", step)
            metrics["train/skipped_update"] = 1.0
        metrics["perf/step_seconds"] = time.perf_counter() - started
        self.log_dict(metrics, on_step=True, batch_size=len(records))
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, on_step=True, batch_size=len(records))
        self.log("acc", metrics["train/accuracy"], prog_bar=True, on_step=True, batch_size=len(records))
        return {"trajectories": records}

    def _train_on(self, groups: list[Group]) -> dict:
        flat = flatten_groups(groups)
        advantages = group_advantages(flat["rewards"], self.loss_settings.advantage,
                                      k=self.loss_settings.pass_k).flatten()  # [N]
        balanced = {}
        if self.balance_ranks and self._several_ranks:  # this rank's rows are now its share by tokens
            flat, advantages, balanced = balance.redistribute(flat, advantages)
        batch = self.policy.make_batch(flat["prompt_ids"], flat["completion_ids"]).to(self.device)
        mask = batch.completion_mask.float()  # [N, C]
        if self.overlong.mode == "mask":
            mask = mask * overlong_mask(flat["truncated"]).to(self.device)[:, None]
        correct_sampler = self.importance.enabled
        if correct_sampler is None:  # the engine's kernels differ, or the sampling policy may be older
            correct_sampler = self.engine.needs_importance_correction or (
                self.sampler is not None and self.rollout.max_staleness > 0)
        sampler_logprobs = (pad_logprobs(flat["sampler_logprobs"], mask.shape[1]).to(self.device)
                            if correct_sampler else None)
        reuses_batch = self.num_iterations > 1 or self.num_mini_batches > 1
        old_logprobs = self._logprobs_without_grad(batch) if reuses_batch else None
        ref_logprobs = self._reference_logprobs(batch) if self.loss_settings.kl_coef > 0 else None
        started = time.perf_counter()
        stats = self._optimize(batch, mask, advantages.to(self.device), old_logprobs, ref_logprobs,
                               sampler_logprobs)
        stats["perf/train_tokens_per_s"] = (
            float(batch.attention_mask.sum()) * self.num_iterations / max(time.perf_counter() - started, 1e-9))
        stats["train/advantage_abs_mean"] = float(advantages.abs().mean())
        return {**stats, **balanced}

    @property
    def _several_ranks(self) -> bool:  # the no-grad passes also run outside a Trainer (tests)
        return self._trainer is not None and self.trainer.world_size > 1

    @torch.no_grad()
    def _logprobs_without_grad(self, batch: PolicyBatch) -> torch.Tensor:
        return self.micro_batching.logprobs(batch, lambda micro: self.policy.completion_logprobs(
            micro, temperature=self.sampling.temperature, share_prompts=self.share_prompts,
            top_k=self.sampling.top_k, top_p=self.sampling.top_p, top_k_ties=self.top_k_ties)[0],
            self._several_ranks)

    @torch.no_grad()
    def _reference_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        return self.micro_batching.logprobs(batch, lambda micro: self.policy.reference_logprobs(
            micro, self.sampling.temperature, share_prompts=self.share_prompts), self._several_ranks)

    def _optimize(self, batch, mask, advantages, old_logprobs, ref_logprobs, sampler_logprobs=None) -> dict:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        settings = self.loss_settings
        totals: dict[str, list[float]] = {}
        size = batch.input_ids.shape[0]
        for _ in range(self.num_iterations):
            order = torch.randperm(size) if self.num_mini_batches > 1 else torch.arange(size)
            for mini in order.tensor_split(self.num_mini_batches):  # as many on every rank, even if empty
                optimizer.zero_grad(set_to_none=True)
                all_ranks = (RankTotals(*sums_of_ranks([float(mask[mini].sum()), len(mini), 1]))
                          if self._several_ranks else None)  # the loss is normalised over all ranks' rows
                finite, nonfinite_ranks = True, []
                for rows in self.micro_batching.split(batch, mini, self._several_ranks):
                    empty, rows = not len(rows), rows if len(rows) else order[:1]  # empty: this rank's filler
                    logprobs, entropy = self.policy.completion_logprobs(
                        self.micro_batching.micro(batch, rows), with_entropy=True,
                        temperature=self.sampling.temperature, share_prompts=self.share_prompts,
                        top_k=self.sampling.top_k, top_p=self.sampling.top_p, top_k_ties=self.top_k_ties)
                    logprobs, entropy = widen(logprobs, mask.shape[1]), widen(entropy, mask.shape[1])
                    micro_mask = mask[rows]
                    old = old_logprobs[rows] if old_logprobs is not None else logprobs.detach()
                    kl = (kl_penalty(logprobs, ref_logprobs[rows], settings.kl_estimator)
                          if ref_logprobs is not None else None)
                    micro_advantages, importance_stats = advantages[rows], {}
                    if sampler_logprobs is not None:  # w * clipped surrogate, w >= 0 per token (decoupled PPO)
                        micro_advantages, importance_stats = behaviour_weighted_advantages(
                            micro_advantages, old, sampler_logprobs[rows], micro_mask, self.importance.level,
                            self.importance.mode, self.importance.cap)
                    out = clipped_policy_loss(
                        logprobs, old, micro_advantages, micro_mask, settings.clip_eps_low, settings.clip_eps_high,
                        settings.ratio_level, settings.aggregation, self.sampling.max_new_tokens, kl, settings.kl_coef)
                    nonfinite_ranks = self.ranks_with(not bool(torch.isfinite(out.loss)))
                    if nonfinite_ranks:  # every rank leaves before backward (DDP's backward all-reduces)
                        finite = False
                        break
                    weight = 0.0 if empty else micro_batch_weight(settings.aggregation, micro_mask, mask[mini], all_ranks)
                    self.manual_backward(out.loss * weight)
                    if empty:
                        continue
                    stats = {f"train/{k}": float(v) for k, v in out.stats().items()}
                    stats.update({f"importance/{k}": float(v) for k, v in importance_stats.items()})
                    if sampler_logprobs is not None:  # KL(sampler || trainer), k3 over the sampled tokens
                        mismatch = kl_penalty(sampler_logprobs[rows], old.detach(), "k3") * micro_mask
                        stats["rollout/mismatch_kl"] = float(mismatch.sum() / micro_mask.sum().clamp(min=1))
                    stats["train/loss"] = float(out.loss.detach())
                    stats["train/entropy"] = float((entropy * micro_mask).sum() / micro_mask.sum().clamp(min=1))
                    for key, value in stats.items():
                        totals.setdefault(key, []).append(value)
                grad_norm = self._clip_gradients() if finite else float("nan")
                bad_ranks = self.ranks_with(not math.isfinite(grad_norm)) if finite else nonfinite_ranks
                if bad_ranks:
                    self._skip_bad_update(optimizer, bad_ranks)
                    continue
                self.bad_steps_in_a_row = 0
                totals.setdefault("train/grad_norm", []).append(grad_norm)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
        return {key: sum(values) / len(values) for key, values in totals.items()}

    def _clip_gradients(self) -> float:
        parameters = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))

    def _skip_bad_update(self, optimizer, ranks: list[int]) -> None:
        """Skip this update on every rank (``ranks``: where the loss or gradient was non-finite, the same
        list on every rank); raise, on every rank, after ``max_bad_steps`` in a row."""
        optimizer.zero_grad(set_to_none=True)
        self.bad_steps_in_a_row += 1
        self.log("train/skipped_nonfinite", float(self.bad_steps_in_a_row), on_step=True)
        where = f" on rank(s) {ranks}" if self.trainer.world_size > 1 else ""
        log.warning("non-finite loss or gradient%s: update skipped (%d in a row)", where, self.bad_steps_in_a_row)
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise RuntimeError(f"{self.bad_steps_in_a_row} consecutive non-finite updates{where} (max_bad_steps="
                               f"{self.max_bad_steps}); lower the learning rate or check the rewards")

    # ------------------------------------------------------------------ metrics
    def _sampling_metrics(self, groups: list[Group], rollout_seconds: float, step: int) -> dict:
        prompt_ids = [g.problem["id"] for g in groups]
        correct_counts = [int(g.correct.sum()) for g in groups]
        sums = step_sums(groups, *self.prompt_stats.forgetting_counts(prompt_ids, correct_counts))
        self.prompt_stats.update(step, prompt_ids, correct_counts, [len(g.completions) for g in groups])
        length_max = max(len(ids) for g in groups for ids in g.completion_ids)
        rollout_tokens = sums["length"]
        if self.trainer.world_size > 1:  # one all-reduce of the additive sums, one of the maximum
            keys = sorted(sums)
            reduced = self.trainer.strategy.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                                device=self.device), reduce_op="sum")
            sums = dict(zip(keys, reduced.tolist()))
            longest = torch.tensor(float(length_max), device=self.device)
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
            length_max = float(longest)
        metrics = step_metrics(sums, length_max)
        metrics["perf/rollout_tokens_per_s"] = rollout_tokens / max(rollout_seconds, 1e-9)  # this rank
        return metrics

    def on_train_start(self) -> None:
        super().on_train_start()
        if not self.rollout.is_async:
            self.engine.sync_weights(self.policy)  # an engine with its own weights starts from the loaded policy
            return
        from rloop_lightning.rollout.async_sampler import AsyncSampler

        self.sampler = AsyncSampler(self.rollout, self.engine, self.sampling, self.num_generations, self._request_seed)
        self.sampler.start(self.policy, self.rollout_step)
        self.sampler.draw_ahead(self.trainer.train_dataloader)

    def on_train_batch_end(self, outputs, batch, batch_index) -> None:
        if self.sampler is not None:
            self.sampler.push(self.policy, self.rollout_step)  # version = rollout batches trained on
        else:
            self.engine.sync_weights(self.policy)  # once per rollout batch, after all its optimizer steps

    def close_sampler(self) -> None:
        """Stop the asynchronous sampler process (if any) and its drawing of prompts ahead."""
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None

    def on_train_end(self) -> None:
        self.close_sampler()

    def configure_callbacks(self) -> list:
        return [CloseSamplerOnException()] if self.rollout.is_async else []

    def on_fit_end(self) -> None:
        self.close_sampler()
        if self.runner is not None:
            self.runner.close()
