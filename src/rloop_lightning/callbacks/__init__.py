"""Lightning callbacks: policy export, expert harvesting and periodic pass@k evaluation."""

from rloop_lightning.callbacks.evaluation import PassAtKEvaluation
from rloop_lightning.callbacks.export import ExportPolicy
from rloop_lightning.callbacks.harvest import ExpertHarvester

__all__ = ["ExpertHarvester", "ExportPolicy", "PassAtKEvaluation"]
