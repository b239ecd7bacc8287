"""Groups of completions: one prompt, its G sampled completions and their rewards.

GRPO's unit of data. Sampling returns flat rollouts; scoring turns them into groups; dynamic
sampling keeps or drops whole groups; training flattens the kept groups again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from rloop_lightning.rewards.inputs import ChatFormat, TrainerState
from rloop_lightning.rewards.runner import RewardResult, RewardRunner
from rloop_lightning.rollout.base import Rollouts


@dataclass
class Group:
    """One prompt and its G completions."""

    problem: dict
    prompt_ids: list[int]  # [P]
    completion_ids: list[list[int]]  # [G][C_g]
    completions: list[str]  # [G]
    sampler_logprobs: list[list[float]]  # [G][C_g]
    truncated: list[bool]  # [G]
    rewards: Tensor  # [G] total (weighted) reward, including any overlong penalty
    correct: Tensor  # [G] bool, the verifier's verdict
    reward_columns: dict[str, list] = field(default_factory=dict)  # log_extra of the reward functions, [G] each
    policy_version: int = 0  # the policy that sampled them: rollout batches it had trained on


@dataclass
class ScoringStats:
    """Reward-function health over a phase: running counts, and steps in a row where every reward failed."""

    num_timeouts: int = 0
    num_errors: int = 0
    num_not_applicable: int = 0
    num_unscored: int = 0
    failed_steps_in_a_row: int = 0
    step_has_reward: bool = False
    step_failures: dict[str, str] = field(default_factory=dict)
    logged: dict[str, list[float]] = field(default_factory=dict)  # log_metric values of this step

    def add(self, result: RewardResult) -> None:
        self.num_timeouts += result.num_timeouts
        self.num_errors += result.num_errors
        self.num_not_applicable += result.num_not_applicable
        self.num_unscored += result.num_unscored
        self.step_has_reward |= not result.all_failed
        self.step_failures.update(result.failures)
        for name, value in result.metrics.items():
            self.logged.setdefault(name, []).append(value)

    def end_step(self, max_bad_steps: int, failed_ranks: Optional[Sequence[int]] = None) -> dict[str, float]:
        """This step's reward metrics; raise once every reward failed in ``max_bad_steps`` steps in a row.

        On several ranks, ``failed_ranks`` lists the ranks where every reward of this step failed (the
        same list on every rank, ``agreement.ranks_with``): the step counts as failed on every rank when
        it failed on any, so all ranks raise together."""
        failed = bool(failed_ranks) if failed_ranks is not None else not self.step_has_reward
        self.failed_steps_in_a_row = self.failed_steps_in_a_row + 1 if failed else 0
        failures, self.step_failures, self.step_has_reward = self.step_failures, {}, False
        if self.failed_steps_in_a_row >= max_bad_steps:
            where = f" on rank(s) {list(failed_ranks)}" if failed_ranks is not None else ""
            causes = "; ".join(f"reward function {name!r} {failure}" for name, failure in failures.items())
            raise RuntimeError(
                f"every reward of the last {self.failed_steps_in_a_row} steps failed{where} "
                f"(max_bad_steps={max_bad_steps}): " + (causes or "this rank's rewards did not fail; the "
                                                        "failing ranks' logs name the cause"))
        metrics = {"rewards/timeouts": float(self.num_timeouts), "rewards/errors": float(self.num_errors),
                   "rewards/not_applicable": float(self.num_not_applicable),
                   "rewards/unscored": float(self.num_unscored)}
        metrics.update({f"rewards/logged/{name}": sum(values) / len(values) for name, values in self.logged.items()})
        self.logged = {}
        return metrics


def trainer_state(trainer) -> TrainerState:
    """The ``trainer_state`` reward functions see, from a Lightning trainer."""
    return TrainerState(global_step=trainer.global_step, max_steps=trainer.max_steps, epoch=float(trainer.current_epoch))


def score_groups(problems: Sequence[dict], rollouts: Rollouts, num_generations: int, runner: RewardRunner,
                 correctness_function: Optional[str], correct_threshold: float,
                 stats: ScoringStats, chat: Optional[ChatFormat] = None,
                 state: Optional[TrainerState] = None) -> list[Group]:
    """Score flat rollouts (grouped prompt by prompt) and split them into one group per problem."""
    result = runner.score_problems(problems, rollouts.prompt_index, rollouts.completions, rollouts.completion_ids,
                                   chat, state)
    stats.add(result)
    if correctness_function is None:
        verdict = result.rewards
    else:
        verdict = torch.tensor([v if v is not None else 0.0 for v in result.per_function[correctness_function]])
    correct = verdict >= correct_threshold - 1e-6
    groups = []
    for index, problem in enumerate(problems):
        rows = slice(index * num_generations, (index + 1) * num_generations)
        groups.append(Group(
            problem=problem, prompt_ids=rollouts.prompt_ids[rows.start],
            completion_ids=rollouts.completion_ids[rows], completions=rollouts.completions[rows],
            sampler_logprobs=rollouts.sampler_logprobs[rows], truncated=rollouts.truncated[rows],
            rewards=result.rewards[rows].float(), correct=correct[rows],
            reward_columns={key: values[rows] for key, values in result.columns.items()},
        ))
    return groups


def flatten_groups(groups: Sequence[Group]) -> dict:
    """Flat per-completion lists and tensors of ``groups``, group by group."""
    return {
        "prompt_ids": [g.prompt_ids for g in groups for _ in g.completions],
        "completion_ids": [ids for g in groups for ids in g.completion_ids],
        "sampler_logprobs": [lp for g in groups for lp in g.sampler_logprobs],
        "truncated": torch.tensor([t for g in groups for t in g.truncated], dtype=torch.bool),  # [N]
        "rewards": torch.stack([g.rewards for g in groups]),  # [B, G]
        "correct": torch.stack([g.correct for g in groups]),  # [B, G]
    }


def trajectories(groups: Sequence[Group], step: int) -> list[dict]:
    """One record per completion: what harvesting and diagnostics consume."""
    records = []
    for group in groups:
        problem = group.problem
        for g, completion in enumerate(group.completions):
            records.append({
                "prompt_id": problem["id"], "prompt": problem["prompt"], "completion": completion,
                "answer": problem.get("answer"), "step": step, "policy_version": group.policy_version,
                "reward": float(group.rewards[g]),
                "correct": bool(group.correct[g]), "logprob": float(sum(group.sampler_logprobs[g])),
                "num_tokens": len(group.completion_ids[g]), "truncated": bool(group.truncated[g]),
                "reward_columns": {key: values[g] for key, values in group.reward_columns.items()},
            })
    return records
