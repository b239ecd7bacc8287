"""Groups of completions: one prompt, its G sampled completions and their rewards.

GRPO's unit of data. Sampling returns flat rollouts; scoring turns them into groups; dynamic
sampling keeps or drops whole groups; training flattens the kept groups again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from rloop_lightning.rewards.runner import RewardRunner
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


@dataclass
class ScoringStats:
    num_timeouts: int = 0
    num_errors: int = 0


def score_groups(problems: Sequence[dict], rollouts: Rollouts, num_generations: int, runner: RewardRunner,
                 correctness_function: Optional[str], correct_threshold: float,
                 stats: ScoringStats) -> list[Group]:
    """Score flat rollouts (grouped prompt by prompt) and split them into one group per problem."""
    result = runner.score_problems(problems, rollouts.prompt_index, rollouts.completions)
    stats.num_timeouts += result.num_timeouts
    stats.num_errors += result.num_errors
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
        ))
    return groups


def flatten(groups: Sequence[Group]) -> dict:
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
                "answer": problem.get("answer"), "step": step, "reward": float(group.rewards[g]),
                "correct": bool(group.correct[g]), "logprob": float(sum(group.sampler_logprobs[g])),
                "num_tokens": len(group.completion_ids[g]), "truncated": bool(group.truncated[g]),
            })
    return records
