import math

import pytest
import torch

from rloop_lightning.algorithms.importance import pad_logprobs, truncated_importance_weights

TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -1.0, float("-inf")]])  # padding may hold anything
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# trainer - sampler on real tokens: [[0.5, -1.0, 0.0], [0.0, -2.0, pad]]


def test_token_truncate():
    weights, stats = truncated_importance_weights(TRAINER, SAMPLER, MASK, "token", "truncate", cap=1.5)
    expected = torch.tensor([[1.5, math.exp(-1.0), 1.0], [1.0, math.exp(-2.0), 0.0]])  # exp(0.5)=1.65 -> 1.5
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(stats["logprob_diff_mean"], torch.tensor(3.5 / 5))  # (0.5 + 1 + 0 + 0 + 2) / 5
    torch.testing.assert_close(stats["logprob_diff_max"], torch.tensor(2.0))
    torch.testing.assert_close(stats["capped_fraction"], torch.tensor(1 / 5))
    torch.testing.assert_close(stats["weight_mean"], expected.sum() / 5)


def test_token_mask():
    weights, stats = truncated_importance_weights(TRAINER, SAMPLER, MASK, "token", "mask", cap=1.5)
    torch.testing.assert_close(weights, torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(stats["weight_mean"], torch.tensor(4 / 5))


def test_sequence_level_uses_the_whole_completion_ratio():
    weights, _ = truncated_importance_weights(TRAINER, SAMPLER, MASK, "sequence", "truncate", cap=2.0)
    # row 0: exp(0.5 - 1 + 0) = exp(-0.5) on each token; row 1: exp(0 - 2) on its 2 tokens, 0 on padding
    expected = torch.tensor([[math.exp(-0.5)] * 3, [math.exp(-2.0), math.exp(-2.0), 0.0]])
    torch.testing.assert_close(weights, expected)


def test_sequence_ratio_that_overflows_exp_is_exactly_capped_or_masked():
    trainer = torch.tensor([[0.0, 0.0]])
    sampler = torch.tensor([[-500.0, -500.0]])  # ratio exp(1000) overflows float32
    mask = torch.ones(1, 2)
    truncated, stats = truncated_importance_weights(trainer, sampler, mask, "sequence", "truncate", cap=2.0)
    torch.testing.assert_close(truncated, torch.tensor([[2.0, 2.0]]))
    assert stats["capped_fraction"] == 1.0
    masked, _ = truncated_importance_weights(trainer, sampler, mask, "sequence", "mask", cap=2.0)
    torch.testing.assert_close(masked, torch.zeros(1, 2))


def test_weights_carry_no_gradient():
    trainer = TRAINER.clone().requires_grad_(True)
    weights, _ = truncated_importance_weights(trainer, SAMPLER, MASK)
    assert not weights.requires_grad


def test_identical_logprobs_give_unit_weights():
    weights, stats = truncated_importance_weights(TRAINER, TRAINER, MASK, "token", "truncate")
    torch.testing.assert_close(weights, MASK.float())
    assert stats["logprob_diff_max"] == 0.0 and stats["capped_fraction"] == 0.0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="one shape"):
        truncated_importance_weights(TRAINER, SAMPLER[:, :2], MASK)
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(TRAINER, SAMPLER, MASK, cap=0.0)
    with pytest.raises(ValueError, match="unknown level"):
        truncated_importance_weights(TRAINER, SAMPLER, MASK, level="word")


def test_pad_logprobs():
    padded = pad_logprobs([[-1.0, -2.0], [-0.5]], width=3)
    torch.testing.assert_close(padded, torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]))
    assert pad_logprobs([[-1.0], []]).shape == (2, 1)
    with pytest.raises(ValueError, match="more than width"):
        pad_logprobs([[-1.0, -2.0]], width=1)


@pytest.mark.parametrize("mode, weights, expected", [("truncate", [1.25, 2.0], -1.95), ("ratio_mask", [1.25, 0.0], -0.75),
                                                     ("mask", [1.0, 0.0], -0.6)])
def test_decoupled_objective_with_stale_samples_matches_hand_computation(mode, weights, expected):
    """AReaL's decoupled PPO on one stale completion of two tokens, A = 1, eps 0.2, cap 2:
    token 1: pi_theta 0.6, pi_prox 0.5, mu 0.4: r = 1.2 (the clip edge), w = 1.25 -> -1.5;
    token 2: pi_theta 0.3, pi_prox 0.2, mu 0.05: r = 1.5 clipped to 1.2, pi_prox/mu = 4 -> w = 2 (truncate:
    -2.4) or 0 (ratio_mask, AReaL's: dropped). Token mean over the 2 tokens: -1.95, or -0.75; masked IS weights
    the kept token 1 (-1.2 / 2 = -0.6)."""
    from rloop_lightning.algorithms import clipped_policy_loss
    from rloop_lightning.algorithms.importance import behaviour_weighted_advantages

    log = lambda *p: torch.tensor([p]).log()  # noqa: E731
    current, proximal, behaviour = log(0.6, 0.3), log(0.5, 0.2), log(0.4, 0.05)
    mask = torch.ones(1, 2)
    advantages, stats = behaviour_weighted_advantages(torch.tensor([1.0]), proximal, behaviour, mask, mode=mode, cap=2.0)
    torch.testing.assert_close(advantages, torch.tensor([weights]))
    assert float(stats["capped_fraction"]) == pytest.approx(0.5)
    out = clipped_policy_loss(current, proximal, advantages, mask, 0.2, 0.2, "token", "token_mean")
    assert float(out.loss) == pytest.approx(expected, abs=1e-6)


def test_weights_multiply_each_token_gradient_of_the_surrogate():
    """Hand gradient of the decoupled objective on one completion of two tokens, A = 1, ratio 1 at the step
    start (pi_theta = pi_prox = 0.5, 0.2), mu = 0.4, 0.4: w = (1.25, 0.5). Token mean loss
    -(w_1 r_1 + w_2 r_2) / 2 with d r_t / d log pi_theta_t = r_t = 1, so d loss / d log pi_theta = -w / 2 =
    (-0.625, -0.25); without the weights it would be (-0.5, -0.5)."""
    from rloop_lightning.algorithms import clipped_policy_loss
    from rloop_lightning.algorithms.importance import behaviour_weighted_advantages

    proximal, behaviour = torch.tensor([[0.5, 0.2]]).log(), torch.tensor([[0.4, 0.4]]).log()
    current = proximal.clone().requires_grad_(True)
    mask = torch.ones(1, 2)
    advantages, _ = behaviour_weighted_advantages(torch.tensor([1.0]), proximal, behaviour, mask, cap=2.0)
    clipped_policy_loss(current, proximal, advantages, mask, 0.2, 0.2, "token", "token_mean").loss.backward()
    torch.testing.assert_close(current.grad, torch.tensor([[-0.625, -0.25]]))
