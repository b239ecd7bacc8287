"""Group-relative advantages for GRPO-family algorithms (one scalar per completion).

For a prompt ``b`` with ``G`` sampled completions and rewards ``r[b, :]``::

    grpo       A[b, g] = (r[b, g] - mean_g r[b]) / (std_g r[b] + eps)      # Shao et al. 2024
    dr_grpo    A[b, g] =  r[b, g] - mean_g r[b]                            # Liu et al. 2025
    batch_std  A[b, g] = (r[b, g] - mean_g r[b]) / (std over all B*G rewards + eps)
    none       A[b, g] =  r[b, g]

Choices (where the papers leave room):

* ``std`` is the **unbiased** (Bessel-corrected, ``G - 1``) standard deviation, as ``torch.std``
  does by default and as TRL uses. For ``[[1, 0, 0, 1]]`` this is 0.5774, not 0.5.
  A group of one completion (``G == 1``) has no spread: its std is taken as 0 (not NaN),
  so ``grpo`` gives ``0 / eps = 0`` there.
* ``batch_std`` divides by the std of the **raw rewards** of the whole batch (TRL's
  ``scale_rewards="batch"``). REINFORCE++-baseline instead normalises the already centred
  advantages by their batch std; for binary rewards the two differ only in scale.
* ``eps`` defaults to 1e-4 (TRL); groups whose rewards are all equal get advantage exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from rloop_lightning.algorithms.registry import pick

AdvantageEstimator = Literal["grpo", "dr_grpo", "batch_std", "none"]


def _unbiased_std(values: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected std; 0 (instead of NaN) when fewer than two values are reduced."""
    count = values.numel() if dim is None else values.shape[dim]
    if count < 2:
        return torch.zeros_like(values.mean() if dim is None else values.mean(dim=dim, keepdim=True))
    if dim is None:
        return values.std()
    return values.std(dim=dim, keepdim=True)


def _centred(rewards: Tensor) -> Tensor:
    return rewards - rewards.mean(dim=-1, keepdim=True)  # [B, G]


def _grpo(rewards: Tensor, eps: float) -> Tensor:
    return _centred(rewards) / (_unbiased_std(rewards, dim=-1) + eps)  # [B, G] / [B, 1]


def _dr_grpo(rewards: Tensor, eps: float) -> Tensor:
    return _centred(rewards)


def _batch_std(rewards: Tensor, eps: float) -> Tensor:
    return _centred(rewards) / (_unbiased_std(rewards) + eps)  # [B, G] / scalar


def _none(rewards: Tensor, eps: float) -> Tensor:
    return rewards.clone()


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "batch_std": _batch_std,
    "none": _none,
}


def group_advantages(
    rewards: Tensor,  # [B, G]
    estimator: AdvantageEstimator = "grpo",
    eps: float = 1e-4,
) -> Tensor:  # [B, G]
    """Advantages of ``G`` completions of each of ``B`` prompts; see the module docstring."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, G], got {tuple(rewards.shape)}")
    fn = pick(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return fn(rewards, eps)
