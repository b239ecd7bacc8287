"""The settings of a GRPO phase's objective: the policy-gradient loss, the sampler/trainer importance
correction, truncated completions; and the reward settings' check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from rloop_lightning.algorithms import AdvantageEstimator, KLEstimator, LossAggregation, RatioLevel
from rloop_lightning.algorithms.importance import ImportanceLevel, ImportanceMode


@dataclass
class LossSettings:
    """The policy-gradient objective. Defaults: GRPO advantages, DAPO token-mean, symmetric clip."""

    advantage: AdvantageEstimator = "grpo"
    """Group advantage estimator (``rloop_lightning.algorithms.advantages``): ``pass_at_k`` is pass@k training."""
    pass_k: int = 4
    """k of ``advantage: pass_at_k``; at most ``num_generations``."""
    aggregation: LossAggregation = "token_mean"
    """How token losses become one number: ``token_mean`` (DAPO), ``seq_mean_token_mean`` (GRPO) or
    ``seq_mean_token_sum_norm`` (Dr.GRPO)."""
    clip_eps_low: float = 0.2
    """Lower clip of the ratio: 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """Upper clip of the ratio: 1 + clip_eps_high (DAPO's clip-higher: 0.28)."""
    ratio_level: RatioLevel = "token"
    """Importance ratio per token, or per sequence (``sequence``: GSPO)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference policy (off in DAPO and Dr.GRPO)."""
    kl_estimator: KLEstimator = "k3"
    """KL estimator (``rloop_lightning.algorithms.kl``)."""


@dataclass
class ImportanceSettings:
    """Truncated importance sampling for sampler/trainer mismatch (vLLM): tokens are reweighted by
    min(pi_old / mu_sampler, cap) (``truncate``) or dropped above ``cap`` (``mask``).
    ``enabled=None`` follows the engine (on for vLLM, off for Hugging Face generate)."""

    enabled: Optional[bool] = None
    """On, off, or None: follow the engine."""
    level: ImportanceLevel = "token"
    """Weights per token, or one per sequence."""
    mode: ImportanceMode = "truncate"
    """``truncate`` caps weights at ``cap``; ``mask`` drops tokens above it (weight 1 below);
    ``ratio_mask`` drops tokens above it and weights the others by their ratio (AReaL's decoupled PPO)."""
    cap: float = 2.0
    """The largest weight kept."""


@dataclass
class OverlongSettings:
    """Completions that hit ``max_new_tokens``: ``mask`` drops their tokens from the loss;
    ``soft_penalty`` subtracts DAPO's length penalty over the last ``buffer_length`` tokens."""

    mode: Literal["none", "mask", "soft_penalty"] = "none"
    """What happens to truncated completions."""
    buffer_length: int = 4
    """With ``soft_penalty``: the penalty grows linearly over this many tokens before the limit."""
    penalty_factor: float = 1.0
    """With ``soft_penalty``: the penalty at the limit."""


def check_reward_settings(reward_workers: int, reward_timeout: float, max_bad_steps: int) -> None:
    if reward_workers < 0 or not reward_timeout > 0 or max_bad_steps < 1:
        raise ValueError(f"need reward_workers >= 0, reward_timeout > 0 and max_bad_steps >= 1; got "
                         f"{reward_workers}, {reward_timeout}, {max_bad_steps}")
