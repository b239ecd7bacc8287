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

from rloop_lightning.algorithms.metrics import avg_at_n, mean_pass_at_k
from rloop_lightning.policy import Policy
from rloop_lightning.rewards.inputs import chat_format
from rloop_lightning.rewards.runner import RewardRunner
from rloop_lightning.rollout.base import RolloutEngine, SamplingParams
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.tasks.base import Task


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
        split: ``test`` (in-distribution) or ``ood``.
        num_samples: n samples per problem (pass@k needs k <= n).
        ks: the k of pass@k to report.
        sampling: sampling parameters for the n samples.
        limit: evaluate the first ``limit`` problems only.
        greedy: also report greedy-decoding accuracy.
        reward_workers: worker processes for verification (0 = in-process).
        reward_timeout: per-completion verification timeout in seconds.
        correct_threshold: reward at or above which a completion is correct.
    """

    def __init__(self, task: Task, split: str = "test", num_samples: int = 16,
                 ks: Sequence[int] = (1, 4, 16), sampling: Optional[SamplingParams] = None,
                 limit: Optional[int] = None, greedy: bool = True, reward_workers: int = 0,
                 reward_timeout: float = 10.0, correct_threshold: float = 1.0):
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

    def _correct_counts(self, policy: Policy, engine: RolloutEngine, samples: int,
                        sampling: SamplingParams) -> list[int]:
        problems = self.problems
        rollouts = engine.generate(policy, [p["prompt"] for p in problems], samples, sampling)
        rewards = self.runner.score_problems(problems, rollouts.prompt_index, rollouts.completions,
                                             rollouts.completion_ids, chat_format(policy)).rewards
        counts = [0] * len(problems)
        for index, reward in zip(rollouts.prompt_index, rewards.tolist()):
            counts[index] += reward >= self.correct_threshold - 1e-6
        return counts

    def evaluate(self, policy: Policy, engine: RolloutEngine) -> EvaluationResult:
        n = self.num_samples
        counts = self._correct_counts(policy, engine, n, self.sampling)
        metrics = {f"avg@{n}": avg_at_n(counts, n)}
        metrics.update({f"pass@{k}": mean_pass_at_k(counts, n, k) for k in self.ks})
        if self.greedy:
            greedy = SamplingParams(temperature=0.0, max_new_tokens=self.sampling.max_new_tokens)
            metrics["greedy_accuracy"] = avg_at_n(self._correct_counts(policy, engine, 1, greedy), 1)
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
    """
    policy.load_model()
    engine = engine or HFGenerateEngine()
    engine.load_policy(policy)
    metrics = {}
    for evaluator in evaluators:
        torch.manual_seed(seed)
        try:
            result = evaluator.evaluate(policy, engine)
        finally:
            evaluator.close()
        metrics[f"{result.task}/{result.split}"] = result.metrics
    return metrics
