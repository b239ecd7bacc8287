"""LightningDataModules that feed (prompt, completion) records to the RFT phase.

- ``ExpertDataModule`` streams verified expert trajectories from jsonl/parquet shards, with a
  shuffle buffer, split across DDP ranks and dataloader workers by record index.
- ``DemonstrationDataModule`` serves a built-in task's solver demonstrations (the tiny base warm-up).

Batches are lists of record dicts; the LightningModule tokenises them with its policy, so the data
side needs no tokenizer and one tokenizer setting has one home.
"""

from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from rloop_lightning.data.records import expand_paths, iter_records
from rloop_lightning.tasks.base import Split, Task

RECORD_FIELDS = ("prompt", "completion")


def collate_records(records: list[dict]) -> list[dict]:
    return records


def _shard_info() -> tuple[int, int]:
    """(index, count) of this reader among all DDP ranks x dataloader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    worker = get_worker_info()
    worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
    return rank * workers + worker_id, world * workers


class RecordStream(IterableDataset):
    """Streams records from files, shuffled through a buffer; each reader takes every k-th record."""

    def __init__(self, paths: Sequence[str], shuffle_buffer: int = 10_000, seed: int = 0):
        self.paths = list(paths)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_records(self) -> Iterator[dict]:
        index, count = _shard_info()
        for position, record in enumerate(iter_records(self.paths, RECORD_FIELDS)):
            if position % count == index:
                yield record

    def __iter__(self) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from self._my_records()
            return
        rng = random.Random(self.seed + 1_000_003 * self.epoch)
        buffer: list[dict] = []
        for record in self._my_records():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            slot = rng.randrange(len(buffer))
            yield buffer[slot]
            buffer[slot] = record
        rng.shuffle(buffer)
        yield from buffer


class ExpertDataModule(L.LightningDataModule):
    """Streams (prompt, completion) records from jsonl/parquet shards (files, directories or globs).

    Args:
        paths: shard files, directories or glob patterns.
        batch_size: records per training step (per rank).
        shuffle_buffer: records held for shuffling; 0 or 1 streams in file order.
        num_workers: dataloader worker processes.
        seed: shuffling seed.
    """

    def __init__(self, paths: list[str], batch_size: int = 32, shuffle_buffer: int = 10_000,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.paths = paths
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.seed = seed
        self.dataset: Optional[RecordStream] = None

    def setup(self, stage: str) -> None:
        files = expand_paths(self.paths)
        first = next(iter_records(files, RECORD_FIELDS), None)  # validates the first file early
        if first is None:
            raise ValueError(f"no expert records in {self.paths}: nothing to train on")
        self.dataset = RecordStream([str(f) for f in files], self.shuffle_buffer, self.seed)

    def train_dataloader(self) -> DataLoader:
        self.dataset.set_epoch(self.trainer.current_epoch if self.trainer else 0)
        return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate_records,
                          num_workers=self.num_workers)


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
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self._refill_rng = random.Random(self.seed * 7919 + rank)  # each rank refills differently
        if stage == "fit" and len(self.problems) < self.batch_size:
            raise ValueError(f"{len(self.problems)} problems cannot fill a batch of {self.batch_size} prompts")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ProblemDataset(self.problems), batch_size=self.batch_size, shuffle=True,
                          drop_last=True, collate_fn=collate_records)

    def refill(self, count: int) -> list[dict]:
        """``count`` random extra problems (dynamic sampling tops up batches with these)."""
        return [self.problems[self._refill_rng.randrange(len(self.problems))] for _ in range(count)]
