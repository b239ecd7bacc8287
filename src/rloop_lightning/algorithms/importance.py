"""Importance-sampling correction for a sampler that is not the trainer (vLLM vs. the training model).

The rollout engine samples token ``y_t`` with log-prob ``log mu_t`` (its own kernels, precision and,
under QLoRA, its own bf16 base), while the loss assumes the behaviour policy is the trainer's
``log pi_old_t``. Truncated importance sampling (TIS, Yao et al. 2025, "Your efficient RL framework
secretly brings you off-policy RL training") reweights each token's loss by::

    r_t = exp(log pi_old_t - log mu_t)              level="token"
    r_t = exp(sum_s m_s (log pi_old_s - log mu_s))  level="sequence" (the same r_i on every token)
    w_t = min(r_t, cap)                             mode="truncate" (TIS)
    w_t = 1 if r_t <= cap else 0                    mode="mask"     (masked IS: drop the token)
    w_t = r_t if r_t <= cap else 0                  mode="ratio_mask" (AReaL's behaviour weight)

Weights are constants (no gradient) and 0 on padding. Ratios are compared in log space, so a
sequence ratio that would overflow ``exp`` is still exactly ``cap`` (truncate) or 0 (mask).
Departure from some implementations: mask mode has no lower bound (tokens with tiny ratios are
kept); the sequence ratio is the full likelihood ratio, not its per-token geometric mean.

Stale rollouts (asynchronous sampling): ``pi_old`` is the *proximal* policy, recomputed by the
trainer from its current weights (the detached log-probs of the step's first forward, or of the
pass before the updates when a batch is reused), and ``mu`` is the older policy that sampled. The
GRPO loss with these weights is AReaL's decoupled PPO objective (Fu et al. 2025, arXiv 2505.24298)::

    J = E_t[ w_t * min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) ],   r_t = pi_theta_t / pi_prox_t,
    w_t = min(pi_prox_t / mu_t, cap)   (AReaL drops the token instead above the cap: mode="ratio_mask")

i.e. the clip is around the proximal policy, not the behaviour one, and the behaviour policy only
enters through the capped weight (``behaviour_weighted_advantages``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from rloop_lightning.algorithms.registry import pick

ImportanceLevel = Literal["token", "sequence"]
ImportanceMode = Literal["truncate", "mask", "ratio_mask"]


def _token_log_ratio(difference: Tensor) -> Tensor:
    return difference  # [N, T]


def _sequence_log_ratio(difference: Tensor) -> Tensor:
    return difference.sum(-1, keepdim=True).expand_as(difference)  # [N, T], log r_i on every token


def _truncate(log_ratio: Tensor, log_cap: float) -> Tensor:
    return torch.exp(log_ratio.clamp(max=log_cap))


def _mask(log_ratio: Tensor, log_cap: float) -> Tensor:
    return (log_ratio <= log_cap).to(log_ratio.dtype)


def _ratio_or_drop(log_ratio: Tensor, log_cap: float) -> Tensor:
    return torch.where(log_ratio <= log_cap, torch.exp(log_ratio.clamp(max=log_cap)), torch.zeros_like(log_ratio))


LEVELS: dict[str, Callable[[Tensor], Tensor]] = {"token": _token_log_ratio, "sequence": _sequence_log_ratio}
MODES: dict[str, Callable[[Tensor, float], Tensor]] = {"truncate": _truncate, "mask": _mask,
                                                      "ratio_mask": _ratio_or_drop}


def truncated_importance_weights(
    trainer_logprobs: Tensor,  # [N, T] log pi_old of the sampled tokens under the trainer
    sampler_logprobs: Tensor,  # [N, T] log mu of the same tokens as reported by the sampler
    mask: Tensor,  # [N, T] 1 on completion tokens
    level: ImportanceLevel = "token",
    mode: ImportanceMode = "truncate",
    cap: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token weights [N, T] (detached, 0 on padding) and statistics of the mismatch.

    Stats (0-d tensors over unmasked tokens): ``logprob_diff_mean`` / ``logprob_diff_max`` of
    ``|log pi_old - log mu|``, ``weight_mean``, and ``capped_fraction``, the share of tokens whose
    ratio exceeded ``cap`` (truncated, or dropped in mask mode).
    """
    if trainer_logprobs.shape != sampler_logprobs.shape or trainer_logprobs.shape != mask.shape:
        raise ValueError(
            f"trainer_logprobs, sampler_logprobs and mask must have one shape [N, T]; got "
            f"{tuple(trainer_logprobs.shape)}, {tuple(sampler_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if trainer_logprobs.dim() != 2:
        raise ValueError(f"log-probs must be [N, T], got {tuple(trainer_logprobs.shape)}")
    if cap <= 0:
        raise ValueError(f"cap must be positive, got {cap}")
    log_ratio_fn, weight_fn = pick(LEVELS, level, "level"), pick(MODES, mode, "mode")
    with torch.no_grad():
        valid = mask != 0
        zero = torch.zeros((), dtype=torch.float32, device=trainer_logprobs.device)
        difference = torch.where(valid, trainer_logprobs.float() - sampler_logprobs.float(), zero)  # [N, T]
        log_ratio = log_ratio_fn(difference)  # [N, T]
        log_cap = math.log(cap)
        weights = torch.where(valid, weight_fn(log_ratio, log_cap), zero)  # [N, T]
        count = valid.sum().clamp(min=1)
        absolute = difference.abs()
        stats = {
            "logprob_diff_mean": absolute.sum() / count,
            "logprob_diff_max": absolute.max() if absolute.numel() else zero,
            "weight_mean": weights.sum() / count,
            "capped_fraction": (valid & (log_ratio > log_cap)).sum() / count,
        }
    return weights, stats


def behaviour_weighted_advantages(
    advantages: Tensor,  # [N] one advantage per completion
    proximal_logprobs: Tensor,  # [N, T] log pi_prox: the trainer's, recomputed
    behaviour_logprobs: Tensor,  # [N, T] log mu: the sampler's
    mask: Tensor,  # [N, T]
    level: ImportanceLevel = "token",
    mode: ImportanceMode = "truncate",
    cap: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token advantages [N, T] of the decoupled objective, ``A_i * w_it``, and the weights' statistics:
    handed to the clipped surrogate (ratio against the proximal policy), they give
    ``w * min(r A, clip(r) A)`` (``w >= 0`` moves inside the min)."""
    weights, stats = truncated_importance_weights(proximal_logprobs, behaviour_logprobs, mask, level, mode, cap)
    return advantages[:, None] * weights, stats


def pad_logprobs(rows: Sequence[Sequence[float]], width: int | None = None) -> Tensor:
    """Right-pad ragged per-token log-probs with 0 into [N, width] (the completion columns of a batch)."""
    width = max((len(row) for row in rows), default=0) if width is None else width
    padded = torch.zeros((len(rows), width), dtype=torch.float32)
    for index, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {index} has {len(row)} log-probs, more than width={width}")
        if row:
            padded[index, : len(row)] = torch.as_tensor(row, dtype=torch.float32)
    return padded
