"""LightningDataModules that feed (prompt, completion) records to the RFT phase.

- ``ExpertDataModule`` serves verified expert trajectories from jsonl/parquet shards, split across
  DDP ranks by a ``DistributedSampler`` that gives every rank the same number of batches and a fresh
  shuffle each epoch.
- ``DemonstrationDataModule`` serves a built-in task's solver demonstrations (the tiny base warm-up).

A record whose completion is empty (or whitespace only) teaches nothing but to end the answer at once:
such records are left out with a warning naming them, and a file of nothing else is refused.

Batches are lists of record dicts; the LightningModule tokenises them with its policy, so the data
side needs no tokenizer and one tokenizer setting has one home.
"""

from __future__ import annotations

import logging
import random
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rloop_lightning.data.resumable import ResumableDataLoader

from rloop_lightning.records import expand_paths, iter_located_records
from rloop_lightning.tasks.base import Split, Task

log = logging.getLogger(__name__)

RECORD_FIELDS = ("prompt", "completion")
SHOWN_EMPTY = 5  # empty records named in the warning


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def collate_records(records: list[dict]) -> list[dict]:
    return records


def _ranks(trainer: Optional[L.Trainer]) -> tuple[int, int]:
    """(rank, number of ranks) of this process: the trainer's, else torch.distributed's, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def without_empty_completions(located: list[tuple[str, dict]], files: list[str]) -> list[dict]:
    """The records of ``located`` (``(where, record)`` pairs) whose completion has text; the others are
    left out with a warning naming them (file and line or row). Every completion empty: ``ValueError``
    naming the files (a training target of nothing but the end token would teach the policy to stop at once)."""
    empty = [where for where, record in located if not record["completion"].strip()]
    if len(empty) == len(located):
        raise ValueError(f"every one of the {len(located)} records in {files} has an empty completion (\"\" or "
                         "whitespace only): nothing to train on (RFT would teach the policy to end its answer at once)")
    if empty:
        shown = "; ".join(empty[:SHOWN_EMPTY]) + (f"; and {len(empty) - SHOWN_EMPTY} more" if len(empty) > SHOWN_EMPTY
                                                  else "")
        log.warning("%d of %d records have an empty completion (\"\" or whitespace only) and are left out of "
                    "training: %s", len(empty), len(located), shown)
    return [record for _, record in located if record["completion"].strip()]


class RecordDataset(Dataset):
    """Records held in memory (map-style, so a sampler can split and shuffle them)."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]


class ExpertDataModule(L.LightningDataModule):
    """(prompt, completion) records from jsonl/parquet shards (files, directories or globs).

    All records are read at ``setup`` (an expert set is a few hundred MB of text at most; a bad
    record fails there, naming file and line) and served through a ``DistributedSampler``, built
    here even on one process, so that:

    - every rank gets the same number of records, ``ceil(N / ranks)``, hence the same number of
      batches: with N not divisible by the number of ranks, up to ``ranks - 1`` records of the
      epoch's shuffled order are repeated (padding). Padding rather than dropping because expert
      records are the expensive, verified signal of the loop: dropping would lose up to
      ``ranks - 1`` of them every epoch (always absent when not shuffling), while padding shows
      those few records twice;
    - the order is a fresh shuffle each epoch, driven by Lightning, which calls the sampler's
      ``set_epoch`` at every epoch start; the order depends only on ``seed`` and the epoch.

    Args:
        paths: shard files, directories or glob patterns.
        batch_size: records per training step (per rank).
        shuffle: a new record order every epoch; False keeps file order (then rank r of k takes
            records r, r + k, ...).
        num_workers: dataloader worker processes.
        seed: shuffling seed.
    """

    def __init__(self, paths: list[str], batch_size: int = 32, shuffle: bool = True,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        check_batch_size(batch_size)
        self.paths = paths
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.dataset: Optional[RecordDataset] = None

    def setup(self, stage: str) -> None:
        files = expand_paths(self.paths)
        located = list(iter_located_records(files, RECORD_FIELDS, text=RECORD_FIELDS))
        if not located:
            raise ValueError(f"no expert records in {self.paths}: nothing to train on")
        records = without_empty_completions(located, [str(file) for file in files])
        _, ranks = _ranks(self.trainer)
        if len(records) < ranks:
            raise ValueError(f"{len(records)} expert records in {self.paths} cannot give each of {ranks} ranks "
                             f"one record; train on fewer devices or harvest more experts")
        self.dataset = RecordDataset(records)

    def train_dataloader(self) -> DataLoader:
        rank, ranks = _ranks(self.trainer)
        sampler = DistributedSampler(self.dataset, num_replicas=ranks, rank=rank, shuffle=self.shuffle,
                                     seed=self.seed, drop_last=False)
        return ResumableDataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                                   collate_fn=collate_records, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)


