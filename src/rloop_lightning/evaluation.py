"""Held-out evaluation: avg@n, pass@k (unbiased, Chen et al. 2021) and greedy accuracy on a task split.

A completion counts as correct when the task's verifier scores it >= ``correct_threshold``.
``evaluate_policy`` is the one held-out evaluation of a policy, used by ``rloop eval``, the loop and
the scripts, with one seeding rule, so they report the same numbers for the same policy.
pass@k is averaged over problems from each problem's n samples and c correct ones:
    pass@k = 1 - C(n - c, k) / C(n, k),     avg@n = c / n.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from rloop_lightning.algorithms.metrics import avg_at_n, mean_pass_at_k
from rloop_lightning.policy import Policy
from rloop_lightning.rewards.inputs import chat_format
from rloop_lightning.rewards.runner import RewardRunner
from rloop_lightning.rollout.base import RolloutEngine, SamplingParams
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.tasks.base import Task


Shard = tuple[int, int]  # (rank, world_size)
SCORING_SLICE = 1024  # completions per verification call (whole problems; one problem's samples at least)


@dataclass
class EvaluationResult:
    task: str
    split: str
    num_samples: int
    problem_ids: list[str]
    correct_counts: list[int]  # per problem, out of num_samples
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def solved(self) -> set[str]:
        return {pid for pid, c in zip(self.problem_ids, self.correct_counts) if c > 0}


class Evaluator:
    """Scores a policy on a task split.

    Args:
        task: the task whose split is evaluated.
        split: ``test`` (in-distribution), ``ood``, or ``validation`` (for choosing settings; see
            ``tasks.base.GeneratedTask``).
        num_samples: n samples per problem (pass@k needs k <= n).
        ks: the k of pass@k to report.
        sampling: sampling parameters for the n samples.
        limit: evaluate the first ``limit`` problems only.
        greedy: also report greedy-decoding accuracy.
        reward_workers: worker processes for verification (0 = in-process).
        reward_timeout: seconds one verification call may take, on one slice of at most ``SCORING_SLICE``
            completions (whole problems); a call that runs out is retried completion by completion.
        correct_threshold: reward at or above which a completion is correct.
    """

    def __init__(self, task: Task, split: str = "test", num_samples: int = 16,
                 ks: Sequence[int] = (1, 4, 16), sampling: Optional[SamplingParams] = None,
                 limit: Optional[int] = None, greedy: bool = True, reward_workers: int = 0,
                 reward_timeout: float = 10.0, correct_threshold: float = 1.0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or null (every problem), got {limit}")
        if any(k > num_samples or k < 1 for k in ks):
            raise ValueError(f"pass@k needs 1 <= k <= num_samples={num_samples}; got ks={list(ks)}")
        self.task = task
        self.split = split
        self.num_samples = num_samples
        self.ks = list(ks)
        self.sampling = sampling or SamplingParams()
        self.limit = limit
        self.greedy = greedy
        self.correct_threshold = correct_threshold
        self.runner = RewardRunner([task.reward], num_workers=reward_workers, timeout=reward_timeout)
        self._problems: Optional[list[dict]] = None

    @property
    def problems(self) -> list[dict]:
        if self._problems is None:
            problems = self.task.load(self.split)
            if not problems:
                raise ValueError(f"task {self.task.name!r} split {self.split!r} is empty")
            self._problems = problems[: self.limit] if self.limit else problems
        return self._problems

    def check_ranks(self, ranks: int) -> None:
        """Refuse a split with fewer problems than ``ranks``: a rank would have nothing to evaluate."""
        if len(self.problems) < ranks:
            raise ValueError(f"evaluator {self.task.name}/{self.split} has {len(self.problems)} problems "
                             f"(limit={self.limit}) for {ranks} ranks: every rank needs one; raise the "
                             f"evaluator's limit or run on fewer processes")

    def _correct_counts(self, policy: Policy, engine: RolloutEngine, samples: int,
                        sampling: SamplingParams, shard: Shard) -> list[int]:
        """Correct samples per problem. With ``shard=(rank, world_size)`` this process samples problems
        ``rank, rank + world_size, ...`` and the counts of every rank are gathered."""
        rank, world_size = shard
        indices = list(range(rank, len(self.problems), world_size))
        problems = [self.problems[i] for i in indices]
        counts = [0] * len(problems)
        if problems:
            rollouts = engine.generate(policy, [p["prompt"] for p in problems], samples, sampling)
            for index, reward in zip(rollouts.prompt_index, self._rewards(problems, rollouts, samples, policy)):
                counts[index] += reward >= self.correct_threshold - 1e-6
        if world_size == 1:
            return counts
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (indices, counts))
        total = [0] * len(self.problems)
        for shard_indices, shard_counts in gathered:
            for index, count in zip(shard_indices, shard_counts):
                total[index] = count
        return total

    def _rewards(self, problems: list[dict], rollouts, samples: int, policy: Policy) -> list[float]:
        """Each completion's reward, scored a slice of whole problems at a time (at most
        ``SCORING_SLICE`` completions, or one problem's ``samples``), so ``reward_timeout`` bounds one
        call on a slice, never one call on the whole split."""
        per_slice = max(1, SCORING_SLICE // samples)
        rewards = [0.0] * len(rollouts.completions)
        for start in range(0, len(problems), per_slice):
            rows = [row for row, index in enumerate(rollouts.prompt_index) if start <= index < start + per_slice]
            result = self.runner.score_problems(
                problems[start: start + per_slice], [rollouts.prompt_index[row] - start for row in rows],
                [rollouts.completions[row] for row in rows], [rollouts.completion_ids[row] for row in rows],
                chat_format(policy))
            for row, reward in zip(rows, result.rewards.tolist()):
                rewards[row] = reward
        return rewards

    def check(self, policy: Policy, engine: RolloutEngine) -> None:
        """Before any weights load: every prompt leaves room for ``max_new_tokens`` in the model's context, and
        the task's reward accepts the completions as the policy will pass them (strings or chat messages)."""
        problems = self.problems
        engine.check_prompt_lengths(policy, policy.encode_prompts([p["prompt"] for p in problems]), self.sampling,
                                    policy.context_length, [p["id"] for p in problems])
        self.runner.check_problems(problems, chat_format(policy))

    def evaluate(self, policy: Policy, engine: RolloutEngine, shard: Shard = (0, 1)) -> EvaluationResult:
        """avg@n, pass@k and greedy accuracy over the split; ``shard=(rank, world_size)`` splits the problems
        over the processes of a torch.distributed group (every rank gets the whole result)."""
        n = self.num_samples
        counts = self._correct_counts(policy, engine, n, self.sampling, shard)
        metrics = {f"avg@{n}": avg_at_n(counts, n)}
        metrics.update({f"pass@{k}": mean_pass_at_k(counts, n, k) for k in self.ks})
        if self.greedy:
            greedy = SamplingParams(temperature=0.0, max_new_tokens=self.sampling.max_new_tokens)
            metrics["greedy_accuracy"] = avg_at_n(self._correct_counts(policy, engine, 1, greedy, shard), 1)
        return EvaluationResult(self.task.name, self.split, n, [p["id"] for p in self.problems], counts, metrics)

    def close(self) -> None:
        self.runner.close()


