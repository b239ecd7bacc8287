"""Reward functions with TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``,
and the runner that scores batches with them in worker processes under a timeout."""

from rloop_lightning.rewards.format import boxed_format, think_answer_format
from rloop_lightning.rewards.math import math_accuracy
from rloop_lightning.rewards.runner import (
    RewardFunction,
    RewardResult,
    RewardRunner,
    RewardTimeout,
    check_reward_output,
)

__all__ = [
    "RewardFunction",
    "RewardResult",
    "RewardRunner",
    "RewardTimeout",
    "boxed_format",
    "check_reward_output",
    "math_accuracy",
    "think_answer_format",
]
