"""The RLoop loop: controller, expert-set builder, run manifest and report."""

from rloop_lightning.loop.controller import BaseConfig, PhaseConfig, RLoop
from rloop_lightning.loop.expert_set import ExpertSetSettings, build_expert_set

__all__ = ["BaseConfig", "ExpertSetSettings", "PhaseConfig", "RLoop", "build_expert_set"]
