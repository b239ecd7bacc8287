"""Micro-batches by token budget: the cut against hand cases, and the GRPO update's log-probs and gradients
equal to the fixed-count path's for every loss type."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from types import ModuleType, SimpleNamespace

import pytest
import torch

from rloop_lightning import micro_batches, tiny
from rloop_lightning.forwards import PolicyBatch
from rloop_lightning.algorithms import RankTotals, micro_batch_weight
from rloop_lightning.grpo import GRPOModule, ImportanceSettings, LossSettings, OverlongSettings, balance
from rloop_lightning.grpo.groups import Group
from rloop_lightning.policy import LoraSettings, Policy
from rloop_lightning.rollout.base import SamplingParams


# --------------------------------------------------------------------------- the cut, by hand


def test_rows_are_taken_longest_first_while_the_padded_size_fits():
    prompts, completions = [3, 3, 2, 3, 2], [9, 1, 6, 5, 2]
    # totals 12, 4, 8, 8, 4 -> order 0, 2, 3 (8: longer completion first), 4, 1 (4: longer completion first).
    # [0]: 1 x 12; + 2: 2 x (3 + 9) = 24 > 20, new. [2]: 8; + 3: 2 x (3 + 6) = 18; + 4: 3 x 9 = 27 > 20, new.
    # [4]: 4; + 1: 2 x (3 + 2) = 10.
    assert micro_batches.by_tokens(prompts, completions, 20) == [[0], [2, 3], [4, 1]]
    assert micro_batches.by_tokens(prompts, completions, 12) == [[0], [2], [3], [4, 1]]
    assert micro_batches.by_tokens(prompts, completions, 1000) == [[0, 2, 3, 4, 1]]
    assert micro_batches.padded_tokens([2, 3], [6, 5]) == 18
    assert micro_batches.padding_fraction(prompts, completions, [[0], [2, 3], [4, 1]]) == pytest.approx(1 - 36 / 40)


def test_packed_micro_batches_count_real_tokens():
    prompts, completions = [3, 3, 2, 3, 2], [9, 1, 6, 5, 2]  # totals 12, 4, 8, 8, 4; order 0, 2, 3, 4, 1
    # [0] 12; + 2: 20; + 3: 28 > 20, new. [3] 8; + 4: 12; + 1: 16.
    assert micro_batches.by_tokens(prompts, completions, 20, packed=True) == [[0, 2], [3, 4, 1]]


def test_packing_with_an_attention_that_cannot_keep_sequences_apart_is_refused_naming_the_setting(monkeypatch):
    with pytest.raises(ValueError, match=r"policy.packing needs an attention implementation .* "
                                         r"policy.attn_implementation='sdpa_paged' cannot"):
        Policy("rloop/micro-llama", packing=True, attn_implementation="sdpa_paged")
    with pytest.raises(ValueError, match="policy.packing with policy.trust_remote_code"):
        Policy("rloop/micro-llama", packing=True, trust_remote_code=True)
    assert Policy("rloop/micro-llama", attn_implementation="sdpa_paged").model is None  # without packing: fine
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", ModuleType("masking_utils"))  # transformers < 4.54
    with pytest.raises(ValueError, match="policy.packing needs transformers' packed-sequence masks"):
        Policy("rloop/micro-llama", packing=True)


def test_fixed_counts_and_filler_micro_batches():
    assert micro_batches.by_count(5, 2) == [[0, 1], [2, 3], [4]]
    assert micro_batches.plan([1] * 5, [1] * 5, 2, None) == [[0, 1], [2, 3], [4]]
    assert micro_batches.pad_to_count([[1, 0]], 3) == [[1, 0], [], []]
    with pytest.raises(ValueError, match="cannot pad 2"):
        micro_batches.pad_to_count([[0], [1]], 1)


def test_a_budget_below_the_longest_sequence_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"micro_batch_tokens=11 is smaller than the longest single sequence, "
                                         r"12 tokens \(row 0: 3 prompt \+ 9 completion tokens\)"):
        micro_batches.by_tokens([3, 3], [9, 1], 11)
    with pytest.raises(ValueError, match="micro_batch_tokens must be a positive number"):
        micro_batches.by_tokens([3], [1], 0)


def test_trimming_cuts_only_the_columns_that_are_padding_in_every_row():
    # prompts left-padded to 4 columns, completions right-padded to 3; the longest prompt and completion: 2 each
    ids = torch.tensor([[0, 0, 7, 8, 1, 2, 0], [0, 0, 0, 9, 3, 0, 0]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0]])
    batch = PolicyBatch(ids, attention, attention[:, 4:], 4)
    trimmed = batch.trimmed()
    assert trimmed.prompt_length == 2 and batch.lengths() == ([2, 1], [2, 1])
    assert trimmed.input_ids.tolist() == [[7, 8, 1, 2], [0, 9, 3, 0]]
    assert trimmed.completion_mask.tolist() == [[1, 1], [1, 0]]


# --------------------------------------------------------------------------- the update, fixed count vs tokens


class CapturingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients of each step."""

    def __init__(self, params):
        super().__init__(params, lr=0.5)
        self.gradients: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.gradients.append([p.grad.clone() if p.grad is not None else None
                               for group in self.param_groups for p in group["params"]])
        return super().step(closure)


