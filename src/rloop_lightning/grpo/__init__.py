"""The GRPO exploration phase: group sampling, scoring and the policy-gradient update."""

from rloop_lightning.grpo.module import GRPOModule, ImportanceSettings, LossSettings, OverlongSettings

__all__ = ["GRPOModule", "ImportanceSettings", "LossSettings", "OverlongSettings"]
