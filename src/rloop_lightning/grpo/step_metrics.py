"""Per-step sampling metrics of GRPO, reduced correctly across DDP ranks.

Each rank turns its groups into additive sums (``step_sums``); the sums are all-reduced once, and
``step_metrics`` turns the global sums into means and rates. Averaging per-rank means instead
would weigh ranks, not completions, and a rate whose denominator is 0 on one rank would be lost.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rloop_lightning.algorithms import distinct_count, ngram_similarity, zero_variance_groups
from rloop_lightning.grpo.groups import Group


def step_sums(groups: Sequence[Group], forgotten: int, previously_solved: int) -> dict[str, float]:
    rewards = torch.stack([g.rewards for g in groups]).double()  # [B, G]
    correct = torch.stack([g.correct for g in groups])  # [B, G]
    lengths = [len(ids) for g in groups for ids in g.completion_ids]
    sums = {
        "completions": float(rewards.numel()), "reward": float(rewards.sum()),
        "reward_squared": float((rewards ** 2).sum()), "correct": float(correct.sum()),
        "groups": float(len(groups)), "zero_variance_groups": float(zero_variance_groups(rewards).sum()),
        "length": float(sum(lengths)), "truncated": float(sum(t for g in groups for t in g.truncated)),
        "forgotten": float(forgotten), "previously_solved": float(previously_solved),
        "distinct_correct": 0.0, "prompts_with_correct": 0.0, "similarity": 0.0, "prompts_with_pairs": 0.0,
    }
    for group in groups:
        solutions = [c.strip() for c, ok in zip(group.completions, group.correct.tolist()) if ok]
        if solutions:
            sums["distinct_correct"] += distinct_count(solutions)
            sums["prompts_with_correct"] += 1
        if len(solutions) >= 2:
            sums["similarity"] += ngram_similarity(solutions)
            sums["prompts_with_pairs"] += 1
    return sums


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def step_metrics(sums: dict[str, float], length_max: float) -> dict[str, float]:
    n = sums["completions"]
    mean = sums["reward"] / n
    variance = max(sums["reward_squared"] / n - mean ** 2, 0.0)
    metrics = {
        "train/reward_mean": mean, "train/reward_std": variance ** 0.5,
        "train/accuracy": sums["correct"] / n,
        "train/zero_variance_share": sums["zero_variance_groups"] / sums["groups"],
        "train/completion_length_mean": sums["length"] / n, "train/completion_length_max": length_max,
        "train/clipped_share": sums["truncated"] / n,
        "rloop/distinct_correct_per_prompt": _ratio(sums["distinct_correct"], sums["prompts_with_correct"]),
        "rloop/correct_ngram_similarity": _ratio(sums["similarity"], sums["prompts_with_pairs"]),
    }
    if sums["previously_solved"]:
        metrics["rloop/forgetting_rate"] = sums["forgotten"] / sums["previously_solved"]
    return metrics
