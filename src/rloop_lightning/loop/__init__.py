"""The RLoop loop: controller, phases, run-directory layout, expert-set builder, manifest and report."""

from rloop_lightning.loop.controller import BasePolicySettings, RLoop
from rloop_lightning.loop.expert_set import ExpertSetSettings, build_expert_set
from rloop_lightning.loop.layout import RunLayout
from rloop_lightning.loop.phases import PhaseSettings

__all__ = ["BasePolicySettings", "ExpertSetSettings", "PhaseSettings", "RLoop", "RunLayout", "build_expert_set"]