def evaluate_policy(policy: Policy, evaluators: Sequence[Evaluator], engine: Optional[RolloutEngine] = None,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Metrics of ``policy`` on each evaluator's split, keyed ``"{task}/{split}"``.

    Seeding: torch's generator is seeded with ``seed`` before *each* evaluator, so one evaluator's
    numbers depend only on (policy, evaluator, seed), not on which evaluators ran before it, and two
    policies evaluated with one seed see the same sampling noise. The engine is told that a new policy
    is coming (``RolloutEngine.load_policy``): an engine holding its own weights loads this policy's.
    Each evaluator's verification workers are shut down afterwards.

    Called on every rank of a torch.distributed group, the problems are split over the ranks (each
    samples its share, seeded alike) and every rank returns the whole result; one process samples all.
    """
    shard = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    for evaluator in evaluators:  # before the model loads
        evaluator.check_ranks(shard[1])
    engine = engine or HFGenerateEngine()
    try:
        for evaluator in evaluators:  # bad input fails here, before the weights load
            evaluator.check(policy, engine)
    except Exception:
        for evaluator in evaluators:
            evaluator.close()  # the check may have started verification workers
        raise
    policy.load_model()
    engine.load_policy(policy)
    metrics = {}
    for evaluator in evaluators:
        torch.manual_seed(seed)
        try:
            result = evaluator.evaluate(policy, engine, shard)
        finally:
            evaluator.close()
        metrics[f"{result.task}/{result.split}"] = result.metrics
    return metrics
