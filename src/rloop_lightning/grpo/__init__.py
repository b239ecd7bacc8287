"""The GRPO exploration phase: group sampling, scoring and the policy-gradient update."""

from rloop_lightning.grpo.module import GRPOModule, LossSettings, OverlongSettings

__all__ = ["GRPOModule", "LossSettings", "OverlongSettings"]
