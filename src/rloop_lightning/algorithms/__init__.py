"""The maths of RLVR, free of Lightning: advantages, policy losses, KL, DAPO sampling, metrics, log-probs."""

from rloop_lightning.algorithms.advantages import AdvantageEstimator, group_advantages
from rloop_lightning.algorithms.chunked_logprobs import chosen_token_logprobs, logprobs_from_logits
from rloop_lightning.algorithms.kl import KLEstimator, kl_penalty
from rloop_lightning.algorithms.metrics import (
    avg_at_n,
    distinct_count,
    mean_pass_at_k,
    ngram_similarity,
    pass_at_k,
)
from rloop_lightning.algorithms.policy_loss import (
    LossAggregation,
    PolicyLossOutput,
    RankTotals,
    RatioLevel,
    aggregate,
    clipped_policy_loss,
    micro_batch_weight,
)
from rloop_lightning.algorithms.sampling import (
    DynamicSample,
    DynamicSamplingBuffer,
    DynamicSamplingSignal,
    dynamic_sampling_signal,
    overlong_mask,
    select_informative_groups,
    soft_overlong_penalty,
    zero_variance_groups,
)

__all__ = [
    "AdvantageEstimator",
    "DynamicSample",
    "DynamicSamplingBuffer",
    "DynamicSamplingSignal",
    "KLEstimator",
    "LossAggregation",
    "PolicyLossOutput",
    "RankTotals",
    "RatioLevel",
    "aggregate",
    "avg_at_n",
    "chosen_token_logprobs",
    "clipped_policy_loss",
    "micro_batch_weight",
    "distinct_count",
    "dynamic_sampling_signal",
    "group_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "mean_pass_at_k",
    "ngram_similarity",
    "overlong_mask",
    "pass_at_k",
    "select_informative_groups",
    "soft_overlong_penalty",
    "zero_variance_groups",
]
