"""RewardRunner: weighted scores, per-call timeouts, the parent's hard deadline, errors, bad outputs.

The reward functions below are module-level so that spawned workers can unpickle them: pytest puts
this directory on ``sys.path`` and spawn hands ``sys.path`` to the children, which then import this
module by name.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import time

import pytest

from rloop_lightning.rewards import RewardRunner, check_reward_output, math_accuracy

TIMEOUT = 0.5


def length_reward(prompts, completions, **kwargs):
    return [float(len(completion)) for completion in completions]


def target_reward(prompts, completions, target, **kwargs):
    return [float(value) for value in target]


def none_unless_long(prompts, completions, **kwargs):
    return [1.0 if len(completion) > 3 else None for completion in completions]


def sleepy_reward(prompts, completions, **kwargs):
    if completions[0] == "sleep":
        time.sleep(1000)  # interrupted by the worker's SIGALRM
    return [1.0]


def signal_blocking_reward(prompts, completions, **kwargs):
    if completions[0] == "stuck":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # like C code deaf to signals
        time.sleep(1000)
    if completions[0] == "crash":
        os._exit(1)  # the pool replaces the worker, but the task's result never comes
    return [1.0]


def raising_reward(prompts, completions, **kwargs):
    if completions[0] == "raise":
        raise ZeroDivisionError("bad completion")
    return [1.0]


def swallowing_reward(prompts, completions, **kwargs):
    try:
        if completions[0] == "sleep":
            time.sleep(1000)
    except Exception:  # noqa: BLE001 -- user code that eats errors must not eat the timeout
        return [1.0]
    return [1.0]


def two_values_reward(prompts, completions, **kwargs):
    return [1.0, 1.0]


@pytest.fixture(scope="module")
def pool_runner():
    """One warm pool for the tests that do not kill it."""
    functions = [length_reward, sleepy_reward, raising_reward, swallowing_reward]
    with RewardRunner(functions, num_workers=2, timeout=TIMEOUT) as runner:
        runner(["p"], ["warm"], {})
        yield runner


def test_pool_and_in_process_give_the_same_scores():
    functions, weights = [length_reward, target_reward, none_unless_long], [1.0, 0.5, 2.0]
    completions = ["a", "bb", "cccc", "ddddd", "e"]
    columns = {"target": [1, 2, 3, 4, 5]}
    in_process = RewardRunner(functions, weights, num_workers=0)(["p"] * 5, completions, columns)
    with RewardRunner(functions, weights, num_workers=2) as runner:
        pooled = runner(["p"] * 5, completions, columns)
    assert pooled.per_function == in_process.per_function
    assert pooled.per_function["target_reward"] == [1.0, 2.0, 3.0, 4.0, 5.0]  # columns stay row-aligned
    assert pooled.per_function["none_unless_long"] == [None, None, 1.0, 1.0, None]
    # nansum as in TRL: None drops out of the weighted sum
    expected = [1 + 0.5, 2 + 1.0, 4 + 1.5 + 2.0, 5 + 2.0 + 2.0, 1 + 2.5]
    assert pooled.rewards.tolist() == pytest.approx(expected)
    assert in_process.rewards.tolist() == pytest.approx(expected)
    assert (pooled.num_timeouts, pooled.num_errors) == (0, 0)


def test_sleeping_call_times_out_and_scores_zero(pool_runner):
    started = time.monotonic()
    result = pool_runner(["p"] * 3, ["ok", "sleep", "ok"], {})
    elapsed = time.monotonic() - started
    assert result.per_function["sleepy_reward"] == [1.0, 0.0, 1.0]
    assert result.per_function["length_reward"] == [2.0, 5.0, 2.0]
    # swallowing_reward's `except Exception` cannot catch RewardTimeout
    assert result.per_function["swallowing_reward"] == [1.0, 0.0, 1.0]
    assert result.num_timeouts == 2
    assert elapsed < 4 * TIMEOUT + 2.0  # 2 workers, at most 2 items each, 2 timeouts per item


def test_raising_call_scores_zero_and_is_logged_once(pool_runner, caplog):
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.rewards.runner"):
        first = pool_runner(["p"] * 3, ["raise", "ok", "raise"], {})
        second = pool_runner(["p"], ["raise"], {})
    assert first.per_function["raising_reward"] == [0.0, 1.0, 0.0]
    assert (first.num_errors, second.num_errors) == (2, 1)
    raised = [record for record in caplog.records if "'raising_reward' raised" in record.getMessage()]
    assert len(raised) == 1 and "ZeroDivisionError: bad completion" in raised[0].getMessage()


def test_deaf_or_crashed_workers_hit_the_deadline_and_the_pool_is_recreated():
    with RewardRunner([signal_blocking_reward], num_workers=2, timeout=TIMEOUT) as runner:
        assert runner(["p"], ["ok"], {}).rewards.tolist() == [1.0]  # warm pool
        started = time.monotonic()
        result = runner(["p"] * 3, ["stuck", "ok", "crash"], {})
        elapsed = time.monotonic() - started
        assert result.per_function["signal_blocking_reward"] == [0.0, 1.0, 0.0]
        assert result.num_timeouts == 2
        assert elapsed < 3 * TIMEOUT + 3.0 + 2.0  # worst case of the batch + slack, plus margin
        assert runner._pool is None  # terminated; the next call starts a fresh one
        assert runner(["p"] * 2, ["ok", "ok"], {}).rewards.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_wrong_number_of_values_raises_naming_the_function(num_workers):
    with (
        RewardRunner([two_values_reward], num_workers=num_workers) as runner,
        pytest.raises(ValueError, match="two_values_reward.*2 values for 1"),
    ):
        runner(["p"], ["x"], {})


def test_math_accuracy_in_the_pool():
    completions = ["so \\boxed{4}", "#### 1,000", "the answer is 7", "\\boxed{\\frac{1}{2}}"]
    golds = ["4", "Twice 500 is 1000.\n#### 1000", "8", "0.5"]
    with RewardRunner([math_accuracy], num_workers=2) as runner:
        result = runner(["p"] * 4, completions, {"answer": golds})
    assert result.rewards.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_in_process_timeout_keeps_an_outer_timer():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        result = RewardRunner([sleepy_reward, math_accuracy], num_workers=0, timeout=0.2)(
            ["p", "p"], ["sleep", "\\boxed{3}"], {"answer": ["3", "3"]}
        )
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert result.per_function == {"sleepy_reward": [0.0, 1.0], "math_accuracy": [0.0, 1.0]}
    assert result.num_timeouts == 1
    assert 90.0 < remaining <= 100.0 and fired == []


def test_check_reward_output():
    assert check_reward_output(length_reward, (1, None, 0.5), 3) == [1.0, None, 0.5]
    with pytest.raises(ValueError, match="length_reward.*2 values for 3"):
        check_reward_output(length_reward, [1.0, 2.0], 3)
    with pytest.raises(ValueError, match="returned str"):
        check_reward_output(length_reward, "1", 1)
    with pytest.raises(ValueError, match="expected a float or None"):
        check_reward_output(length_reward, ["1.0"], 1)
    with pytest.raises(ValueError, match="returned NoneType"):
        check_reward_output(length_reward, None, 1)


def test_bad_arguments_are_rejected_early():
    with pytest.raises(ValueError, match="cannot be sent to worker processes"):
        RewardRunner([lambda prompts, completions, **kwargs: [1.0]], num_workers=2)
    with pytest.raises(ValueError, match="2 weights for 1"):
        RewardRunner([length_reward], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="'target' has 1 entries for 2"):
        RewardRunner([target_reward], num_workers=0)(["p", "p"], ["a", "b"], {"target": [1]})


def test_in_process_runner_accepts_lambdas_and_duplicate_names_and_pickles():
    runner = RewardRunner(
        [length_reward, length_reward, lambda prompts, completions, **kw: [2.0]], num_workers=0
    )
    result = runner(["p"], ["abc"], {})
    assert result.per_function == {"length_reward": [3.0], "length_reward_1": [3.0], "<lambda>": [2.0]}
    assert runner([], [], {}).rewards.shape == (0,)
    pooled = RewardRunner([length_reward], num_workers=1)
    assert pickle.loads(pickle.dumps(pooled))._pool is None
    assert not math.isnan(result.rewards.item())


def test_score_problems_passes_every_field_but_the_prompt_as_aligned_columns():
    def echo_target(prompts, completions, target, **columns):
        assert "prompt" not in columns and "id" in columns
        return [float(t) for t in target]

    problems = [{"id": "a", "prompt": "p0", "target": 3}, {"id": "b", "prompt": "p1", "target": 7}]
    with RewardRunner([echo_target], num_workers=0) as runner:
        result = runner.score_problems(problems, [1, 1, 0], ["x", "y", "z"])
    assert result.rewards.tolist() == [7.0, 7.0, 3.0]
