"""Lightning callbacks: policy export, expert harvesting, periodic pass@k evaluation, metrics recording,
mid-phase checkpoints."""

from rloop_lightning.callbacks.export import ExportPolicy
from rloop_lightning.callbacks.checkpoint import PhaseCheckpoint
from rloop_lightning.callbacks.harvest import ExpertHarvester
from rloop_lightning.callbacks.pass_at_k import PassAtKEvaluation
from rloop_lightning.callbacks.recorder import MetricsRecorder

__all__ = ["ExpertHarvester", "ExportPolicy", "MetricsRecorder", "PassAtKEvaluation", "PhaseCheckpoint"]
