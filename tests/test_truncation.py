"""Top-k / top-p truncation against hand numbers, and against the samplers' own code."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from rloop_lightning.algorithms.chunked_logprobs import chosen_token_logprobs, logprobs_from_logits
from rloop_lightning.algorithms.truncation import truncate_logits
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.rollout.vllm import VLLMEngine, top_k_tie_rule

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


TIES = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])  # the 2nd largest logit is tied three ways


def test_exact_top_k_keeps_k_tokens_and_the_scored_tie_in_place_of_another():
    assert kept(truncate_logits(TIES, top_k=2)) == [1, 1, 1, 1, 0]  # transformers' rule: every tie
    for k in (2, 3):
        exact = kept(truncate_logits(TIES, top_k=k, top_k_ties="exact"))
        assert exact[0] == 1 and sum(exact[1:4]) == k - 1 and exact[4] == 0
    for token in (1, 2, 3):  # whichever tie the sampler drew, it is kept, and only one tie with it
        scored = truncate_logits(TIES, top_k=2, keep=torch.tensor([token]), top_k_ties="exact")
        assert kept(scored) == [1] + [int(i == token) for i in (1, 2, 3)] + [0]
    assert scored.log_softmax(-1)[0, 3].item() == pytest.approx(1 - math.log(math.exp(3) + math.exp(1)))
    with pytest.raises(ValueError, match="top_k_ties must be 'keep' or 'exact'"):
        truncate_logits(TIES, top_k=2, top_k_ties="first")


def tie_heavy_logits(rows: int = 64, vocabulary: int = 200) -> torch.Tensor:
    """Logits on a grid of 1/4 (as bf16 rounds them, coarser): dozens of ties in every row."""
    torch.manual_seed(0)
    return (torch.randn(rows, vocabulary) * 8).round() / 4


def exactly_k(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """A sampler's kept logits with exactly k per row, ties at the boundary chosen at random (the kernel's
    order is its own business: any choice must give the same log-probs)."""
    out = torch.full_like(logits, INF)
    for row, values in enumerate(logits):
        jitter = torch.rand(values.shape, generator=generator) * 1e-3  # below the 1/4 grid: reorders ties only
        chosen = torch.topk(values + jitter, k).indices
        out[row, chosen] = values[chosen]
    return out


@pytest.mark.parametrize("top_k", [5, 20])
def test_exact_ties_give_every_token_of_an_exactly_k_sampler_its_sampler_log_prob(top_k):
    """On a tie-heavy distribution, whichever k tokens an exact-k sampler kept, each of them scores the
    sampler's own log q(x) under top_k_ties='exact'; transformers' rule (ties kept) gets them wrong."""
    logits = tie_heavy_logits()
    sampler = exactly_k(logits, top_k, torch.Generator().manual_seed(1)).log_softmax(-1)  # [N, V]
    kth = torch.topk(logits, top_k).values[:, -1:]
    assert int(((logits >= kth).sum(-1) > top_k).sum()) > 10  # most rows have more ties than fit
    rows, tokens = torch.nonzero(sampler > INF, as_tuple=True)
    expected = sampler[rows, tokens]
    exact, _ = logprobs_from_logits(logits[rows], tokens, top_k=top_k, top_k_ties="exact")
    torch.testing.assert_close(exact, expected, atol=1e-6, rtol=0)
    keep_all, _ = logprobs_from_logits(logits[rows], tokens, top_k=top_k)
    assert float((keep_all - expected).abs().max()) > 0.1


@pytest.mark.parametrize("top_k, top_p", [(20, 1.0), (0, 0.8), (20, 0.7)])
def test_tied_logits_match_transformers_and_vllm_cpu_and_score_each_kept_token_as_they_do(top_k, top_p):
    """transformers' warpers and vLLM's PyTorch sampler (CPU) keep every tie at the k-th logit: the trainer's
    default rule equals them on a tie-heavy distribution, and every token they kept (top-p cuts through
    ties in sort order) scores their log q(x)."""
    logits = tie_heavy_logits()
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    vllm_ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    k = torch.full((len(logits),), top_k) if top_k else None
    p = torch.full((len(logits),), top_p) if top_p < 1 else None
    sampled_by_vllm = vllm_ops.apply_top_k_top_p_pytorch(logits.clone(), k, p)
    trainer_kept = (truncate_logits(logits, top_k, top_p) > INF).sum(-1)
    for sampler in (expected, sampled_by_vllm):
        assert torch.equal((sampler > INF).sum(-1), trainer_kept)  # which tied tokens: sort order; how many: the same
        log_q = sampler.log_softmax(-1)
        rows, tokens = torch.nonzero(log_q > INF, as_tuple=True)
        scored, _ = logprobs_from_logits(logits[rows], tokens, top_k=top_k, top_p=top_p)
        torch.testing.assert_close(scored, log_q[rows, tokens], atol=1e-6, rtol=0)


def test_chunked_log_probs_and_gradients_follow_the_exact_tie_rule():
    """A head whose rows 10..29 are one row gives 20 tokens one logit at every position: the chunked path
    with its recomputing backward equals the plain one under top_k_ties='exact'."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 40)
    with torch.no_grad():
        head.weight[10:30] = head.weight[10] * 3  # large: the tied block sits at the top-k boundary or above
        head.bias[10:30] = head.bias[10]
    hidden = torch.randn(6, 8, requires_grad=True)
    targets = torch.tensor([29, 12, 0, 29, 5, 20])
    results = []
    for chunked in (False, True):
        hidden.grad, head.weight.grad = None, None
        if chunked:
            chosen, _ = chosen_token_logprobs(hidden, head, targets, 4, top_k=5, top_k_ties="exact")
        else:
            chosen, _ = logprobs_from_logits(head(hidden), targets, top_k=5, top_k_ties="exact")
        chosen.sum().backward()
        results.append((chosen.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for plain, chunked in zip(*results):
        torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


def test_the_tie_rule_of_each_engine():
    """The Hugging Face engine keeps ties (transformers' warper); a vLLM top-k is probed: vLLM's CPU path keeps
    ties, a kernel keeping exactly k (vLLM's Triton one, CUDA) is 'exact', any other count is refused."""
    assert HFGenerateEngine().top_k_ties() == "keep"
    assert top_k_tie_rule(lambda logits, k: TopKLogitsWarper(int(k))(None, logits), "cpu") == "keep"
    assert top_k_tie_rule(lambda logits, k: exactly_k(logits, int(k), torch.Generator().manual_seed(0)), "cpu") == "exact"
    with pytest.raises(ValueError, match=r"sampling.top_k: vLLM's top-k on cpu kept 3 of 10 tokens .* Set "
                                         r"sampling.top_k: 0"):
        top_k_tie_rule(lambda logits, k: exactly_k(logits, 3, torch.Generator().manual_seed(0)), "cpu")
    vllm_ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    assert top_k_tie_rule(lambda logits, k: vllm_ops.apply_top_k_top_p(logits, k, None), "cpu") == "keep"
    assert VLLMEngine().top_k_ties() == "keep"  # vLLM's CPU build here
