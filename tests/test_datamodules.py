"""DataModules feeding RFT: streamed expert shards and built-in task demonstrations."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from rloop_lightning.data.datamodules import DemonstrationDataModule, ExpertDataModule, RecordStream
from rloop_lightning.data.records import RecordError
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


def epoch_prompts(datamodule) -> list[str]:
    batches = list(datamodule.train_dataloader())
    assert all(len(batch) <= datamodule.batch_size for batch in batches)
    return [record["prompt"] for batch in batches for record in batch]


def expert(paths, **kwargs) -> ExpertDataModule:
    datamodule = ExpertDataModule([str(p) for p in paths], **{"batch_size": 4, "shuffle_buffer": 5, **kwargs})
    datamodule.setup("fit")
    return datamodule


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


def test_expert_records_in_file_order_without_shuffle_buffer(shards):
    assert epoch_prompts(expert([shards / "shard-1.jsonl", shards / "shard-0.jsonl"], shuffle_buffer=0)) == (
        PROMPTS[8:] + PROMPTS[:8])
    assert epoch_prompts(expert([shards / "shard-*.jsonl"], shuffle_buffer=1)) == PROMPTS


def test_expert_epochs_reshuffle(shards):
    stream = RecordStream([str(shards / "shard-0.jsonl"), str(shards / "shard-1.jsonl")], shuffle_buffer=4)
    epoch0 = [r["prompt"] for r in stream]
    stream.set_epoch(1)
    epoch1 = [r["prompt"] for r in stream]
    assert sorted(epoch0) == sorted(epoch1) == PROMPTS and epoch0 != epoch1


def test_expert_two_dataloader_workers_read_each_record_once(shards):
    prompts = epoch_prompts(expert([shards], num_workers=2, batch_size=3))
    assert sorted(prompts) == PROMPTS


@pytest.mark.parametrize("world_size", [2, 3])
def test_expert_ranks_split_the_records(shards, monkeypatch, world_size):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world_size)
    per_rank = []
    for rank in range(world_size):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        per_rank.append(epoch_prompts(expert([shards], batch_size=2)))
    assert sorted(p for prompts in per_rank for p in prompts) == PROMPTS  # disjoint and complete
    assert [len(prompts) for prompts in per_rank] == [len(range(r, 13, world_size)) for r in range(world_size)]


def test_expert_empty_shard_set_fails_at_setup(tmp_path):
    pattern = str(tmp_path / "nothing-*.jsonl")
    with pytest.raises(ValueError, match="no expert records in") as error:
        ExpertDataModule([pattern]).setup("fit")
    assert pattern in str(error.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no expert records in .*empty.jsonl"):
        ExpertDataModule([str(tmp_path / "empty.jsonl")]).setup("fit")


def test_expert_record_without_completion_names_file_and_line(shards):
    bad_first = shards / "shard-0.jsonl"
    bad_first.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(RecordError) as error:  # the first record is checked at setup
        ExpertDataModule([str(bad_first)]).setup("fit")
    assert f"{bad_first}:1:" in str(error.value) and "'completion'" in str(error.value)

    later = shards / "shard-1.jsonl"
    later.write_text(later.read_text() + json.dumps({"prompt": "late"}) + "\n")
    datamodule = expert([shards / "shard-1.jsonl"])
    with pytest.raises(RecordError) as error:  # later records while streaming
        epoch_prompts(datamodule)
    assert f"{later}:6:" in str(error.value) and "'completion'" in str(error.value)


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
