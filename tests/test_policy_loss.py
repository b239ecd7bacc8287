import math

import pytest
import torch

from rloop_lightning.algorithms.advantages import group_advantages
from rloop_lightning.algorithms.policy_loss import aggregate, clipped_policy_loss, micro_batch_weight

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


def test_token_mean():
    # (1 + 2 + 3 + 4) / 4 tokens = 2.5
    torch.testing.assert_close(aggregate(VALUES, MASK, "token_mean"), torch.tensor(2.5))


def test_seq_mean_token_mean():
    # per sequence: 6 / 3 = 2 and 4 / 1 = 4 -> (2 + 4) / 2 = 3
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq_mean_token_mean"), torch.tensor(3.0))


def test_seq_mean_token_sum_norm():
    # 10 / (N=2 * T=3) = 1.6667; with max_completion_length 5: 10 / (2 * 5) = 1
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq_mean_token_sum_norm"), torch.tensor(10 / 6))
    torch.testing.assert_close(
        aggregate(VALUES, MASK.float(), "seq_mean_token_sum_norm", 5), torch.tensor(1.0)
    )


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_mean", 2.0),  # (1 + 3) / 2 tokens
        ("seq_mean_token_mean", 1.0),  # (4 / 2 + 0) / 2 sequences: the empty one counts as 0 in N
        ("seq_mean_token_sum_norm", 1.0),  # 4 / (2 * 2)
    ],
)
def test_zero_length_sequence_and_nonfinite_padding(mode, expected):
    values = torch.tensor([[1.0, 3.0], [math.nan, math.inf]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    result = aggregate(values, mask, mode)
    torch.testing.assert_close(result, torch.tensor(expected))
    result.backward()
    assert torch.isfinite(values.grad).all() and (values.grad[1] == 0).all()


def test_all_masked_is_zero():
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        assert aggregate(torch.ones(2, 3), torch.zeros(2, 3), mode).item() == 0.0


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(VALUES, MASK, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        aggregate(VALUES, MASK[:, :2])


def _clip_case():
    # eps_low 0.2 -> lower bound 0.8; eps_high 0.28 -> upper bound 1.28
    # seq 0, A=+1: ratios [1.0, 1.5, 1.2, 0.5]; 1.5 > 1.28 -> high clip; 0.5 stays unclipped (min picks it)
    # seq 1, A=-1: ratios [0.7, 0.9, 1.5, pad]; 0.7 < 0.8 -> low clip; 1.5 unclipped (A < 0)
    ratios = torch.tensor([[1.0, 1.5, 1.2, 0.5], [0.7, 0.9, 1.5, 1.0]])
    logprobs = ratios.log().requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    return logprobs, torch.zeros(2, 4), torch.tensor([1.0, -1.0]), mask


def test_token_clip_fractions_loss_and_gradient():
    logprobs, old, advantages, mask = _clip_case()
    out = clipped_policy_loss(logprobs, old, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    # 7 masked tokens, one clipped from below, one from above
    torch.testing.assert_close(out.clip_low_fraction, torch.tensor(1 / 7))
    torch.testing.assert_close(out.clip_high_fraction, torch.tensor(1 / 7))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(2 / 7))
    # mean ratio: (1 + 1.5 + 1.2 + 0.5 + 0.7 + 0.9 + 1.5) / 7 = 7.3 / 7
    torch.testing.assert_close(out.ratio_mean, torch.tensor(7.3 / 7))
    # per-token loss: seq 0: -[1.0, 1.28, 1.2, 0.5] = -3.98
    #                 seq 1: max(r, clip r) = [0.8, 0.9, 1.5] = 3.2  -> -0.78 / 7
    torch.testing.assert_close(out.loss, torch.tensor(-0.78 / 7))
    assert out.kl_mean is None and set(out.stats()) == {
        "clip_low_fraction",
        "clip_high_fraction",
        "clip_fraction",
        "ratio_mean",
    }
    assert not out.clip_low_fraction.requires_grad and out.loss.requires_grad
    out.loss.backward()
    # d(-A r)/d logp = -A r where unclipped, 0 where clipped or masked; / 7 tokens
    expected = torch.tensor([[-1.0, 0.0, -1.2, -0.5], [0.0, 0.9, 1.5, 0.0]]) / 7
    torch.testing.assert_close(logprobs.grad, expected)


def test_other_clip_bound_and_kl_term():
    logprobs, old, advantages, mask = _clip_case()
    kl = torch.full((2, 4), 2.0)
    kl[1, 3] = math.inf  # padding
    out = clipped_policy_loss(logprobs, old, advantages, mask, clip_eps_high=0.25, kl=kl, kl_coef=0.1)
    # upper bound 1.25: still 1 high-clipped token (1.5); loss becomes
    # seq 0: -[1.0, 1.25, 1.2, 0.5] = -3.95, seq 1: +3.2 -> -0.75 / 7, plus 0.1 * 2 from the KL term
    torch.testing.assert_close(out.clip_high_fraction, torch.tensor(1 / 7))
    torch.testing.assert_close(out.loss, torch.tensor(-0.75 / 7 + 0.2))
    torch.testing.assert_close(out.kl_mean, torch.tensor(2.0))
    assert "kl_mean" in out.stats()


def test_sequence_level_ratio_gspo():
    # log-ratios: seq 0 [0.1, 0.2, 0.3] -> mean 0.2, s0 = e^0.2 = 1.221403
    #             seq 1 [0.0, -0.6, pad 5.0] -> mean -0.3, s1 = e^-0.3 = 0.740818
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.6, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([1.0, -1.0])
    s0, s1 = math.exp(0.2), math.exp(-0.3)
    out = clipped_policy_loss(
        logprobs, old, advantages, mask, 0.2, 0.28, ratio_level="sequence", aggregation="seq_mean_token_mean"
    )
    # s0 < 1.28 unclipped; s1 < 0.8 with A < 0 -> its 2 tokens low-clipped out of 5
    torch.testing.assert_close(out.ratio_mean, torch.tensor((3 * s0 + 2 * s1) / 5))
    torch.testing.assert_close(out.clip_low_fraction, torch.tensor(2 / 5))
    torch.testing.assert_close(out.clip_high_fraction, torch.tensor(0.0))
    # loss: (-s0 + 0.8) / 2 = -0.2107014
    torch.testing.assert_close(out.loss, torch.tensor((-s0 + 0.8) / 2))
    out.loss.backward()
    # GSPO gradient: -(1/2) A_0 s0 (1/3) per token of seq 0; seq 1 clipped -> 0
    expected = torch.tensor([[-s0 / 6] * 3, [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)

    # eps_high 0.2: s0 = 1.2214 > 1.2 -> its 3 tokens high-clipped
    out = clipped_policy_loss(logprobs, old, advantages, mask, 0.2, 0.2, ratio_level="sequence")
    torch.testing.assert_close(out.clip_high_fraction, torch.tensor(3 / 5))


def _toy_on_policy():
    torch.manual_seed(0)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]])  # [B=2, G=4]
    advantages = group_advantages(rewards, "dr_grpo").flatten()  # [N=8]
    logprobs = (-torch.rand(8, 5) * 3).requires_grad_(True)  # [N, T]
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 3, 4])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()  # [N, T]
    return logprobs, advantages, mask


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_on_policy_gradient_equals_reinforce_with_group_mean_baseline(ratio_level):
    logprobs, advantages, mask = _toy_on_policy()
    out = clipped_policy_loss(
        logprobs,
        logprobs.detach(),
        advantages,
        mask,
        ratio_level=ratio_level,
        aggregation="seq_mean_token_mean",
    )
    assert out.clip_fraction.item() == 0.0 and out.ratio_mean.item() == 1.0
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    # REINFORCE: -(1/N) sum_i A_i mean_t logp_it
    reinforce = -(advantages * (logprobs * mask).sum(-1) / mask.sum(-1)).mean()
    (expected,) = torch.autograd.grad(reinforce, logprobs)
    assert torch.allclose(grad, expected)


