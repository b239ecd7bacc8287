"""Every path of an RLoop run directory, in one place.

    run_dir/
      manifest.json                   the configuration and the completed phases (resume state)
      eval/theta_0/eval.json          held-out evaluation of theta_0
      iter_KK/grpo/                   GRPO phase: metrics.jsonl, policy/, experts/ (harvest shards,
                                      per-rank prompt statistics), checkpoints/ (while it runs),
                                      curve.jsonl (with curve_every_n_steps: held-out metrics every N steps)
      iter_KK/eval_rl_end/eval.json   (optional) evaluation of the GRPO end point
      iter_KK/expert_set/             experts.jsonl, summary.json
      iter_KK/rft/                    RFT phase: metrics.jsonl, policy/
      iter_KK/eval/eval.json          evaluation of theta_{KK+1} (plain-RL runs: of the GRPO end point)
      final.json                      the policy the loop hands over (``output``) and its metrics
      report.md, report.png

A *phase* is named by its directory relative to the run directory (``iter_00/grpo``); the manifest
records completed phases by that name. The controller, the report, tracking and the scripts ask this
object for paths rather than spelling them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

IterationPhase = Literal["grpo", "eval_rl_end", "expert_set", "rft", "eval"]
BASE_EVALUATION = "eval/theta_0"
POLICY = "policy"
"""A training phase's exported policy, relative to its directory."""
HARVEST = "experts"
"""A GRPO phase's harvested trajectories and prompt statistics, relative to its directory."""
READ_LATER: dict[str, tuple[str, ...]] = {"grpo": (POLICY, HARVEST), "rft": (POLICY,)}
"""What later phases read of a training phase's directory (by the phase's kind); the rest of it is logs
(``metrics.jsonl``, ``config.yaml``, ``lightning_logs/``, a logger's files) and mid-phase checkpoints."""
_ITERATION = re.compile(r"iter_(\d+)")


class RunLayout:
    """The paths of the run directory ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ phases
    @staticmethod
    def phase(kind: IterationPhase, k: int) -> str:
        """The name of iteration ``k``'s phase ``kind``, e.g. ``iter_00/grpo``."""
        return f"iter_{k:02d}/{kind}"

    @staticmethod
    def iteration_of(phase: str) -> Optional[int]:
        """``k`` of a phase named ``iter_KK/...``; None for phases outside the iterations."""
        match = _ITERATION.match(phase)
        return int(match.group(1)) if match else None

    def directory(self, phase: str) -> Path:
        return self.root / phase

    @staticmethod
    def read_later(phase: str) -> Optional[tuple[str, ...]]:
        """The parts of ``phase``'s directory (top-level names) that later phases read, or None for all of
        it but ``checkpoints/`` (an expert set, an evaluation)."""
        return READ_LATER.get(phase.rsplit("/", 1)[-1])

    def iterations(self) -> list[int]:
        """The iterations that have a directory, in order."""
        found = (self.iteration_of(path.name) for path in self.root.glob("iter_*") if path.is_dir())
        return sorted(k for k in found if k is not None)

    # ------------------------------------------------------------------ files
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report_markdown(self) -> Path:
        return self.root / "report.md"

    @property
    def report_image(self) -> Path:
        return self.root / "report.png"

    def evaluation(self, phase: str) -> Path:
        """The ``eval.json`` of an evaluation phase (``BASE_EVALUATION``, ``iter_KK/eval``, ...)."""
        return self.directory(phase) / "eval.json"

    def policy(self, phase: str) -> Path:
        """The exported policy of a training phase (``iter_KK/grpo`` or ``iter_KK/rft``)."""
        return self.directory(phase) / POLICY

    def metrics(self, phase: str) -> Path:
        """The per-step metrics of a training phase."""
        return self.directory(phase) / "metrics.jsonl"

    def curve(self, phase: str) -> Path:
        """The held-out evaluations every N RL steps of a GRPO phase (``curve_every_n_steps``)."""
        return self.directory(phase) / "curve.jsonl"

    @property
    def final(self) -> Path:
        """The policy the loop hands over (its ``output`` setting) and that policy's held-out metrics."""
        return self.root / "final.json"

    def checkpoints(self, phase: str) -> Path:
        """The mid-phase checkpoints of a training phase (resume state; deleted when the phase completes)."""
        return self.directory(phase) / "checkpoints"

    def harvest(self, k: int) -> Path:
        """Where iteration ``k``'s GRPO phase harvests trajectories and prompt statistics."""
        return self.directory(self.phase("grpo", k)) / HARVEST

    def harvest_shards(self, k: int) -> list[Path]:
        return sorted(self.harvest(k).glob("rank*/*.jsonl"))

    def prompt_stats(self, k: int) -> list[Path]:
        return sorted(self.harvest(k).glob("prompt_stats.rank*.json"))

    def expert_set(self, k: int) -> Path:
        return self.directory(self.phase("expert_set", k)) / "experts.jsonl"

    def expert_set_summary(self, k: int) -> Path:
        return self.directory(self.phase("expert_set", k)) / "summary.json"
