"""DataModules feeding RFT: streamed expert shards and built-in task demonstrations."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import lightning as L
import pytest

from rloop_lightning.data.datamodules import DemonstrationDataModule, ExpertDataModule
from rloop_lightning.records import RecordError
from rloop_lightning.tasks import Countdown
from rloop_lightning.tasks.countdown import verify_expression

PROMPTS = [f"p{i:02d}" for i in range(13)]


@pytest.fixture
def shards(tmp_path):
    """13 records in two jsonl shards (8 + 5)."""
    directory = tmp_path / "shards"
    directory.mkdir()
    for name, prompts in (("shard-0.jsonl", PROMPTS[:8]), ("shard-1.jsonl", PROMPTS[8:])):
        lines = [json.dumps({"prompt": prompt, "completion": f"answer {prompt}"}) for prompt in prompts]
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory


def epoch_prompts(datamodule, epoch: int = 0) -> list[str]:
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)
    batches = list(loader)
    assert all(len(batch) <= datamodule.batch_size for batch in batches)
    return [record["prompt"] for batch in batches for record in batch]


def expert(paths, trainer=None, **kwargs) -> ExpertDataModule:
    datamodule = ExpertDataModule([str(p) for p in paths], **{"batch_size": 4, **kwargs})
    datamodule.trainer = trainer
    datamodule.setup("fit")
    return datamodule


def ranks(rank: int, world_size: int) -> SimpleNamespace:
    """What the datamodule reads of a trainer: its rank and the number of ranks."""
    return SimpleNamespace(global_rank=rank, world_size=world_size)


# --------------------------------------------------------------------------- ExpertDataModule


def test_expert_records_once_per_epoch_shuffled_by_seed(shards):
    first = epoch_prompts(expert([shards], seed=0))
    assert sorted(first) == PROMPTS  # every record exactly once
    assert first != PROMPTS
    assert epoch_prompts(expert([shards], seed=0)) == first  # reproducible
    other_seed = epoch_prompts(expert([shards], seed=1))
    assert other_seed != first and Counter(other_seed) == Counter(first)
    batch = next(iter(expert([shards]).train_dataloader()))
    assert set(batch[0]) == {"prompt", "completion"} and batch[0]["completion"] == f"answer {batch[0]['prompt']}"


def test_expert_records_in_file_order_without_shuffle(shards):
    assert epoch_prompts(expert([shards / "shard-1.jsonl", shards / "shard-0.jsonl"], shuffle=False)) == (
        PROMPTS[8:] + PROMPTS[:8])
    assert epoch_prompts(expert([shards / "shard-*.jsonl"], shuffle=False)) == PROMPTS


def test_expert_two_dataloader_workers_read_each_record_once(shards):
    prompts = epoch_prompts(expert([shards], num_workers=2, batch_size=3))
    assert sorted(prompts) == PROMPTS


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_expert_ranks_get_equal_batches_padded_from_the_epoch_order(shards, world_size):
    """13 records: every rank gets ceil(13 / k) of them; the k * ceil(13 / k) - 13 extra ones repeat
    the start of the epoch's order, so every record is seen and the ranks step in lockstep."""
    per_rank = [epoch_prompts(expert([shards], ranks(rank, world_size), batch_size=2), epoch=1)
                for rank in range(world_size)]
    per_rank_records = -(-13 // world_size)
    assert [len(prompts) for prompts in per_rank] == [per_rank_records] * world_size
    seen = Counter(p for prompts in per_rank for p in prompts)
    assert set(seen) == set(PROMPTS)
    assert sum(seen.values()) - 13 == world_size * per_rank_records - 13  # the padding, each repeat once
    assert max(seen.values()) <= 2


def test_expert_ranks_without_shuffle_take_every_kth_record(shards):
    per_rank = [epoch_prompts(expert([shards], ranks(rank, 2), shuffle=False, batch_size=3)) for rank in (0, 1)]
    assert per_rank == [PROMPTS[0::2], PROMPTS[1::2] + [PROMPTS[0]]]


def test_expert_set_smaller_than_the_ranks_fails_at_setup(shards):
    with pytest.raises(ValueError, match="13 expert records in .* cannot give each of 16 ranks one record"):
        expert([shards], ranks(0, 16))
    expert([shards], ranks(0, 13))  # one each is enough


def test_expert_empty_shard_set_fails_at_setup(tmp_path):
    pattern = str(tmp_path / "nothing-*.jsonl")
    with pytest.raises(ValueError, match="no expert records in") as error:
        ExpertDataModule([pattern]).setup("fit")
    assert pattern in str(error.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no expert records in .*empty.jsonl"):
        ExpertDataModule([str(tmp_path / "empty.jsonl")]).setup("fit")


def test_expert_record_without_completion_names_file_and_line(shards):
    later = shards / "shard-1.jsonl"
    later.write_text(later.read_text() + json.dumps({"prompt": "late"}) + "\n")
    with pytest.raises(RecordError) as error:  # every record is checked at setup, before training
        ExpertDataModule([str(shards)]).setup("fit")
    assert f"{later}:6:" in str(error.value) and "'completion'" in str(error.value)


class PromptRecorder(L.Callback):
    """Record the prompts of every training batch, per epoch (and write them out on request)."""

    def __init__(self, output: Optional[str] = None):
        self.output = output
        self.epochs: list[list[str]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_index) -> None:
        self.epochs[-1].append([record["prompt"] for record in batch])

    def on_train_end(self, trainer, pl_module) -> None:
        if self.output:
            Path(self.output, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.epochs))


def fit_rft(shards: str, output: Optional[str] = None, devices: int = 1, max_epochs: int = 3) -> PromptRecorder:
    """A real RFT fit on the micro policy, batch 2; ``devices`` CPU processes under DDP."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from rloop_lightning.policy import Policy
    from rloop_lightning.rft import RFTModule

    recorder = PromptRecorder(output)
    # a rank left waiting in an all-reduce fails after 60 s instead of hanging the test run
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=max_epochs,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[recorder])
    trainer.fit(RFTModule(Policy("rloop/micro-llama")), datamodule=ExpertDataModule([shards], batch_size=2))
    return recorder


def test_rft_trainer_reshuffles_every_epoch(shards):
    """Lightning itself drives the per-epoch shuffle (it calls the sampler's set_epoch)."""
    epochs = [[p for batch in epoch for p in batch] for epoch in fit_rft(str(shards)).epochs]
    assert len(epochs) == 3
    assert all(sorted(epoch) == PROMPTS for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    datamodule = expert([shards], batch_size=2)
    assert epochs == [epoch_prompts(datamodule, epoch) for epoch in range(3)]  # the sampler's seeded order for epochs 0, 1, 2


def test_rft_on_two_processes_with_an_uneven_expert_set(shards, tmp_path):
    """13 records, batch 2, 2 DDP ranks: 7 records = 4 batches on each (the old every-k-th split
    gave 4 and 3 and hung in the gradient all-reduce); each epoch covers every record."""
    output = tmp_path / "seen"
    output.mkdir()
    command = [sys.executable, __file__, str(shards), str(output)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for epochs in per_rank:
        assert [[len(batch) for batch in epoch] for epoch in epochs] == [[2, 2, 2, 1]] * 2
    for epoch in (0, 1):
        seen = Counter(p for epochs in per_rank for batch in epochs[epoch] for p in batch)
        assert set(seen) == set(PROMPTS) and sum(seen.values()) == 14  # one record padded
    assert per_rank[0][0] != per_rank[0][1]  # reshuffled between epochs


# --------------------------------------------------------------------------- DemonstrationDataModule


def test_demonstrations_verify_and_cover_the_split():
    task = Countdown(num_train=50, num_test=10, num_ood=10)
    problems = {problem["id"]: problem for problem in task.load("train")}
    datamodule = DemonstrationDataModule(task, batch_size=16)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert [len(batch) for batch in batches] == [16, 16, 16, 2]
    records = [record for batch in batches for record in batch]
    assert sorted(record["id"] for record in records) == sorted(problems)
    for record in records:
        problem = problems[record["id"]]
        assert record["prompt"] == problem["prompt"]
        assert verify_expression(record["completion"], problem["numbers"], problem["target"]), record


def test_demonstrations_of_the_test_split():
    task = Countdown(num_train=5, num_test=10, num_ood=10)
    datamodule = DemonstrationDataModule(task, split="test", batch_size=4)
    datamodule.setup("fit")
    ids = [record["id"] for batch in datamodule.train_dataloader() for record in batch]
    assert sorted(ids) == sorted(f"countdown-test-{i}" for i in range(10))


def test_demonstrations_of_an_empty_split_fail_at_setup():
    datamodule = DemonstrationDataModule(Countdown(num_train=0, num_test=10, num_ood=10))
    with pytest.raises(ValueError, match="task 'countdown' split 'train' is empty"):
        datamodule.setup("fit")


@pytest.mark.parametrize("vary", [True, False])
def test_demonstrations_vary_across_visits_only_when_asked(vary):
    data = DemonstrationDataModule(Countdown(num_train=50, num_test=10, num_ood=10), vary_demonstrations=vary)
    data.setup("fit")
    dataset = data.dataset
    from rloop_lightning.tasks.countdown import solve

    index = max(range(len(dataset)), key=lambda i: len(solve(dataset.problems[i]["numbers"],
                                                                dataset.problems[i]["target"])))
    shown = {dataset[index]["completion"] for _ in range(12)}
    assert (len(shown) > 1) == vary


if __name__ == "__main__":  # the 2-process RFT of test_rft_on_two_processes_with_an_uneven_expert_set
    fit_rft(sys.argv[1], sys.argv[2], devices=2, max_epochs=2)