LONG_TAILED = (("1 2 -> 3", [12, 2, 1, 3]), ("a longer prompt 7 8", [4, 2, 9, 1]))


def hand_groups(policy: Policy, layout=LONG_TAILED) -> list[Group]:
    """Two prompts of different lengths, 4 completions each, long-tailed lengths (1 to 12, one truncated)."""
    generator = torch.Generator().manual_seed(0)
    groups = []
    for prompt, lengths in layout:
        completions = [torch.randint(5, 60, (n,), generator=generator).tolist() for n in lengths]
        groups.append(Group(
            problem={"id": prompt, "prompt": prompt}, prompt_ids=policy.encode_prompts([prompt])[0],
            completion_ids=completions, completions=["x"] * 4,
            sampler_logprobs=[(-torch.rand(n, generator=generator)).tolist() for n in lengths],
            truncated=[n == 12 for n in lengths], rewards=torch.tensor([1.0, 0.0, 0.5, 0.0]),
            correct=torch.tensor([True, False, False, False])))
    return groups


CASES = {  # every loss type; shared prompts, LoRA, chunks, top-k/top-p truncation, overlong masking spread over them
    "dapo_token_mean": dict(loss=LossSettings(aggregation="token_mean", kl_coef=0.1), num_mini_batches=2,
                            logprob_chunk_size=3, overlong=OverlongSettings(mode="mask")),
    "grpo_seq_mean_lora": dict(loss=LossSettings(aggregation="seq_mean_token_mean", kl_coef=0.1), lora=True,
                               sampling=SamplingParams(max_new_tokens=12, top_k=20), num_iterations=2),
    "dr_grpo": dict(loss=LossSettings(aggregation="seq_mean_token_sum_norm"), share_prompts=False,
                    logprob_chunk_size=None, num_iterations=2,
                    sampling=SamplingParams(max_new_tokens=12, top_p=0.9, temperature=0.8)),
    "dapo_packed": dict(loss=LossSettings(aggregation="token_mean", kl_coef=0.1), packing=True, num_iterations=2,
                        sampling=SamplingParams(max_new_tokens=12, top_k=20)),
    "gspo_importance": dict(loss=LossSettings(ratio_level="sequence", aggregation="seq_mean_token_mean"),
                            importance=ImportanceSettings(enabled=True), num_mini_batches=2),
}


