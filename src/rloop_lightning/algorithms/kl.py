"""Per-token estimators of KL(pi_theta || pi_ref) from log-probs of sampled tokens (Schulman 2020).

With ``x = log pi_ref(y_t) - log pi_theta(y_t)`` (the log-ratio ref/policy of the sampled token)::

    k1 = -x                      = log pi_theta - log pi_ref     (unbiased, high variance, can be < 0)
    k2 = x**2 / 2                                                (biased, low variance, >= 0)
    k3 = exp(x) - x - 1                                          (unbiased, low variance, >= 0)

``k3`` is what DeepSeekMath's GRPO adds to its loss (``beta * D_KL``). The estimators are unbiased
only when ``y`` is sampled from ``pi_theta``; in the loss they are used as per-token penalties
(the gradient of ``k3`` is not the gradient of the true KL, as in the GRPO paper and TRL).

Departure for stability: in ``k3`` the log-ratio ``x`` is clamped to ``[-log_ratio_clamp,
log_ratio_clamp]`` (default 20, so ``exp(x)`` stays finite in fp16/bf16 and fp32) before the
exponential; the penalty saturates (and its gradient is 0) beyond the clamp. ``k1``/``k2`` are
polynomial in ``x`` and are not clamped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from rloop_lightning.algorithms.registry import pick

KLEstimator = Literal["k1", "k2", "k3"]


def _k1(log_ratio: Tensor, log_ratio_clamp: float) -> Tensor:
    return -log_ratio


def _k2(log_ratio: Tensor, log_ratio_clamp: float) -> Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: Tensor, log_ratio_clamp: float) -> Tensor:
    log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    return torch.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable[[Tensor, float], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(
    logprobs: Tensor,  # [N, T] log pi_theta of the sampled tokens
    ref_logprobs: Tensor,  # [N, T] log pi_ref of the same tokens
    estimator: KLEstimator = "k3",
    log_ratio_clamp: float = 20.0,
) -> Tensor:  # [N, T]
    """Per-token KL penalty; mask and aggregate it like the policy loss (padding is not masked here)."""
    fn = pick(KL_ESTIMATORS, estimator, "KL estimator")
    return fn(ref_logprobs - logprobs, log_ratio_clamp)  # x = log(pi_ref / pi_theta), [N, T]
