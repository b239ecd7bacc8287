"""RFT by token budget (``RFTModule(micro_batch_tokens=...)``): a step's gradient and a fit's weights equal the
uncut batch's, on 1 process and on 2 FSDP2 processes with unequal lengths; budgets and Trainer settings it
cannot honour are refused naming them."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from rloop_lightning import micro_batches, tiny
from rloop_lightning.data.datamodules import DemonstrationDataModule, ExpertDataModule
from rloop_lightning.policy import LoraSettings, Policy
from rloop_lightning.rft import RFTModule
from rloop_lightning.tasks import Countdown
from test_micro_batches import CapturingSGD, free_port

# long-tailed completions (characters = tokens for the micro model's tokenizer, + EOS): 61, 3, 9, 2, 25, 5
LONG_TAILED = [("1 2 -> 3", "7 " * 30), ("a longer prompt 7 8", "ab"), ("1 2 -> 3", "x = 1 + 2"),
               ("4 5 6 -> 15", "y"), ("a longer prompt 7 8", "so 7 + 8 = 15 and 15 - 0"), ("9 -> 9", "9 = 9")]
SHORT = [("9 -> 9", "9"), ("1 -> 1", "1"), ("2 -> 2", "2 = 2"), ("3 -> 3", "3")]  # 4 x (6 + 6): one micro-batch
BUDGET = 48  # the longest row: 8 + 61 = 69 tokens -> raised in the cases that need it


def records_of(pairs) -> list[dict]:
    return [{"prompt": prompt, "completion": completion} for prompt, completion in pairs]


def rft_module(micro_batch_tokens, world_size: int = 1, lora: bool = False, packing: bool = False,
               kl_coef: float = 0.1, logprob_chunk_size=512) -> tuple[RFTModule, CapturingSGD]:
    """An RFT module wired for a direct call of its update (no Trainer), on the micro model (FSDP2-sharded over
    the process group when ``world_size`` > 1), with a gradient-capturing SGD."""
    policy = Policy("rloop/micro-llama", lora=LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None,
                    packing=packing and micro_batch_tokens is not None, logprob_chunk_size=logprob_chunk_size)
    torch.manual_seed(0)  # LoRA's A initialisation
    policy.load_model()
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from rloop_lightning.strategies import shard_with_fsdp2

        shard_with_fsdp2(policy.model, init_device_mesh("cpu", (world_size,)))
    if lora:  # zero-initialised B would give A no gradient
        torch.manual_seed(1)
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    module = RFTModule(policy, kl_coef=kl_coef, micro_batch_tokens=micro_batch_tokens)
    optimizer = CapturingSGD([p for p in policy.parameters() if p.requires_grad])
    module.trainer = SimpleNamespace(world_size=world_size, global_rank=0, global_step=0)  # what the update reads
    module.optimizers, module.lr_schedulers = lambda: optimizer, lambda: None
    module.manual_backward = lambda loss: loss.backward()
    return module, optimizer


def step_gradients(micro_batch_tokens, pairs, **settings) -> tuple[list, int]:
    """The gradients of one RFT step on ``pairs``: uncut (``loss`` of the whole batch, one backward) or by
    tokens (``update_by_tokens``); and the number of micro-batches this rank cut."""
    module, optimizer = rft_module(micro_batch_tokens, **settings)
    records = records_of(pairs)
    batch = module.policy.encode_pairs([r["prompt"] for r in records], [r["completion"] for r in records])
    if micro_batch_tokens is None:
        module.loss(batch)[0].backward()
        optimizer.step()
        return optimizer.gradients[0], 1
    module.update_by_tokens(batch)
    assert len(optimizer.gradients) == 1  # one optimizer step, whatever the cut
    return optimizer.gradients[0], len(micro_batches.by_tokens(*batch.lengths(), micro_batch_tokens,
                                                               module.policy.packing))


def assert_same_gradients(expected: list, actual: list) -> None:
    assert any(g is not None and g.abs().max() > 1e-4 for g in expected)
    for reference, other in zip(expected, actual, strict=True):
        torch.testing.assert_close(other, reference, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("settings", [dict(), dict(packing=True), dict(lora=True, kl_coef=0.0, logprob_chunk_size=4)],
                         ids=["kl", "packed", "lora_chunks"])
def test_a_step_by_tokens_has_the_uncut_batch_gradient(settings):
    uncut, _ = step_gradients(None, LONG_TAILED, **settings)
    by_tokens, cut = step_gradients(70, LONG_TAILED, **settings)
    assert cut >= 3  # 69 tokens alone, then rows of 27, 33, ... tokens (or real tokens, packed) several a time
    assert_same_gradients(uncut, by_tokens)


def test_a_nonfinite_micro_batch_skips_the_step_before_any_backward_and_counts_it():
    module, optimizer = rft_module(70, kl_coef=0.0)
    embeddings = module.policy.require_model().get_input_embeddings()
    embeddings.register_forward_hook(lambda layer, inputs, output: output * float("nan"))
    records = records_of(LONG_TAILED)
    batch = module.policy.encode_pairs([r["prompt"] for r in records], [r["completion"] for r in records])
    loss, _ = module.update_by_tokens(batch)
    assert not torch.isfinite(loss) and optimizer.gradients == [] and module.bad_steps_in_a_row == 1
    assert all(p.grad is None for p in module.policy.parameters())  # no backward ran: no rank waits in one


def write_records(path, pairs) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records_of(pairs)))
    return str(path)


def fit_weights(tmp_path, micro_batch_tokens, **trainer_settings) -> list[torch.Tensor]:
    """Two RFT steps of 3 records (SGD, a halving learning rate, KL) from the same seed: the final weights."""
    def optimizer(parameters):
        return torch.optim.SGD(parameters, lr=0.5)

    def halving(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    module = RFTModule(Policy("rloop/micro-llama"), optimizer=optimizer, lr_scheduler=halving, kl_coef=0.1,
                       micro_batch_tokens=micro_batch_tokens)
    data = ExpertDataModule([write_records(tmp_path / "experts.jsonl", LONG_TAILED)], batch_size=3, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        **trainer_settings)
    torch.manual_seed(0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    return [p.detach().clone() for p in module.policy.parameters()]


def test_an_rft_fit_by_tokens_reaches_the_uncut_weights(tmp_path):
    """Under a Trainer: manual optimisation, the scheduler stepped per optimizer step, 2 steps of 1-3 micro-batches."""
    initial = [p.detach().clone() for p in Policy("rloop/micro-llama").load_model().parameters()]
    uncut, by_tokens = fit_weights(tmp_path, None), fit_weights(tmp_path, 70)
    assert max(float((after - before).abs().max()) for after, before in zip(uncut, initial)) > 1e-3
    for reference, other in zip(uncut, by_tokens, strict=True):
        torch.testing.assert_close(other, reference, atol=2e-6, rtol=1e-4)


def test_a_budget_below_the_longest_record_is_refused_naming_it(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 1 or null, got 0"):
        RFTModule(Policy("rloop/micro-llama"), micro_batch_tokens=0)
    # the records are known at set-up: refused before the model loads, naming the record
    monkeypatch.setattr(Policy, "load_model", lambda self: pytest.fail("the model loaded before the check"))
    with pytest.raises(ValueError, match=r"micro_batch_tokens=48 is smaller than the longest single sequence, 69 "
                                         r"tokens \(record 0 of the training data \('1 2 -> 3'...\): 8 prompt \+ 61 "
                                         r"completion tokens\).* or set it to null to run each batch in one forward"):
        fit_weights(tmp_path, BUDGET)
    # the Trainer's automatic accumulation and clipping: refused naming them, before the model loads
    with pytest.raises(ValueError, match=r"micro_batch_tokens=70 with trainer.accumulate_grad_batches=2: .* Set "
                                         r"data.batch_size to the records of one optimizer step"):
        fit_weights(tmp_path, 70, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"micro_batch_tokens=70 with trainer.gradient_clip_val=1.0: "):
        fit_weights(tmp_path, 70, gradient_clip_val=1.0)
    monkeypatch.undo()
    # records drawn as the data loads (demonstrations): refused at the first batch, naming its longest row
    module = RFTModule(Policy("rloop/micro-llama"), micro_batch_tokens=10)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"micro_batch_tokens=10 is smaller than the longest single sequence, \d+ "
                                         r"tokens \(a record of step 0's batch: \d+ prompt \+ \d+ completion"):
        trainer.fit(module, datamodule=DemonstrationDataModule(Countdown(num_train=8, num_test=2, num_ood=2),
                                                               batch_size=4))


# --------------------------------------------------------------------------- 2 ranks (FSDP2, gloo)


def two_rank_worker(rank: int, port: int, output: str) -> None:
    """Rank 0 holds short records (one micro-batch), rank 1 long-tailed ones (several): FSDP2 all-gathers in
    every forward, so without an agreed count the ranks would wait on each other (the group's time limit fails)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        torch.set_num_threads(1)
        pairs = SHORT if rank == 0 else LONG_TAILED
        uncut, _ = step_gradients(None, pairs, world_size=2, kl_coef=0.0)  # KL: its 1-process twin above
        by_tokens, cut = step_gradients(70, pairs, world_size=2, kl_coef=0.0)
        torch.save({"uncut": [g.to_local() for g in uncut], "by_tokens": [g.to_local() for g in by_tokens],
                    "micro_batches": cut}, f"{output}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_with_unequal_lengths_agree_on_micro_batches_and_keep_the_gradient(tmp_path):
    tiny.materialize("rloop/micro-llama")  # once, before two processes would build it at the same time
    torch.multiprocessing.spawn(two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert ranks[0]["micro_batches"] == 1 < ranks[1]["micro_batches"]  # rank 0 runs fillers
    for results in ranks:
        assert_same_gradients(results["uncut"], results["by_tokens"])
