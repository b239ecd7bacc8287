import pytest
import torch

from rloop_lightning.algorithms.sampling import (
    DynamicSamplingBuffer,
    dynamic_sampling_signal,
    overlong_mask,
    select_informative_groups,
    soft_overlong_penalty,
    zero_variance_groups,
)


def test_zero_variance_groups_with_tolerance():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5 + 1e-8, 0.5]])
    assert zero_variance_groups(rewards).tolist() == [True, False, True, True]
    assert select_informative_groups(rewards).tolist() == [1]
    with pytest.raises(ValueError):
        zero_variance_groups(torch.zeros(3))


def test_buffer_accumulates_until_full():
    buffer = DynamicSamplingBuffer(target_groups=3, max_rounds=3)
    assert buffer.needs_more
    kept = buffer.add(["a", "b", "c"], torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    assert kept == 1 and buffer.needs_more and not buffer.is_full
    kept = buffer.add(["d", "e", "f"], torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    assert kept == 2 and buffer.is_full and not buffer.needs_more
    sample = buffer.take()
    assert sample.groups == ["b", "d", "e"]
    torch.testing.assert_close(sample.rewards, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]))
    assert (sample.rounds, sample.groups_seen, sample.groups_informative) == (2, 6, 3)
    assert sample.informative_fraction == 0.5
    assert buffer.num_groups == 0 and buffer.needs_more  # emptied for the next step


def test_buffer_drops_surplus():
    buffer = DynamicSamplingBuffer(target_groups=2)
    buffer.add([0, 1, 2], torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]]))
    sample = buffer.take()
    assert sample.groups == [0, 1] and sample.rewards.shape == (2, 2) and sample.groups_informative == 3


def test_buffer_stops_after_max_rounds_even_if_empty():
    buffer = DynamicSamplingBuffer(target_groups=5, max_rounds=2)
    buffer.add(["a"], torch.ones(1, 4))
    assert buffer.needs_more
    buffer.add(["b"], torch.zeros(1, 4))
    assert not buffer.needs_more and not buffer.is_full
    sample = buffer.take()
    assert sample.groups == [] and sample.rewards.shape == (0, 4) and sample.informative_fraction == 0.0


def test_buffer_errors():
    with pytest.raises(ValueError):
        DynamicSamplingBuffer(target_groups=0)
    buffer = DynamicSamplingBuffer(target_groups=1)
    with pytest.raises(RuntimeError):
        buffer.take()
    with pytest.raises(ValueError, match="2 groups"):
        buffer.add(["a", "b"], torch.zeros(3, 2))


def test_overlong_mask():
    mask = overlong_mask(torch.tensor([False, True, False]))
    assert mask.dtype == torch.float32 and mask.tolist() == [1.0, 0.0, 1.0]


def test_soft_overlong_penalty_three_regimes():
    # L_max 20, L_cache 4 -> safe up to 16; in the buffer (16 - L) / 4; above 20: -1
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(soft_overlong_penalty(lengths, 20, 4), expected)
    torch.testing.assert_close(soft_overlong_penalty(lengths, 20, 4, penalty_factor=0.5), expected * 0.5)


def test_soft_overlong_penalty_validates_buffer():
    with pytest.raises(ValueError):
        soft_overlong_penalty(torch.tensor([1]), 20, 0)
    with pytest.raises(ValueError):
        soft_overlong_penalty(torch.tensor([1]), 20, 21)


def test_dynamic_sampling_filters_on_accuracy_not_on_shaping_terms():
    """4 groups of 4: rewards = accuracy (0/1) + 0.1 format bonus + soft overlong penalty (<= 0)."""
    correct = torch.tensor([[True, True, True, True],  # A: all right; one overlong (-0.25)
                            [True, False, False, False],  # B: one right
                            [False, False, False, False],  # C: all wrong, two with the format bonus
                            [False, False, False, False]])  # D: all wrong, all alike
    rewards = torch.tensor([[1.1, 1.1, 0.85, 1.1],
                            [1.1, 0.1, 0.1, 0.0],
                            [0.1, 0.0, 0.1, 0.0],
                            [0.0, 0.0, 0.0, 0.0]])
    accuracy = dynamic_sampling_signal(rewards, correct)  # the default
    assert accuracy.tolist() == correct.float().tolist()
    assert select_informative_groups(accuracy).tolist() == [1]  # DAPO: only B has 0 < #correct < G
    assert torch.equal(dynamic_sampling_signal(rewards, correct, "reward"), rewards)
    assert select_informative_groups(dynamic_sampling_signal(rewards, correct, "reward")).tolist() == [0, 1, 2]

    buffer = DynamicSamplingBuffer(target_groups=2, max_rounds=1)
    buffer.add(["A", "B", "C", "D"], accuracy)
    assert buffer.take().groups == ["B"]


def test_dynamic_sampling_signal_errors():
    with pytest.raises(ValueError, match="unknown dynamic sampling signal 'format'"):
        dynamic_sampling_signal(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool), "format")
    with pytest.raises(ValueError, match="differ in shape"):
        dynamic_sampling_signal(torch.zeros(1, 2), torch.zeros(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("signal", ["accuracy", "reward"])
def test_grpo_filters_on_the_configured_signal(signal):
    from rloop_lightning.grpo.groups import Group
    from rloop_lightning.grpo.module import GRPOModule
    from rloop_lightning.policy import Policy

    def group(rewards, correct):
        return Group(problem={}, prompt_ids=[], completion_ids=[[], []], completions=["", ""],
                     sampler_logprobs=[[], []], truncated=[False, True], rewards=torch.tensor(rewards),
                     correct=torch.tensor(correct))

    module = GRPOModule(Policy("rloop/micro-llama"), num_generations=2, dynamic_sampling=True,
                        dynamic_sampling_signal=signal)
    overlong_only = group([1.0, 0.5], [True, True])  # both right, one penalised for length
    values = module._filter_values([overlong_only, group([1.0, 0.0], [True, False])])
    expected = [[1.0, 1.0], [1.0, 0.0]] if signal == "accuracy" else [[1.0, 0.5], [1.0, 0.0]]
    assert values.tolist() == expected
