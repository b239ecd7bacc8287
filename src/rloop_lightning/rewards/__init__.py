"""Reward functions with TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``,
and the runner that scores batches with them in worker processes under a timeout."""

from rloop_lightning.rewards.calls import RewardFunctionExit
from rloop_lightning.rewards.format import boxed_format, think_answer_format
from rloop_lightning.rewards.inputs import ChatFormat, RewardBatch, TrainerState, chat_format, completion_text
from rloop_lightning.rewards.math import math_accuracy
from rloop_lightning.rewards.runner import (
    RewardFunction,
    RewardFunctionError,
    RewardResult,
    RewardRunner,
    RewardTimeout,
    check_reward_output,
)

__all__ = [
    "ChatFormat",
    "RewardBatch",
    "RewardFunction",
    "RewardFunctionError",
    "RewardFunctionExit",
    "RewardResult",
    "RewardRunner",
    "RewardTimeout",
    "TrainerState",
    "boxed_format",
    "chat_format",
    "check_reward_output",
    "completion_text",
    "math_accuracy",
    "think_answer_format",
]
