import math

import pytest
import torch

from rloop_lightning.algorithms.advantages import group_advantages


def test_grpo_uses_unbiased_group_std():
    # [1, 0, 0, 1]: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735
    # -> A = +-0.5 / 0.57735 = +-sqrt(3)/2 = +-0.866025
    # [2, 0, 1, 1]: mean 1, deviations [1, -1, 0, 0], var = 2/3, std = 0.816497 -> A = +-sqrt(3/2) = 1.224745
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    advantages = group_advantages(rewards, "grpo", eps=0.0)
    half_sqrt3, sqrt_three_halves = math.sqrt(3) / 2, math.sqrt(1.5)
    expected = torch.tensor(
        [
            [half_sqrt3, -half_sqrt3, -half_sqrt3, half_sqrt3],
            [sqrt_three_halves, -sqrt_three_halves, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(advantages, expected)


def test_grpo_default_eps_and_constant_group():
    # 0.5 / (0.5773503 + 1e-4) = 0.8658754; a constant group has deviations 0 -> A = 0 exactly
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    advantages = group_advantages(rewards)
    a = 0.5 / (1 / math.sqrt(3) + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]]))


def test_single_completion_group_gives_zero_not_nan():
    advantages = group_advantages(torch.tensor([[1.0], [0.0]]), "grpo")
    torch.testing.assert_close(advantages, torch.zeros(2, 1))
    advantages = group_advantages(torch.tensor([[1.0]]), "batch_std")
    torch.testing.assert_close(advantages, torch.zeros(1, 1))


def test_dr_grpo_only_centres():
    # means 0.5 and 1.5
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 1.0, 1.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.5, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(group_advantages(rewards, "dr_grpo"), expected)


def test_batch_std_scales_by_std_of_all_rewards():
    # centred per group: [[0.5, -0.5], [0, 0]]
    # all rewards 1, 0, 1, 1: mean 0.75, squared deviations 0.0625 * 3 + 0.5625 = 0.75
    # -> unbiased var 0.75 / 3 = 0.25, std 0.5
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(
        group_advantages(rewards, "batch_std", eps=0.0), torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    )


def test_none_returns_rewards_copy():
    rewards = torch.tensor([[1.0, 0.0, 0.5]])
    advantages = group_advantages(rewards, "none")
    torch.testing.assert_close(advantages, rewards)
    advantages += 1
    assert rewards[0, 0] == 1.0


def test_integer_rewards_are_accepted():
    advantages = group_advantages(torch.tensor([[1, 0]]), "dr_grpo")
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, torch.tensor([[0.5, -0.5]]))


def test_errors():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(torch.zeros(1, 2), "ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.zeros(4))


# ---------------------------------------------------------------------------- pass@k training


def test_pass_at_k_hand_case():
    # G = 4, one correct, k = 2: R = 1 - C(3,2)/C(4,2) = 1/2, S = 1/2; the correct one has V = 1,
    # a wrong one V = 1 - C(2,1)/C(3,1) = 1/3
    advantages = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), "pass_at_k", eps=0.0, k=2)
    torch.testing.assert_close(advantages, torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3]]))
    # the same group under GRPO punishes the wrong ones harder, relative to the correct one
    grpo = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), "grpo", eps=0.0)
    assert grpo[0, 1] / grpo[0, 0] < advantages[0, 1] / advantages[0, 0]


def test_pass_at_k_binary_matches_the_closed_form():
    torch.manual_seed(0)
    G, k = 8, 4
    rewards = (torch.rand(50, G) < 0.3).float()
    advantages = group_advantages(rewards, "pass_at_k", eps=0.0, k=k)
    with_eps = group_advantages(rewards, "pass_at_k", k=k)
    for row, adv, adv_eps in zip(rewards, advantages, with_eps):
        c = int(row.sum())
        mean = 1 - math.comb(G - c, k) / math.comb(G, k)
        if mean in (0.0, 1.0):  # no spread (c = 0, or c > G - k): nothing to learn; eps avoids 0/0
            assert torch.all(adv_eps == 0)
            continue
        wrong = 1 - math.comb(G - c - 1, k - 1) / math.comb(G - 1, k - 1)
        expected = torch.where(row > 0, torch.tensor(1.0), torch.tensor(wrong))
        torch.testing.assert_close(adv, (expected - mean) / math.sqrt(mean * (1 - mean)))


def test_pass_at_k_equals_enumerating_every_subset():
    import itertools

    torch.manual_seed(1)
    rewards = torch.rand(3, 6)  # not binary: the largest reward of the subset
    k = 3
    advantages = group_advantages(rewards, "pass_at_k", eps=0.0, k=k)
    for row, adv in zip(rewards, advantages):
        subsets = list(itertools.combinations(range(6), k))
        best = torch.tensor([max(float(row[i]) for i in subset) for subset in subsets])
        mean, std = best.mean(), best.std(unbiased=False)
        for g in range(6):
            value = torch.tensor([b for b, subset in zip(best, subsets) if g in subset]).mean()
            torch.testing.assert_close(adv[g], (value - mean) / std, atol=1e-5, rtol=0)


def test_pass_at_1_is_grpo_with_the_population_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])
    expected = (rewards - rewards.mean()) / rewards.std(unbiased=False)
    torch.testing.assert_close(group_advantages(rewards, "pass_at_k", eps=0.0, k=1), expected)


def test_pass_at_k_needs_k_within_the_group():
    with pytest.raises(ValueError, match="1 <= k <= G = 4"):
        group_advantages(torch.zeros(2, 4), "pass_at_k", k=5)
