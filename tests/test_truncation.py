"""Top-k / top-p truncation against hand numbers, and against the samplers' own code."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from rloop_lightning.algorithms.truncation import truncate_logits

# probabilities 1/8, 1/8, 1/4, 1/2: every cumulative sum is exact in binary floating point
LOGITS = torch.tensor([[math.log(1), math.log(1), math.log(2), math.log(4)]])
INF = float("-inf")


def kept(logits):
    return (logits > INF).int().tolist()[0]


def test_no_truncation_returns_the_same_tensor():
    assert truncate_logits(LOGITS) is LOGITS
    assert truncate_logits(LOGITS, top_k=0, top_p=1.0) is LOGITS


def test_top_p_boundary_hit_exactly_drops_the_token():
    # ascending cumulative probabilities 1/8, 1/4, 1/2, 1: top_p 0.75 drops those <= 0.25
    assert kept(truncate_logits(LOGITS, top_p=0.75)) == [0, 0, 1, 1]
    assert kept(truncate_logits(LOGITS, top_p=0.76)) == [0, 1, 1, 1]  # 1/4 > 0.24 stays
    assert kept(truncate_logits(LOGITS, top_p=0.875)) == [0, 1, 1, 1]  # 1/8 <= 0.125 dropped
    log_probs = truncate_logits(LOGITS, top_p=0.75).log_softmax(-1)
    assert log_probs[0, 2:].tolist() == pytest.approx([math.log(1 / 3), math.log(2 / 3)])


def test_top_p_keeps_the_most_likely_token_at_least():
    assert kept(truncate_logits(LOGITS, top_p=1e-6)) == [0, 0, 0, 1]


def test_top_k_keeps_ties_and_k_at_the_vocabulary_size_keeps_all():
    assert kept(truncate_logits(LOGITS, top_k=1)) == [0, 0, 0, 1]
    assert kept(truncate_logits(LOGITS, top_k=3)) == [1, 1, 1, 1]  # the 3rd largest ties with the 4th
    assert kept(truncate_logits(LOGITS, top_k=4)) == [1, 1, 1, 1]
    assert kept(truncate_logits(LOGITS, top_k=9)) == [1, 1, 1, 1]


def test_top_k_then_top_p_over_the_kept_mass():
    # top-k 2 leaves 1/3, 2/3; top-p 0.5 then drops 1/3 (<= 0.5)
    assert kept(truncate_logits(LOGITS, top_k=2, top_p=0.5)) == [0, 0, 0, 1]
    assert kept(truncate_logits(LOGITS, top_k=2, top_p=0.7)) == [0, 0, 1, 1]


def test_scored_tokens_are_never_dropped():
    logits = LOGITS.expand(3, 4)
    out = truncate_logits(logits, top_p=0.75, keep=torch.tensor([0, 2, 3]))
    assert (out > INF).int().tolist() == [[1, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="top_p must be in"):
        truncate_logits(LOGITS, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        truncate_logits(LOGITS, top_k=-1)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (20, 1.0), (20, 0.8), (5, 0.5)])
def test_matches_transformers_warpers_and_vllm(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(16, 300) * 3
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(truncate_logits(logits, top_k, top_p), expected)
    vllm_ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    k = torch.full((16,), top_k) if top_k else None
    p = torch.full((16,), top_p) if top_p < 1 else None
    assert torch.equal(truncate_logits(logits, top_k, top_p),
                       vllm_ops.apply_top_k_top_p_pytorch(logits.clone(), k, p))
