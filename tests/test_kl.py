import math

import pytest
import torch

from rloop_lightning.algorithms.kl import kl_penalty

# x = ref - logp = [0, -1, 1]
LOGPROBS = torch.tensor([[0.0, -1.0, -2.0]])
REF_LOGPROBS = torch.tensor([[0.0, -2.0, -1.0]])


def test_k1_is_log_ratio_policy_over_ref():
    # k1 = -x = [0, 1, -1]
    torch.testing.assert_close(kl_penalty(LOGPROBS, REF_LOGPROBS, "k1"), torch.tensor([[0.0, 1.0, -1.0]]))


def test_k2_is_half_squared_log_ratio():
    # k2 = x^2 / 2 = [0, 0.5, 0.5]
    torch.testing.assert_close(kl_penalty(LOGPROBS, REF_LOGPROBS, "k2"), torch.tensor([[0.0, 0.5, 0.5]]))


def test_k3_values():
    # k3 = e^x - x - 1: x=0 -> 0; x=-1 -> e^-1 = 0.367879; x=1 -> e - 2 = 0.718282
    expected = torch.tensor([[0.0, math.exp(-1.0), math.e - 2.0]])
    torch.testing.assert_close(kl_penalty(LOGPROBS, REF_LOGPROBS, "k3"), expected)
    assert kl_penalty(LOGPROBS, REF_LOGPROBS).equal(kl_penalty(LOGPROBS, REF_LOGPROBS, "k3"))


def test_k3_clamps_log_ratio():
    # x = +30 -> clamped to 20: e^20 - 21; x = -30 -> clamped to -20: e^-20 + 19
    logprobs = torch.tensor([-30.0, 0.0], requires_grad=True)
    ref = torch.tensor([0.0, -30.0])
    penalty = kl_penalty(logprobs, ref, "k3")
    torch.testing.assert_close(penalty, torch.tensor([math.exp(20) - 21, math.exp(-20) + 19]))
    penalty.sum().backward()
    assert torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad == 0).all()  # saturated beyond the clamp


def test_k1_and_k3_are_unbiased_under_policy_samples():
    torch.manual_seed(0)
    policy = torch.tensor([0.5, 0.3, 0.2])
    reference = torch.tensor([0.2, 0.3, 0.5])
    true_kl = (policy * (policy / reference).log()).sum()  # 0.5 ln2.5 - 0.2 ln2.5 = 0.274887
    samples = torch.multinomial(policy, 200_000, replacement=True)
    logprobs, ref_logprobs = policy.log()[samples], reference.log()[samples]
    for estimator in ("k1", "k3"):
        estimate = kl_penalty(logprobs, ref_logprobs, estimator).mean()
        assert abs(estimate - true_kl) < 0.01, estimator


def test_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(LOGPROBS, REF_LOGPROBS, "k4")  # type: ignore[arg-type]
