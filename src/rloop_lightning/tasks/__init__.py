"""Tasks: verifiable problems in train/test/ood splits, each with its reward next to its data.

Synthetic (generated from a seed, with solvers for demonstrations): ``Countdown``,
``MultiStepArithmetic``. Real data (hub id or local jsonl/parquet): ``GSM8K``, ``MATH``, ``DAPOMath``.
"""

from rloop_lightning.tasks.arithmetic import MultiStepArithmetic
from rloop_lightning.tasks.base import RewardFunction, Split, Task
from rloop_lightning.tasks.countdown import Countdown
from rloop_lightning.tasks.hub import GSM8K, MATH, DAPOMath, MathDatasetTask

__all__ = [
    "GSM8K",
    "MATH",
    "Countdown",
    "DAPOMath",
    "MathDatasetTask",
    "MultiStepArithmetic",
    "RewardFunction",
    "Split",
    "Task",
]