def test_on_policy_dr_grpo_aggregation_gradient():
    logprobs, advantages, mask = _toy_on_policy()
    out = clipped_policy_loss(
        logprobs,
        logprobs.detach(),
        advantages,
        mask,
        aggregation="seq_mean_token_sum_norm",
        max_completion_length=8,
    )
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    # Dr. GRPO: -(1 / (N L)) sum_i A_i sum_t logp_it, with L = 8
    expected = -advantages[:, None] * mask / (8 * 8)
    assert torch.allclose(grad, expected)


def test_per_token_advantages_broadcast_like_per_sequence():
    logprobs, old, advantages, mask = _clip_case()
    a = clipped_policy_loss(logprobs, old, advantages, mask).loss
    b = clipped_policy_loss(logprobs, old, advantages[:, None].expand(2, 4), mask).loss
    torch.testing.assert_close(a, b)


def test_policy_loss_errors():
    logprobs, old, advantages, mask = _clip_case()
    with pytest.raises(ValueError, match="unknown ratio level"):
        clipped_policy_loss(logprobs, old, advantages, mask, ratio_level="word")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_eps_low"):
        clipped_policy_loss(logprobs, old, advantages, mask, clip_eps_low=1.0)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        clipped_policy_loss(logprobs, old[:, :2], advantages, mask)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_weights_recombine_to_full_batch_loss(mode):
    # 4 sequences of uneven length split 1 + 3: the weighted micro losses must equal the full loss
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    full = aggregate(values, mask, mode, max_completion_length=3)
    parts = [slice(0, 1), slice(1, 4)]
    recombined = sum(
        micro_batch_weight(mode, mask[p], mask) * aggregate(values[p], mask[p], mode, max_completion_length=3)
        for p in parts
    )
    assert torch.allclose(recombined, full)
    # token_mean by hand: 45 / 9 = 5; weights 3/9 and 6/9
    if mode == "token_mean":
        assert full.item() == pytest.approx(5.0)
        assert micro_batch_weight(mode, mask[:1], mask) == pytest.approx(3 / 9)
