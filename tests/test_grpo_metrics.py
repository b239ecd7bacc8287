"""Step metrics from additive sums: exact numbers on a hand-made pair of groups, and rank merging."""

import math

import pytest
import torch

from rloop_lightning.grpo.groups import Group
from rloop_lightning.grpo.step_metrics import step_metrics, step_sums


def group(pid, completions, rewards, correct, truncated=None):
    return Group(problem={"id": pid, "prompt": "p"}, prompt_ids=[1], completion_ids=[[0] * len(c) for c in completions],
                 completions=completions, sampler_logprobs=[[0.0] * len(c) for c in completions],
                 truncated=truncated or [False] * len(completions), rewards=torch.tensor(rewards),
                 correct=torch.tensor(correct))


def test_step_metrics_by_hand():
    groups = [group("a", ["1+2", "1+2", "2+1", "xx"], [1.0, 1.0, 1.0, 0.0], [True, True, True, False]),
              group("b", ["yyyy", "zz", "zz", "zz"], [0.0, 0.0, 0.0, 0.0], [False] * 4, [True, False, False, False])]
    sums = step_sums(groups, forgotten=1, previously_solved=2)
    metrics = step_metrics(sums, length_max=4)
    # rewards: 3 ones of 8 -> mean 0.375, population std sqrt(0.375 - 0.140625) = 0.484123
    assert metrics["train/reward_mean"] == pytest.approx(0.375)
    assert metrics["train/reward_std"] == pytest.approx(math.sqrt(0.375 - 0.375 ** 2))
    assert metrics["train/accuracy"] == pytest.approx(3 / 8)
    assert metrics["train/zero_variance_share"] == pytest.approx(0.5)  # group b
    assert metrics["train/completion_length_mean"] == pytest.approx((3 + 3 + 3 + 2 + 4 + 2 + 2 + 2) / 8)
    assert metrics["train/clipped_share"] == pytest.approx(1 / 8)
    assert metrics["rloop/forgetting_rate"] == pytest.approx(0.5)
    # prompt a: correct {"1+2", "1+2", "2+1"} -> 2 distinct; b has none
    assert metrics["rloop/distinct_correct_per_prompt"] == pytest.approx(2.0)


def test_sums_of_two_ranks_give_the_metrics_of_the_union():
    a = [group("a", ["1", "2"], [1.0, 0.0], [True, False])]
    b = [group("b", ["3", "4"], [1.0, 1.0], [True, True]), group("c", ["5", "6"], [0.0, 0.0], [False, False])]
    merged = {k: v + step_sums(b, 0, 0)[k] for k, v in step_sums(a, 0, 0).items()}
    assert step_metrics(merged, 1) == pytest.approx(step_metrics(step_sums(a + b, 0, 0), 1), nan_ok=True)
    assert "rloop/forgetting_rate" not in step_metrics(merged, 1)
