"""``HFGenerateEngine(max_batch_tokens=...)``: calls split to a KV-cache token budget, refused when one cannot fit."""

from __future__ import annotations

import pytest
import torch

from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.rollout.hf import HFGenerateEngine

PROMPTS = ["1 2 -> 3\n", "12 3 -> 9\n"]  # 9 and 10 characters: the widest prompt has 10 tokens


def call_sizes(policy, engine, prompts, num_samples, sampling):
    sizes = []
    generate = policy.model.generate

    def recording(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    policy.model.generate = recording
    try:
        rollouts = engine.generate(policy, prompts, num_samples, sampling)
    finally:
        del policy.model.generate
    return sizes, rollouts


@pytest.mark.parametrize("max_batch_tokens,expected", [
    (3 * 14, [3, 3, 2]),  # 10 prompt + 4 new tokens = 14 slots a completion: exactly 3 fit
    (3 * 14 - 1, [2, 2, 2, 2]),  # one slot fewer: 2
    (14, [1] * 8),  # exactly one
    (10_000, [5, 3]),  # batch_size bounds it
])
def test_calls_hold_what_the_token_budget_allows(micro_policy, max_batch_tokens, expected):
    engine = HFGenerateEngine(batch_size=5, max_batch_tokens=max_batch_tokens)
    sizes, rollouts = call_sizes(micro_policy, engine, PROMPTS, 4, SamplingParams(max_new_tokens=4))
    assert sizes == expected
    assert rollouts.prompt_index == [0] * 4 + [1] * 4


def test_greedy_completions_do_not_depend_on_the_split(micro_policy):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    _, whole = call_sizes(micro_policy, HFGenerateEngine(), PROMPTS, 3, greedy)
    sizes, split = call_sizes(micro_policy, HFGenerateEngine(max_batch_tokens=2 * 16), PROMPTS, 3, greedy)
    assert sizes == [2, 2, 2]
    assert split.completion_ids == whole.completion_ids
    torch.testing.assert_close(torch.tensor(sum(split.sampler_logprobs, [])),
                               torch.tensor(sum(whole.sampler_logprobs, [])), atol=1e-5, rtol=0)


def test_a_budget_below_one_completion_is_refused_before_generating(micro_policy):
    engine = HFGenerateEngine(max_batch_tokens=13)
    called = []
    micro_policy.model.generate = lambda *args, **kwargs: called.append(1)
    try:
        with pytest.raises(ValueError, match=r"max_batch_tokens=13 cannot hold even one completion: the widest "
                                             r"prompt has 10 tokens and max_new_tokens=4, so one needs 14"):
            engine.generate(micro_policy, PROMPTS, 2, SamplingParams(max_new_tokens=4))
    finally:
        del micro_policy.model.generate
    assert not called


@pytest.mark.parametrize("value", [0, -1])
def test_a_budget_below_one_token_is_refused(value):
    with pytest.raises(ValueError, match=f"max_batch_tokens must be >= 1 \\(or null\\), got {value}"):
        HFGenerateEngine(max_batch_tokens=value)


def lockstep_worker(rank: int, port: int, output: str) -> None:
    """FSDP2 on 2 ranks with different prompt widths: the split uses the widest prompt of both ranks, so
    both make the same number of generate calls (each call's decoding steps all-gather)."""
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from rloop_lightning.policy import Policy
    from rloop_lightning.strategies import shard_with_fsdp2

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        policy = Policy("rloop/micro-llama")
        policy.load_model()
        shard_with_fsdp2(policy.model, init_device_mesh("cpu", (2,)))
        prompts = ["1 2\n", "3 4\n"] if rank == 0 else PROMPTS  # widest 4 vs 10 tokens
        # 2 x (10 + 4) slots: 2 completions a call on both ranks; rank 0 alone would fit 3 (28 // 8)
        engine = HFGenerateEngine(max_batch_tokens=28)
        sizes, rollouts = call_sizes(policy, engine, prompts, 3, SamplingParams(max_new_tokens=4))
        torch.save({"sizes": sizes, "completions": len(rollouts.completion_ids)}, f"{output}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_in_lockstep_split_alike(tmp_path):
    import socket

    from rloop_lightning import tiny

    tiny.materialize("rloop/micro-llama")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(lockstep_worker, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == {"sizes": [2, 2, 2], "completions": 6}
