"""Clipped surrogate policy loss of PPO/GRPO/DAPO/GSPO and the ways to average it over tokens.

For completion ``i`` with advantage ``A_i``, tokens ``t`` (mask ``m_it``) and ratio ``rho_it``::

    l_it = -min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i)  [+ kl_coef * kl_it]
    loss = aggregate(l, m)

Ratio (``RatioLevel``):

* ``token`` (PPO/GRPO/DAPO): ``rho_it = exp(logp_it - old_logp_it)``.
* ``sequence`` (GSPO, Zheng et al. 2025): ``s_i = exp(sum_t m_it (logp_it - old_logp_it) / sum_t m_it)``,
  the length-normalised sequence ratio, and per token the "GSPO-token" form
  ``rho_it = sg[s_i] * exp(logp_it - sg[logp_it])``: its value is ``s_i`` (so the clip acts on the whole
  sequence) and ``d rho_it / d logp_it = s_i``. With ``seq_mean_token_mean`` this is exactly GSPO's
  gradient ``s_i A_i mean_t grad logp_it``; with other aggregations it weights sequences by length.
  GSPO clips far tighter than PPO (paper: eps_low=3e-4, eps_high=4e-4); pass those explicitly.

Aggregation (``LossAggregation``), for ``N`` completions padded to ``T`` tokens:

* ``token_mean`` (DAPO): ``sum(l * m) / sum(m)``.
* ``seq_mean_token_mean`` (GRPO paper): ``(1/N) sum_i [sum_t l_it m_it / sum_t m_it]``.
* ``seq_mean_token_sum_norm`` (Dr. GRPO): ``sum(l * m) / (N * L)``, ``L = max_completion_length`` (``T``
  when not given).

Conventions: a completion with no unmasked token (e.g. a truncated one under DAPO overlong
filtering) contributes 0 and never NaN; in ``seq_mean_*`` it still counts in ``N`` (as in TRL).
``mask`` may be bool or float (0/1 or weights). Padding positions may hold any value, even inf.
Departure from DAPO: no dual-clip (``c``-bound for ``A < 0``); add it here as another small function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from rloop_lightning.algorithms.registry import pick

LossAggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
RatioLevel = Literal["token", "sequence"]


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    """``values * mask`` with exact zeros (not NaN) where the mask is 0, even for inf values."""
    return torch.where(mask != 0, values * mask, torch.zeros((), dtype=values.dtype, device=values.device))


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return _masked(values, mask).sum() / mask.sum().clamp(min=1)


def _token_mean(values: Tensor, mask: Tensor, max_completion_length: int | None) -> Tensor:
    return _masked_mean(values, mask)


def _seq_mean_token_mean(values: Tensor, mask: Tensor, max_completion_length: int | None) -> Tensor:
    per_sequence = _masked(values, mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
    return per_sequence.sum() / max(values.shape[0], 1)


def _seq_mean_token_sum_norm(values: Tensor, mask: Tensor, max_completion_length: int | None) -> Tensor:
    length = values.shape[-1] if max_completion_length is None else max_completion_length
    if length <= 0:
        raise ValueError(f"max_completion_length must be positive, got {length}")
    return _masked(values, mask).sum() / (max(values.shape[0], 1) * length)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def aggregate(
    values: Tensor,  # [N, T]
    mask: Tensor,  # [N, T] bool or float
    mode: LossAggregation = "token_mean",
    max_completion_length: int | None = None,
) -> Tensor:  # scalar
    """Reduce per-token values to one scalar; see the module docstring for the three modes."""
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(
            f"values and mask must both be [N, T]; got {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    fn = pick(AGGREGATIONS, mode, "loss aggregation")
    return fn(values, mask.to(values.dtype), max_completion_length)


def _token_ratio(log_ratio: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    return torch.exp(log_ratio)  # [N, T]


def _sequence_ratio(log_ratio: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)  # [N, 1]
    sequence_log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / lengths  # [N, 1], log s_i
    # value 0, gradient 1 per token: moves d rho / d logp onto each token (GSPO-token trick)
    per_token = torch.where(mask != 0, logprobs - logprobs.detach(), torch.zeros_like(logprobs))  # [N, T]
    return torch.exp(sequence_log_ratio.detach() + per_token)  # [N, T], value s_i on every token


RATIOS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": _token_ratio,
    "sequence": _sequence_ratio,
}


@dataclass
class PolicyLossOutput:
    """The loss (with grad) and detached statistics, all over unmasked tokens."""

    loss: Tensor  # scalar, differentiable
    clip_low_fraction: Tensor  # scalar: share of tokens with A < 0 and ratio < 1 - eps_low
    clip_high_fraction: Tensor  # scalar: share of tokens with A > 0 and ratio > 1 + eps_high
    ratio_mean: Tensor  # scalar: token-mean of the ratio (s_i repeated per token at sequence level)
    kl_mean: Tensor | None = None  # scalar: token-mean of the KL penalty, when one was given

    @property
    def clip_fraction(self) -> Tensor:
        return self.clip_low_fraction + self.clip_high_fraction

    def stats(self) -> dict[str, Tensor]:
        """Detached scalars for logging (``loss`` excluded)."""
        out = {
            "clip_low_fraction": self.clip_low_fraction,
            "clip_high_fraction": self.clip_high_fraction,
            "clip_fraction": self.clip_fraction,
            "ratio_mean": self.ratio_mean,
        }
        if self.kl_mean is not None:
            out["kl_mean"] = self.kl_mean
        return out


def clipped_policy_loss(
    logprobs: Tensor,  # [N, T] log pi_theta of the sampled tokens (with grad)
    old_logprobs: Tensor,  # [N, T] log pi_old (behaviour policy), no grad needed
    advantages: Tensor,  # [N] one per completion (or [N, T] per token)
    mask: Tensor,  # [N, T] 1 on completion tokens that count
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,  # DAPO clip-higher: 0.28
    ratio_level: RatioLevel = "token",
    aggregation: LossAggregation = "token_mean",
    max_completion_length: int | None = None,
    kl: Tensor | None = None,  # [N, T] per-token KL penalty, e.g. kl_penalty(...)
    kl_coef: float = 0.0,
) -> PolicyLossOutput:
    """Clipped surrogate loss to *minimise*; see the module docstring for the formula."""
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs, old_logprobs and mask must all be [N, T]; got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if not 0.0 <= clip_eps_low < 1.0 or clip_eps_high < 0.0:
        raise ValueError(
            f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low}, {clip_eps_high}"
        )
    ratio_fn = pick(RATIOS, ratio_level, "ratio level")
    mask = mask.to(logprobs.dtype)
    advantages = advantages.to(logprobs.dtype)
    advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [N, 1] or [N, T]

    log_ratio = torch.where(mask != 0, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))  # [N, T]
    ratio = ratio_fn(log_ratio, logprobs, mask)  # [N, T]
    clipped_ratio = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # [N, T]
    per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)  # [N, T]
    if kl is not None and kl_coef != 0.0:
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, aggregation, max_completion_length)

    with torch.no_grad():
        low = ((advantages < 0) & (ratio < 1.0 - clip_eps_low)).to(mask.dtype)  # [N, T]
        high = ((advantages > 0) & (ratio > 1.0 + clip_eps_high)).to(mask.dtype)  # [N, T]
        return PolicyLossOutput(
            loss=loss,
            clip_low_fraction=_masked_mean(low, mask),
            clip_high_fraction=_masked_mean(high, mask),
            ratio_mean=_masked_mean(ratio.detach(), mask),
            kl_mean=None if kl is None else _masked_mean(kl.detach(), mask),
        )


class RankTotals(NamedTuple):
    """What a mini-batch holds on all ranks of a data-parallel group together (summed over ranks)."""

    tokens: float
    """Unmasked completion tokens (the ``token_mean`` denominator)."""
    rows: float
    """Completions (the per-sequence aggregations' ``N``)."""
    ranks: float
    """Ranks in the group: DDP and FSDP average the ranks' gradients, so each rank's loss is scaled by this."""


def micro_batch_weight(mode: LossAggregation, micro_mask: Tensor, full_mask: Tensor,
                       totals: RankTotals | None = None) -> float:
    """Weight of a micro-batch's ``aggregate`` so that weighted micro losses sum to the full batch's.

    ``token_mean`` normalises by tokens, so a micro-batch weighs its share of the unmasked tokens;
    the per-sequence modes normalise by sequences, so it weighs its share of the sequences.
    (With equal-size micro-batches a plain average would bias ``token_mean`` towards short ones.)

    ``totals`` (several ranks): the share is of the mini-batch over all ranks, times the number of ranks,
    so that the ranks' averaged gradients are the gradient of the global loss (all ranks' tokens over
    their global count; the per-sequence modes over the global number of sequences), whichever rank holds
    which row. ``full_mask`` is then unused.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {sorted(AGGREGATIONS)}")
    if totals is not None:
        share = float(micro_mask.sum()) / max(totals.tokens, 1.0) if mode == "token_mean" else (
            micro_mask.shape[0] / max(totals.rows, 1.0))
        return totals.ranks * share
    if mode == "token_mean":
        return float(micro_mask.sum() / full_mask.sum().clamp(min=1))
    return micro_mask.shape[0] / max(full_mask.shape[0], 1)