def update(case: dict, micro_batch_tokens, world_size: int = 1, layout=LONG_TAILED):
    """Gradients of each optimizer step, the old-policy and reference log-probs of one GRPO update, its mask and
    its metrics (``world_size`` 2: the model sharded with FSDP2 over the process group; ``layout`` a list of
    layouts: their groups together, e.g. both ranks' rows on one process)."""
    case = dict(case)
    lora = LoraSettings(r=4, alpha=8) if case.pop("lora", False) else None
    packing = case.pop("packing", False) and micro_batch_tokens is not None  # the fixed-count arm pads
    policy = Policy("rloop/micro-llama", logprob_chunk_size=case.pop("logprob_chunk_size", 512), lora=lora,
                    packing=packing)
    policy.load_model()
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from rloop_lightning.strategies import shard_with_fsdp2

        shard_with_fsdp2(policy.model, init_device_mesh("cpu", (world_size,)))
    if lora is not None:  # zero-initialised B would give A no gradient
        torch.manual_seed(1)
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    case.setdefault("sampling", SamplingParams(max_new_tokens=12))
    module = GRPOModule(policy, num_generations=4, micro_batch_size=2, micro_batch_tokens=micro_batch_tokens,
                        max_grad_norm=0.0, reward_functions=[len], **case)
    optimizer = CapturingSGD([p for p in policy.parameters() if p.requires_grad])
    module.trainer = SimpleNamespace(world_size=world_size)  # what the update reads of its Trainer
    module.optimizers, module.lr_schedulers = lambda: optimizer, lambda: None
    module.manual_backward = lambda loss: loss.backward()
    groups = [g for part in (layout if isinstance(layout, list) else [layout]) for g in hand_groups(policy, part)]
    batch = policy.make_batch([g.prompt_ids for g in groups for _ in g.completion_ids],
                              [ids for g in groups for ids in g.completion_ids])
    old = module._logprobs_without_grad(batch)
    reference = module._reference_logprobs(batch) if module.needs_reference else None
    torch.manual_seed(0)  # the mini-batches' permutation
    stats = module._train_on(groups)
    return optimizer.gradients, old, reference, batch.completion_mask.bool(), stats


@pytest.mark.parametrize("name", sorted(CASES))
def test_token_budget_gives_the_fixed_count_log_probs_and_gradients(name):
    fixed, by_tokens = update(CASES[name], None), update(CASES[name], 40)  # 2 rows vs 1 to 5 rows a micro-batch
    mask = fixed[3]
    torch.testing.assert_close(by_tokens[1][mask], fixed[1][mask], atol=1e-5, rtol=0)
    if fixed[2] is not None:
        torch.testing.assert_close(by_tokens[2][mask], fixed[2][mask], atol=1e-5, rtol=0)
    assert len(fixed[0]) == len(by_tokens[0]) >= 1
    for step_fixed, step_tokens in zip(fixed[0], by_tokens[0]):
        assert any(g is not None and g.abs().max() > 1e-4 for g in step_fixed)
        for expected, actual in zip(step_fixed, step_tokens):
            if expected is None:
                assert actual is None
            else:
                torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)


def test_a_budget_below_the_longest_prompt_and_completion_is_refused_before_the_model_loads(monkeypatch):
    from test_grpo import fit, make_data, make_module

    module = make_module(micro_batch_tokens=12)  # max_new_tokens 8 + Countdown prompts of 20-odd tokens
    monkeypatch.setattr(module.policy, "load_model", lambda: pytest.fail("the model loaded before the check"))
    with pytest.raises(ValueError, match=r"micro_batch_tokens=12 is smaller than the longest single sequence, \d+ "
                                         r"tokens \(the longest prompt \+ sampling.max_new_tokens\)"):
        fit(module, make_data(), steps=1)
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 1, got 0"):
        make_module(micro_batch_tokens=0)


# --------------------------------------------------------------------------- 2 ranks (FSDP2, gloo)

EVEN = (("1 2 -> 3", [2, 2, 2, 2]), ("a longer prompt 7 8", [2, 2, 2, 2]))
SHORT = (("1 2 -> 3", [1, 1, 1, 1]), ("1 2 -> 3", [2, 2, 2, 2]), ("1 2 -> 3", [1, 2, 1, 2]))  # 12 rows, 114 tokens
LONG = (("1 2 -> 3", [12, 9, 10, 11]), ("a longer prompt 7 8", [12, 8, 9, 12]))  # 8 rows, 191 tokens