class DemonstrationDataset(Dataset):
    """A task's problems paired with solver demonstrations; each visit of a problem draws anew,
    so a problem with many solutions is shown several of them over the epochs."""

    def __init__(self, task: Task, problems: list[dict], vary: bool = True):
        self.task = task
        self.problems = problems
        self.vary = vary
        self.visits = [0] * len(problems)

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> dict:
        problem = self.problems[index]
        completion = self.task.demonstration(problem, draw=self.visits[index])
        self.visits[index] += self.vary
        return {"prompt": problem["prompt"], "completion": completion, "id": problem["id"]}


class DemonstrationDataModule(L.LightningDataModule):
    """Solver demonstrations of a built-in task: the warm-up data of the tiny base policy.

    Args:
        task: a task with a solver (``Countdown``, ``MultiStepArithmetic``).
        split: which split's problems to demonstrate.
        batch_size: records per training step (per rank).
        num_workers: dataloader worker processes.
        vary_demonstrations: show a new solution on each visit of a problem (a broad base); False
            always shows the same one per problem (a narrow base).
    """

    def __init__(self, task: Task, split: Split = "train", batch_size: int = 64, num_workers: int = 0,
                 vary_demonstrations: bool = True):
        super().__init__()
        check_batch_size(batch_size)
        self.vary_demonstrations = vary_demonstrations
        self.task = task
        self.split = split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataset: Optional[DemonstrationDataset] = None

    def setup(self, stage: str) -> None:
        problems = self.task.load(self.split)
        if not problems:
            raise ValueError(f"task {self.task.name!r} split {self.split!r} is empty: nothing to train on")
        self.dataset = DemonstrationDataset(self.task, problems, self.vary_demonstrations)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, collate_fn=collate_records,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class ProblemDataset(Dataset):
    def __init__(self, problems: list[dict]):
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> dict:
        return self.problems[index]


class PromptDataModule(L.LightningDataModule):
    """Problems of a task split, ``batch_size`` prompts per RL step (per rank).

    Under DDP, Lightning's distributed sampler gives each rank its own prompts, so the groups of
    completions a rank samples never straddle ranks.

    Args:
        task: the task whose problems are prompts; its ``reward`` is the GRPO default reward.
        split: the split to train on.
        batch_size: prompts per step per rank (each gets ``num_generations`` completions).
        limit: use only the first ``limit`` problems (a small prompt pool revisits prompts, which
            the forgetting metric needs).
        seed: seed of the refill draws of dynamic sampling.
    """

    def __init__(self, task: Task, split: Split = "train", batch_size: int = 16, limit: Optional[int] = None,
                 seed: int = 0):
        super().__init__()
        check_batch_size(batch_size)
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or null (every problem), got {limit}")
        self.task = task
        self.split = split
        self.batch_size = batch_size
        self.limit = limit
        self.seed = seed
        self.problems: list[dict] = []
        self._refill_rng = random.Random(seed)

    def setup(self, stage: str) -> None:
        problems = self.task.load(self.split)
        self.problems = problems[: self.limit] if self.limit else problems
        if not self.problems:
            raise ValueError(f"task {self.task.name!r} split {self.split!r} is empty: nothing to train on")
        rank, ranks = _ranks(self.trainer)
        self._refill_rng = random.Random(self.seed * 7919 + rank)  # each rank refills differently
        if stage == "fit":
            self.check_ranks(ranks)

    def check_ranks(self, ranks: int) -> None:
        """Refuse problems too few for every one of ``ranks`` ranks to get a batch of prompts (each
        rank takes its own ``len(problems) // ranks``, and drops an incomplete last batch)."""
        if len(self.problems) // ranks < self.batch_size:
            on = f" on each of {ranks} ranks" if ranks > 1 else ""
            raise ValueError(f"{len(self.problems)} problems of task {self.task.name!r} split {self.split!r} "
                             f"(limit={self.limit}) cannot fill a batch of {self.batch_size} prompts{on}: raise "
                             f"data.limit, lower data.batch_size or run on fewer processes")

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(ProblemDataset(self.problems), batch_size=self.batch_size, shuffle=True,
                                   drop_last=True, collate_fn=collate_records)

    def state_dict(self) -> dict:
        return {"refill_rng": self._refill_rng.getstate()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "refill_rng" in state_dict:
            self._refill_rng.setstate(state_dict["refill_rng"])

    def refill(self, count: int) -> list[dict]:
        """``count`` random extra problems (dynamic sampling tops up batches with these)."""
        return [self.problems[self._refill_rng.randrange(len(self.problems))] for _ in range(count)]
