"""Group-relative advantages for GRPO-family algorithms (one scalar per completion).

For a prompt ``b`` with ``G`` sampled completions and rewards ``r[b, :]``::

    grpo       A[b, g] = (r[b, g] - mean_g r[b]) / (std_g r[b] + eps)      # Shao et al. 2024
    dr_grpo    A[b, g] =  r[b, g] - mean_g r[b]                            # Liu et al. 2025
    batch_std  A[b, g] = (r[b, g] - mean_g r[b]) / (std over all B*G rewards + eps)
    none       A[b, g] =  r[b, g]
    pass_at_k  A[b, g] = (V_k[b, g] - R_k[b]) / (S_k[b] + eps)                  # Chen et al. 2025

``pass_at_k`` optimises the best of ``k`` samples instead of each sample (pass@k training). Over
the C(G, k) subsets of size k of a group, R_k is the mean and S_k the (population) std of the
subset's largest reward; V_k[b, g] is the mean largest reward of the subsets that contain
completion g. With binary rewards and c correct of G, R_k = 1 - C(G-c, k)/C(G, k) (the unbiased
pass@k), a correct completion has V_k = 1 and a wrong one V_k = 1 - C(G-c-1, k-1)/C(G-1, k-1):
a wrong sample next to a correct one is penalised less, so exploration is not punished. k = 1 is
GRPO with the population std.

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

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from rloop_lightning.algorithms.registry import pick

AdvantageEstimator = Literal["grpo", "dr_grpo", "batch_std", "none", "pass_at_k"]


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


def _grpo(rewards: Tensor, eps: float, k: int) -> Tensor:
    return _centred(rewards) / (_unbiased_std(rewards, dim=-1) + eps)  # [B, G] / [B, 1]


def _dr_grpo(rewards: Tensor, eps: float, k: int) -> Tensor:
    return _centred(rewards)


def _batch_std(rewards: Tensor, eps: float, k: int) -> Tensor:
    return _centred(rewards) / (_unbiased_std(rewards) + eps)  # [B, G] / scalar


def _none(rewards: Tensor, eps: float, k: int) -> Tensor:
    return rewards.clone()


def best_of_k_statistics(rewards: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact statistics of the largest reward of a uniformly drawn k-subset of each group.

    Returns ``(R [B, 1], S [B, 1], V [B, G])``: mean and population std over subsets, and per
    completion the mean over the subsets that contain it (see the module docstring).
    """
    groups, size = rewards.shape
    if not 1 <= k <= size:
        raise ValueError(f"pass_at_k needs 1 <= k <= G = {size}, got k = {k}")
    ordered = rewards.sort(dim=-1).values
    # the j-th smallest (1-based) is a subset's largest in C(j - 1, k - 1) of the C(G, k) subsets
    weights = rewards.new_tensor([math.comb(j - 1, k - 1) / math.comb(size, k) for j in range(1, size + 1)])
    mean = (ordered * weights).sum(-1, keepdim=True)
    spread = ((ordered ** 2 * weights).sum(-1, keepdim=True) - mean ** 2).clamp(min=0).sqrt()
    if k == 1:
        return mean, spread, rewards.clone()
    others = rewards.unsqueeze(1).expand(groups, size, size)[:, ~torch.eye(size, dtype=torch.bool)]
    others = others.view(groups, size, size - 1).sort(dim=-1).values  # [B, G, G - 1]
    # with g in the subset, the other k - 1 are drawn from G - 1: the m-th smallest is their largest
    # in C(m - 1, k - 2) of C(G - 1, k - 1) draws
    other_weights = rewards.new_tensor([math.comb(m - 1, k - 2) / math.comb(size - 1, k - 1) for m in range(1, size)])
    values = (torch.maximum(others, rewards.unsqueeze(-1)) * other_weights).sum(-1)
    return mean, spread, values


def pass_at_k_advantages(rewards: Tensor, eps: float, k: int) -> Tensor:
    """``(V_k - R_k) / (S_k + eps)``: pass@k (best-of-k) training advantages, [B, G]."""
    mean, spread, values = best_of_k_statistics(rewards, k)
    return (values - mean) / (spread + eps)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, float, int], Tensor]] = {  # fn(rewards, eps, k)
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "batch_std": _batch_std,
    "none": _none,
    "pass_at_k": pass_at_k_advantages,
}


def group_advantages(
    rewards: Tensor,  # [B, G]
    estimator: AdvantageEstimator = "grpo",
    eps: float = 1e-4,
    k: int = 4,
) -> Tensor:  # [B, G]
    """Advantages of ``G`` completions of each of ``B`` prompts; see the module docstring.
    ``k`` is used by ``pass_at_k`` only."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, G], got {tuple(rewards.shape)}")
    fn = pick(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return fn(rewards, eps, k)