GLOBAL_ARMS = (("token_mean", False), ("token_mean", True), ("seq_mean_token_mean", False),
               ("seq_mean_token_mean", True))  # (aggregation, balance_ranks), all under micro_batch_tokens 40


def two_rank_worker(rank: int, port: int, output: str) -> None:
    """Rank 0 holds even short completions, rank 1 long-tailed ones: under a token budget they cut different
    numbers of micro-batches, and FSDP2 all-gathers in every forward, so the ranks must agree on a count.
    Then the loss normalised over both ranks, with and without moving rows between them (``balance_ranks``):
    rank 0 now holding 12 short completions, rank 1 8 long ones (unequal counts, as balancing can leave them,
    so that per-rank sequence means would differ from the global one); the whole gradients (``full_tensor``)
    and the step's metrics, for the single-process comparison."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))  # a hang fails
    try:
        torch.set_num_threads(1)
        case = dict(loss=LossSettings(aggregation="token_mean"), num_iterations=2)
        layout = EVEN if rank == 0 else LONG_TAILED
        results = {}
        for arm, budget, packing in ((None, None, False), (40, 40, False)):  # packing: single process (cost)
            gradients, old, _, mask, _ = update({**case, "packing": packing}, budget, world_size=2, layout=layout)
            local = [[g.to_local() for g in step] for step in gradients]  # this rank's shards, plain tensors
            results[arm] = (local, old, None, mask)
        policy = Policy("rloop/micro-llama")
        batch = policy.make_batch([g.prompt_ids for g in hand_groups(policy, layout) for _ in range(4)],
                                  [ids for g in hand_groups(policy, layout) for ids in g.completion_ids])
        results["micro_batches"] = len(micro_batches.by_tokens(*batch.lengths(), 40))
        for aggregation, balanced in GLOBAL_ARMS:
            gradients, _, _, _, stats = update({**case, "loss": LossSettings(aggregation=aggregation),
                                                "balance_ranks": balanced}, 40, world_size=2,
                                               layout=SHORT if rank == 0 else LONG)
            results[aggregation, balanced] = ([[g.full_tensor() for g in step] for step in gradients], stats)
        # 10 mini-batches of 12 rows on rank 0 and of 8 on rank 1 (its last two empty): as many optimizer steps
        steps = update({**case, "num_iterations": 1, "num_mini_batches": 10}, 40, world_size=2,
                       layout=SHORT if rank == 0 else LONG)[0]
        results["optimizer_steps"] = len(steps)
        torch.save(results, f"{output}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ranks_with_unequal_lengths_run_as_many_micro_batches_and_keep_the_gradients(tmp_path):
    """Fixed counts vs a token budget on FSDP2 over 2 processes (old-policy pass and update, 2 iterations); then
    the loss normalised over both ranks, with and without ``balance_ranks``, against the same rows on one process."""
    tiny.materialize("rloop/micro-llama")  # once, before two processes would build it at the same time
    torch.multiprocessing.spawn(two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert ranks[0]["micro_batches"] < ranks[1]["micro_batches"]  # rank 0 pads with filler micro-batches
    for results in ranks:
        fixed, by_tokens = results[None], results[40]
        mask = fixed[3]
        torch.testing.assert_close(by_tokens[1][mask], fixed[1][mask], atol=1e-5, rtol=0)
        assert len(fixed[0]) == len(by_tokens[0]) == 2
        for step_fixed, step_tokens in zip(fixed[0], by_tokens[0]):
            assert any(g.abs().max() > 1e-4 for g in step_fixed)
            for expected, actual in zip(step_fixed, step_tokens):
                torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)
    assert [results["optimizer_steps"] for results in ranks] == [10, 10]
    # both ranks' rows on one process, as one batch: the gradient of the global loss, whichever rank held a row
    policy = Policy("rloop/micro-llama")
    tokens = [p + c for p, c in zip(*policy.make_batch(
        [g.prompt_ids for g in hand_groups(policy, SHORT) + hand_groups(policy, LONG) for _ in range(4)],
        [ids for g in hand_groups(policy, SHORT) + hand_groups(policy, LONG) for ids in g.completion_ids],
    ).lengths())]  # rank 0's rows, then rank 1's
    expected_loads = [sum(tokens[i] for i in rows) for rows in balance.balanced_assignment(tokens, 2)]
    for aggregation in ("token_mean", "seq_mean_token_mean"):
        one_process = update({"loss": LossSettings(aggregation=aggregation), "num_iterations": 2}, 40,
                             layout=[SHORT, LONG])[0]
        for balanced in (False, True):
            for results in ranks:
                gradients, stats = results[aggregation, balanced]
                assert len(gradients) == len(one_process) == 2
                for step_two, step_one in zip(gradients, one_process):
                    for actual, expected in zip(step_two, step_one):
                        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)
        balanced_stats = [results[aggregation, True][1] for results in ranks]
        assert [stats["perf/rank_tokens"] for stats in balanced_stats] == expected_loads
        assert balanced_stats[0]["perf/rank_token_imbalance"] == balance.imbalance(expected_loads) < 1.1
        sampled = balance.imbalance([sum(tokens[:12]), sum(tokens[12:])])  # rank 0's 12 rows, rank 1's 8
        assert balanced_stats[1]["perf/rank_token_imbalance_sampled"] == sampled > 1.2


def test_a_grpo_run_by_tokens_reaches_the_fixed_count_weights():
    """Two batches of GRPO steps (sampling included, 2 iterations, KL) with micro-batches of at most 70 tokens
    (1-2 completions) and with one micro-batch of all 32: the same weights."""
    from test_grpo import assert_same_weights

    assert_same_weights(*({"micro_batch_tokens": budget, "num_iterations": 2, "loss": LossSettings(kl_coef=0.1)}
                          for budget in (None, 70)))

# --------------------------------------------------------------------------- ranks: global loss, balanced by tokens


def test_rows_go_to_the_rank_with_the_fewest_tokens_longest_first():
    # 9 -> rank 0 (9); 7 -> 1 (7); 6 -> 1 (13); 5 -> 0 (14); 4 -> 1 (17); 1 -> 0 (15)
    assert balance.balanced_assignment([9, 7, 6, 5, 4, 1], 2) == [[0, 3, 5], [1, 2, 4]]
    # 5 -> 0; 5 -> 1; 4 -> 2; 3 (row 3) -> 2 (7); 3 (row 4) -> 0 (8); 3 (row 5) -> 1 (8)
    assert balance.balanced_assignment([5, 5, 4, 3, 3, 3], 3) == [[0, 4], [1, 5], [2, 3]]
    assert balance.imbalance([15, 17]) == 17 / 16 and balance.imbalance([0, 0]) == 0.0
    with pytest.raises(ValueError, match="cannot balance 1 rows over 2 ranks"):
        balance.balanced_assignment([3], 2)


def test_a_micro_batch_weighs_its_share_of_all_ranks_times_the_ranks():
    micro = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # 3 tokens, 2 rows
    full = torch.ones(4, 3)  # this rank's mini-batch: ignored once the totals of all ranks are given
    totals = RankTotals(tokens=12, rows=10, ranks=2)
    assert micro_batch_weight("token_mean", micro, full, totals) == 2 * 3 / 12
    assert micro_batch_weight("seq_mean_token_mean", micro, full, totals) == 2 * 2 / 10
    assert micro_batch_weight("seq_mean_token_sum_norm", micro, full, totals) == 2 * 2 / 10
    assert micro_batch_weight("token_mean", micro, full) == 3 / 12  # one rank: its own mini-batch
    with pytest.raises(ValueError, match="unknown aggregation 'x'"):
        micro_batch_weight("x", micro, full, totals)


def test_balancing_ranks_without_a_token_budget_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="balance_ranks: true needs micro_batch_tokens"):
        GRPOModule(Policy("rloop/micro-llama"), balance_ranks=True)
    assert GRPOModule(Policy("rloop/micro-llama"), balance_ranks=True, micro_batch_tokens=64).balance_ranks
