"""Expert harvesting: keep every verified-correct trajectory of every RL step on disk.

RLoop's *explore* step. ``GRPOModule.training_step`` returns all trajectories of the step; this
callback appends the correct ones to ``{dirpath}/rank{R}/step{S}.jsonl`` (one file per rank and
rollout step, written atomically, so a crash never leaves a partial record and DDP ranks never
share a file) and keeps per-prompt solve statistics in ``{dirpath}/prompt_stats.rank{R}.json``.

A phase resumed from a mid-phase checkpoint (``PhaseCheckpoint``) keeps the shards of the steps
before the checkpoint's rollout step as they are and deletes this rank's later ones, which the
resumed phase writes again; the statistics file goes back to the checkpoint's. Temporary files that a
process killed mid-write left behind are removed when the phase starts again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L

from rloop_lightning.records import remove_temporaries, write_json_atomic, write_jsonl_atomic

EXPERT_FIELDS = ("prompt_id", "prompt", "completion", "answer", "step", "policy_version", "reward", "logprob",
                 "num_tokens")


class ExpertHarvester(L.Callback):
    """Store the correct trajectories of every step and the per-prompt solve statistics.

    Args:
        dirpath: where shards go; default ``{trainer.default_root_dir}/experts``.
        keep_truncated: also keep correct completions that hit ``max_new_tokens``.
    """

    def __init__(self, dirpath: Optional[str] = None, keep_truncated: bool = False):
        self.dirpath = dirpath
        self.keep_truncated = keep_truncated
        self.num_harvested = 0
        self.num_seen = 0

    def root(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "experts"

    def rank_dir(self, trainer: L.Trainer) -> Path:
        return self.root(trainer) / f"rank{trainer.global_rank:02d}"

    def stats_path(self, trainer: L.Trainer) -> Path:
        return self.root(trainer) / f"prompt_stats.rank{trainer.global_rank:02d}.json"

    def on_train_start(self, trainer, pl_module) -> None:
        # this rank alone writes its shards and statistics file: any temporary of them is a killed write's
        remove_temporaries(self.rank_dir(trainer), "step*.jsonl")
        remove_temporaries(self.root(trainer), self.stats_path(trainer).name)
        if trainer.ckpt_path is None:
            return
        resumed_at = pl_module.rollout_step  # the next rollout step; shards of earlier steps stay
        for shard in self.rank_dir(trainer).glob("step*.jsonl"):
            if int(shard.stem[len("step"):]) >= resumed_at:
                shard.unlink()
        self.write_prompt_stats(trainer, pl_module)

    def write_prompt_stats(self, trainer, pl_module) -> None:
        write_json_atomic(self.stats_path(trainer), pl_module.prompt_stats.to_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        records = (outputs or {}).get("trajectories", [])
        if not records:
            return
        self.num_seen += len(records)
        experts = [{key: r[key] for key in EXPERT_FIELDS} for r in records
                   if r["correct"] and (self.keep_truncated or not r["truncated"])]
        rank_dir = self.rank_dir(trainer)
        if experts:
            self.num_harvested += write_jsonl_atomic(rank_dir / f"step{records[0]['step']:07d}.jsonl", experts)
        rank_dir.mkdir(parents=True, exist_ok=True)
        self.write_prompt_stats(trainer, pl_module)
