"""Micro-batches of an update: which rows of a batch run through the model together.

Two ways to cut a batch of (prompt, completion) rows:

* a fixed count (``micro_batch_size``): consecutive rows, ``size`` at a time; every micro-batch is as
  wide as the batch's longest row, so compute and memory follow the longest completion;
* a token budget (``micro_batch_tokens``): rows sorted longest first and taken in that order while the
  micro-batch's padded size stays within the budget (its real tokens when the policy packs its rows
  into one row, ``policy.packing``). A micro-batch in generation layout
  (``[left-padded prompt | right-padded completion]``) with its all-padding columns cut runs on
  ``rows x (longest prompt + longest completion)`` positions (``padded_tokens``): that is the number
  the budget bounds, and it bounds the activation memory of a forward. Rows of similar length end up
  together, so the padding left inside a micro-batch is small, and short rows are many to a micro-batch.

The cut does not change the step's gradient: each micro-batch's loss is weighted by its share of
the mini-batch (``algorithms.micro_batch_weight``: its tokens under ``token_mean``, its rows under the
per-sequence aggregations), so the weighted sum is the mini-batch's loss whatever the cut.

On several ranks each rank cuts its own rows; ranks must run as many micro-batches (every backward
all-reduces under DDP, every forward all-gathers under FSDP), so the counts are agreed and a rank with
fewer appends empty micro-batches (``pad_to_count``), which the update runs with weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from rloop_lightning.agreement import values_of_ranks
from rloop_lightning.forwards import PolicyBatch, widen

SETTING = "micro_batch_tokens"


def padded_tokens(prompt_lengths: Sequence[int], completion_lengths: Sequence[int]) -> int:
    """Positions a micro-batch of these rows runs on: rows x (longest prompt + longest completion)."""
    if not prompt_lengths:
        return 0
    return len(prompt_lengths) * (max(prompt_lengths) + max(completion_lengths))


def check_budget(max_tokens: int, longest: int, what: str,
                 without: str = "to cut micro-batches by micro_batch_size") -> None:
    """``ValueError`` naming ``micro_batch_tokens`` when one sequence (``longest`` tokens) exceeds it (``without``:
    what null does instead, in the module's words)."""
    if longest > max_tokens:
        raise ValueError(f"{SETTING}={max_tokens} is smaller than the longest single sequence, {longest} tokens "
                         f"({what}): a micro-batch must hold at least one whole sequence. Raise {SETTING} to at "
                         f"least {longest}, or set it to null {without}")


def by_tokens(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], max_tokens: int,
              packed: bool = False) -> list[list[int]]:
    """Row indices (into the given lengths) of micro-batches whose ``padded_tokens`` (``packed``: real tokens, the
    rows run packed into one row) are at most ``max_tokens``.

    Rows are sorted by total length, longest first (ties: longer completion first, then row order),
    and added to the current micro-batch while it stays within the budget; then a new one starts.
    ``ValueError`` naming ``micro_batch_tokens`` when one row alone exceeds the budget.
    """
    if max_tokens < 1:
        raise ValueError(f"{SETTING} must be a positive number of tokens (or null), got {max_tokens}")
    totals = [p + c for p, c in zip(prompt_lengths, completion_lengths)]
    if not totals:
        return []
    longest = max(range(len(totals)), key=totals.__getitem__)
    check_budget(max_tokens, totals[longest], f"row {longest}: {prompt_lengths[longest]} prompt + "
                                              f"{completion_lengths[longest]} completion tokens")
    order = sorted(range(len(totals)), key=lambda i: (-totals[i], -completion_lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    prompt_width = completion_width = real = 0
    for row in order:
        wider_prompt = max(prompt_width, prompt_lengths[row])
        wider_completion = max(completion_width, completion_lengths[row])
        cost = real + totals[row] if packed else (len(current) + 1) * (wider_prompt + wider_completion)
        if current and cost > max_tokens:
            batches.append(current)
            current, wider_prompt, wider_completion, real = [], prompt_lengths[row], completion_lengths[row], 0
        current.append(row)
        prompt_width, completion_width, real = wider_prompt, wider_completion, real + totals[row]
    batches.append(current)
    return batches


def by_count(num_rows: int, size: int) -> list[list[int]]:
    """Consecutive row indices, ``size`` at a time (the last micro-batch may be smaller)."""
    return [list(range(start, min(start + size, num_rows))) for start in range(0, num_rows, size)]


def plan(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], size: int,
         max_tokens: Optional[int], packed: bool = False) -> list[list[int]]:
    """The micro-batches of rows with these lengths: by ``max_tokens`` when it is set, else ``size`` at a time."""
    if max_tokens is None:
        return by_count(len(prompt_lengths), size)
    return by_tokens(prompt_lengths, completion_lengths, max_tokens, packed)


def pad_to_count(batches: list[list[int]], count: int) -> list[list[int]]:
    """``batches`` followed by empty micro-batches up to ``count`` (the most any rank has)."""
    if count < len(batches):
        raise ValueError(f"cannot pad {len(batches)} micro-batches down to {count}")
    return batches + [[] for _ in range(count - len(batches))]


def padding_fraction(prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
                     batches: Sequence[Sequence[int]]) -> float:
    """Share of the positions the micro-batches run on that are padding (0 when nothing runs)."""
    run = sum(padded_tokens([prompt_lengths[i] for i in rows], [completion_lengths[i] for i in rows])
              for rows in batches)
    real = sum(prompt_lengths[i] + completion_lengths[i] for rows in batches for i in rows)
    return 1.0 - real / run if run else 0.0


@dataclass
class MicroBatching:
    """How an update cuts a ``PolicyBatch`` into micro-batches (``plan``) and runs them."""

    size: int
    """Rows per micro-batch when ``max_tokens`` is None (``micro_batch_size``)."""
    max_tokens: Optional[int] = None
    """Token budget of a micro-batch (``micro_batch_tokens``), or None for fixed counts."""
    packed: bool = False
    """Whether the rows run packed into one row (``policy.packing``): the budget counts real tokens."""

    def check_prompts(self, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
        """Before any model loads: the budget holds the longest prompt + ``max_new_tokens`` (``check_budget``)."""
        if self.max_tokens is not None and prompt_lengths:
            check_budget(self.max_tokens, max(prompt_lengths) + max_new_tokens,
                         "the longest prompt + sampling.max_new_tokens")

    def split(self, batch: PolicyBatch, rows: Optional[Tensor] = None, agree: bool = False) -> list[Tensor]:
        """Row indices of ``rows``' micro-batches (default: all rows). ``agree`` (several ranks): under a token
        budget, as many micro-batches on every rank (one all-reduce), a rank with fewer ending with empty ones."""
        rows = torch.arange(batch.input_ids.shape[0]) if rows is None else rows
        if self.max_tokens is None:
            return list(rows.split(self.size))
        parts = plan(*batch.select(rows).lengths(), self.size, self.max_tokens, self.packed)
        if agree:
            parts = pad_to_count(parts, int(max(values_of_ranks(len(parts)))))
        return [rows[torch.tensor(part, dtype=torch.long)] for part in parts]

    def micro(self, batch: PolicyBatch, rows: Tensor) -> PolicyBatch:
        """The micro-batch of ``rows`` (an empty one: the batch's first row, for a filler pass), trimmed of its
        all-padding columns under a token budget."""
        micro = batch.select(rows if len(rows) else torch.zeros(1, dtype=torch.long))
        return micro if self.max_tokens is None else micro.trimmed()

    def logprobs(self, batch: PolicyBatch, logprobs_of: Callable[[PolicyBatch], Tensor],
                 agree: bool = False) -> Tensor:  # [N, C]
        """``logprobs_of`` every micro-batch, put back in the batch's row order and width."""
        out = torch.zeros(batch.completion_mask.shape, device=batch.input_ids.device)
        for rows in self.split(batch, agree=agree):
            values = logprobs_of(self.micro(batch, rows))
            if len(rows):
                out[rows] = widen(values, out.shape[1]).to(out.dtype)
        return out
