"""Ranks balanced by tokens: the rows of a GRPO step moved between data-parallel ranks so that each rank's
update runs on about as many real tokens (``GRPOModule(balance_ranks=True)``).

Each rank samples and scores its own groups, so one rank may hold the step's long completions and set
the pace of every collective while the others wait. After scoring (advantages are group-relative, so they
are computed where the group was sampled) and before any forward of the update, every rank sends its rows
(prompt and completion ids, advantage, truncation flag, sampler log-probs) to every other
(``all_gather_object``: one collective, any backend), all ranks compute the same assignment from the rows'
real tokens (prompt + completion) with ``balanced_assignment``, and each keeps its share. The old-policy and
reference log-probs are computed after the move, on the rank that trains on the row.

The gradient does not depend on the assignment because the loss is normalised over all ranks
(``algorithms.micro_batch_weight`` with ``RankTotals``). Ranks may end with different numbers of rows;
their micro-batch counts are agreed by ``micro_batches.MicroBatching`` under ``micro_batch_tokens``, which
balancing therefore needs (under fixed counts a rank's compute follows its rows, not its tokens).
"""

from __future__ import annotations

import heapq
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

SETTING = "balance_ranks"


def check_balance_settings(balance_ranks: bool, micro_batch_tokens: Optional[int]) -> None:
    """``ValueError`` naming ``balance_ranks`` when it is asked for without a token budget."""
    if balance_ranks and micro_batch_tokens is None:
        raise ValueError(f"{SETTING}: true needs micro_batch_tokens: with micro-batches of micro_batch_size rows a "
                         f"rank's update costs its rows x the longest row, not its tokens, so balancing tokens "
                         f"would not balance the ranks. Set micro_batch_tokens, or {SETTING}: false")


def balanced_assignment(row_tokens: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Row indices (ascending) for each rank, balancing the ranks' summed ``row_tokens``: longest processing
    time first (rows by tokens, most first, ties by index; each to the rank with the fewest tokens so far,
    ties to the lowest rank). Within 4/3 of the best split; every rank gets a row when rows >= ranks."""
    if num_ranks < 1 or len(row_tokens) < num_ranks:
        raise ValueError(f"cannot balance {len(row_tokens)} rows over {num_ranks} ranks: each rank needs a row")
    loads = [(0, rank) for rank in range(num_ranks)]  # (tokens so far, rank), a heap
    assignment: list[list[int]] = [[] for _ in range(num_ranks)]
    for row in sorted(range(len(row_tokens)), key=lambda i: (-row_tokens[i], i)):
        tokens, rank = heapq.heappop(loads)
        assignment[rank].append(row)
        heapq.heappush(loads, (tokens + row_tokens[row], rank))
    return [sorted(rows) for rows in assignment]


def imbalance(loads: Sequence[float]) -> float:
    """The largest load over the mean load (1: perfectly balanced; 0 when there is no load)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 0.0


KEYS = ("prompt_ids", "completion_ids", "sampler_logprobs", "truncated", "advantages")


def redistribute(flat: dict, advantages: Tensor) -> tuple[dict, Tensor, dict[str, float]]:
    """This rank's rows after balancing the step's rows over the process group by real tokens (see the module
    docstring): (``flat`` with the keys the update reads, advantages [N_rank], metrics). Every rank calls it."""
    local = {"prompt_ids": flat["prompt_ids"], "completion_ids": flat["completion_ids"],
             "sampler_logprobs": flat["sampler_logprobs"], "truncated": flat["truncated"].tolist(),
             "advantages": advantages.tolist()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    rows = {key: [value for rank in gathered for value in rank[key]] for key in KEYS}  # rank-major order
    tokens = [len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"])]
    assignment = balanced_assignment(tokens, len(gathered))
    before = [sum(len(p) + len(c) for p, c in zip(rank["prompt_ids"], rank["completion_ids"])) for rank in gathered]
    after = [sum(tokens[i] for i in rank_rows) for rank_rows in assignment]
    mine = assignment[dist.get_rank()]
    kept = {key: [rows[key][i] for i in mine] for key in KEYS}
    moved = {"prompt_ids": kept["prompt_ids"], "completion_ids": kept["completion_ids"],
             "sampler_logprobs": kept["sampler_logprobs"],
             "truncated": torch.tensor(kept["truncated"], dtype=torch.bool)}  # [N_rank]
    metrics = {"perf/rank_token_imbalance_sampled": imbalance(before), "perf/rank_token_imbalance": imbalance(after),
               "perf/rank_tokens": float(after[dist.get_rank()])}
    return moved, torch.tensor(kept["advantages"], dtype=advantages.dtype, device=advantages.device), metrics
