"""RewardRunner: TRL's calling convention, chunked calls, time limits, the parent's deadline, failures.

The reward functions below are module-level so that spawned workers can unpickle them: pytest puts
this directory on ``sys.path`` and spawn hands ``sys.path`` to the children, which then import this
module by name.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import pickle
import signal
import time

import pytest

from rloop_lightning.rewards import (
    ChatFormat, RewardBatch, RewardFunctionError, RewardRunner, TrainerState, check_reward_output, math_accuracy,
)
from rloop_lightning.rewards.calls import TIMEOUT_SIGNAL

TIMEOUT = 0.5


def length_reward(prompts, completions, **kwargs):
    return [float(len(completion)) for completion in completions]


def target_reward(prompts, completions, target, **kwargs):
    return [float(value) for value in target]


def none_unless_long(prompts, completions, **kwargs):
    return [1.0 if len(completion) > 3 else None for completion in completions]


def never_applies(completions, **kwargs):
    return [None] * len(completions)


def sleepy_reward(prompts, completions, **kwargs):
    if "sleep" in completions:
        time.sleep(1000)  # interrupted by the time limit
    return [1.0] * len(completions)


def stalled_verifier(completions, **kwargs):
    """Never returns on a real completion; answers the empty probe completions of the set-up check."""
    if any(completions):
        time.sleep(1000)
    return [0.0] * len(completions)


def signal_blocking_reward(prompts, completions, **kwargs):
    if "stuck" in completions:
        signal.pthread_sigmask(signal.SIG_BLOCK, {TIMEOUT_SIGNAL})  # like C code deaf to signals
        time.sleep(1000)
    if "crash" in completions:
        os._exit(1)  # the pool replaces the worker, but the task's result never comes
    return [1.0] * len(completions)


def raising_reward(prompts, completions, **kwargs):
    if "raise" in completions:
        raise ZeroDivisionError("bad completion")
    return [1.0] * len(completions)


def swallowing_reward(prompts, completions, **kwargs):
    try:
        if "sleep" in completions:
            time.sleep(1000)
    except Exception:  # noqa: BLE001 -- user code that eats errors must not eat the timeout
        return [1.0] * len(completions)
    return [1.0] * len(completions)


def nonfinite_reward(completions, **kwargs):
    return [{"nan": math.nan, "inf": math.inf}.get(completion, 1.0) for completion in completions]


def two_values_reward(prompts, completions, **kwargs):
    return [1.0, 1.0]


def trl_style_reward(completions, solution, completion_ids, trainer_state, log_extra, log_metric, **kwargs):
    """Declared as TRL's own functions are: no positional ``prompts``, a dataset column by name."""
    log_extra("solution_seen", list(solution))
    log_metric("chunk_size", float(len(completions)))
    return [float(len(ids)) + trainer_state.global_step for ids in completion_ids]


async def async_half(prompts, completions, **kwargs):
    await asyncio.sleep(0.3)
    return [0.5] * len(completions)


async def async_quarter(prompts, completions, **kwargs):
    await asyncio.sleep(0.3)
    return [0.25] * len(completions)


async def async_forever(prompts, completions, **kwargs):
    await asyncio.sleep(1000)


def parses_then_stalls(completions, **kwargs):
    """math-verify arms and then cancels SIGALRM (as TRL's accuracy_reward does through it), then stalls."""
    from math_verify import parse

    parse("$1$", parsing_timeout=5)
    time.sleep(1000)


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
    assert (pooled.num_timeouts, pooled.num_errors, pooled.num_not_applicable) == (0, 0, 3)


@pytest.mark.parametrize("num_workers, chunk_size", [(0, 5.0), (2, 2.5)])
def test_functions_are_called_by_keyword_on_chunks_with_trl_extras(num_workers, chunk_size):
    """TRL's keywords: completion_ids, every column by name, trainer_state, log_extra, log_metric."""
    with RewardRunner([trl_style_reward], num_workers=num_workers) as runner:
        result = runner(["p"] * 5, ["a"] * 5, {"solution": list("vwxyz")},
                        completion_ids=[[1], [1, 2], [], [4, 5, 6], [7]], state=TrainerState(global_step=10))
    assert result.per_function["trl_style_reward"] == [11.0, 12.0, 10.0, 13.0, 11.0]
    assert result.columns == {"solution_seen": list("vwxyz")}  # aligned with the completions across chunks
    assert result.metrics == {"chunk_size": chunk_size}  # one call per chunk: 5 in-process; 3 + 2 in 2 workers


def test_conversational_batches_carry_messages():
    problems = [{"id": "a", "prompt": "1+1?", "solution": "2"}]
    seen = []

    def record(prompts, completions, **kwargs):
        seen.append((prompts, completions))
        return [1.0] * len(completions)

    RewardRunner([record], num_workers=0).score_problems(problems, [0], ["two"], [[5]], chat=ChatFormat("Be brief."))
    assert seen == [([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]],
                     [[{"role": "assistant", "content": "two"}]])]


def test_sleeping_completion_times_out_alone(pool_runner):
    """The chunk call times out; the retry per completion scores the others."""
    started = time.monotonic()
    result = pool_runner(["p"] * 3, ["ok", "sleep", "ok"], {})
    elapsed = time.monotonic() - started
    assert result.per_function["sleepy_reward"] == [1.0, 0.0, 1.0]
    assert result.per_function["length_reward"] == [2.0, 5.0, 2.0]
    # swallowing_reward's `except Exception` cannot catch RewardTimeout
    assert result.per_function["swallowing_reward"] == [1.0, 0.0, 1.0]
    assert result.num_timeouts == 2
    assert elapsed < pool_runner.batch_time_limit


def test_raising_completion_scores_zero_alone_and_is_logged_once(pool_runner, caplog):
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.rewards.runner"):
        first = pool_runner(["p"] * 3, ["raise", "ok", "raise"], {})
        second = pool_runner(["p"], ["raise"], {})
    assert first.per_function["raising_reward"] == [0.0, 1.0, 0.0]
    assert (first.num_errors, second.num_errors) == (2, 1)
    raised = [record.getMessage() for record in caplog.records if "'raising_reward'" in record.getMessage()]
    assert raised == ["reward function 'raising_reward' raised ZeroDivisionError: bad completion on 2/3 "
                      "completions; scored 0"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stalled_verifier_costs_two_timeouts_per_batch_whatever_its_size(num_workers, caplog):
    """Before: one call per completion, 32 x timeout / workers (8 s here); now at most 2 x timeout."""
    with RewardRunner([stalled_verifier], num_workers=num_workers, timeout=TIMEOUT) as runner:
        runner.check_problems([{"prompt": "p"}])  # set-up passes (empty completions), warms the pool
        with caplog.at_level(logging.WARNING, logger="rloop_lightning.rewards.runner"):
            started = time.monotonic()
            result = runner(["p"] * 32, ["x"] * 32, {})
            elapsed = time.monotonic() - started
    assert result.num_timeouts == 32 and result.all_failed and result.rewards.tolist() == [0.0] * 32
    assert 2 * TIMEOUT - 0.1 < elapsed < 2 * TIMEOUT + 0.8
    assert any("'stalled_verifier' timed out (limit 0.5 s per call) on 32/32" in r.getMessage()
               for r in caplog.records)


@pytest.mark.timeout(30)
def test_the_time_limit_survives_math_verify_cancelling_sigalrm():
    with RewardRunner([parses_then_stalls], num_workers=0, timeout=TIMEOUT) as runner:
        started = time.monotonic()
        result = runner(["p"], ["x"], {})
    assert result.num_timeouts == 1 and time.monotonic() - started < 3 * TIMEOUT


def test_deaf_or_crashed_workers_hit_the_deadline_name_the_function_and_are_replaced(caplog):
    with RewardRunner([length_reward, signal_blocking_reward], num_workers=2, timeout=TIMEOUT) as runner:
        assert runner(["p"], ["ok"], {}).rewards.tolist() == [3.0]  # warm pool
        with caplog.at_level(logging.WARNING, logger="rloop_lightning.rewards.runner"):
            started = time.monotonic()
            result = runner(["p"] * 4, ["stuck", "ok", "ok", "ok"], {})
            elapsed = time.monotonic() - started
        assert result.per_function["signal_blocking_reward"] == [0.0, 0.0, 1.0, 1.0]  # the stuck chunk is lost
        assert result.per_function["length_reward"] == [0.0, 0.0, 2.0, 2.0]
        assert result.num_timeouts == 4
        assert result.failures == {"signal_blocking_reward": "never returned within the batch limit of 3.0 s"}
        assert runner.batch_time_limit == 3.0 and elapsed < runner.batch_time_limit + 1.0
        assert any("['signal_blocking_reward'] did not return" in r.getMessage() for r in caplog.records)
        assert runner._workers is None  # stopped; the next call starts fresh ones
        assert runner(["p"] * 2, ["ok", "ok"], {}).rewards.tolist() == [3.0, 3.0]
        assert runner(["p"] * 2, ["crash", "ok"], {}).num_timeouts == 2


def test_nonfinite_rewards_are_errors_named_counted_and_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.rewards.runner"):
        result = RewardRunner([nonfinite_reward, length_reward], num_workers=0)(["p"] * 3, ["nan", "ok", "inf"])
    assert result.per_function["nonfinite_reward"] == [0.0, 1.0, 0.0]
    assert result.rewards.tolist() == [3.0, 3.0, 3.0]
    assert (result.num_errors, result.num_failed, result.all_failed) == (2, {"nonfinite_reward": 2}, False)
    assert [r.getMessage() for r in caplog.records] == [
        "reward function 'nonfinite_reward' returned nan on 2/3 completions; scored 0"]


def test_none_is_not_applicable_counted_and_warned_when_nothing_applies(caplog):
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.rewards.runner"):
        result = RewardRunner([never_applies, none_unless_long], num_workers=0)(["p0", "p1"], ["a", "long one"])
    assert result.rewards.tolist() == [0.0, 1.0]
    assert (result.num_not_applicable, result.num_unscored, result.num_errors) == (3, 1, 0)
    assert [r.getMessage() for r in caplog.records] == [
        "every reward function returned None (not applicable) for 1/2 completions; they score 0. First: prompt 'p0'"]


def test_async_functions_are_awaited_together_and_time_out():
    runner = RewardRunner([async_half, async_quarter, length_reward], num_workers=0, timeout=TIMEOUT)
    started = time.monotonic()
    result = runner(["p"] * 2, ["a", "bb"])
    assert time.monotonic() - started < 0.55  # 0.3 s each, awaited in parallel
    assert result.rewards.tolist() == [1.75, 2.75]
    started = time.monotonic()
    stuck = RewardRunner([async_forever, async_half], num_workers=0, timeout=TIMEOUT)(["p"] * 2, ["a", "b"])
    assert stuck.per_function == {"async_forever": [0.0, 0.0], "async_half": [0.5, 0.5]}
    assert stuck.num_timeouts == 2 and time.monotonic() - started < 2 * TIMEOUT + 0.5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_set_up_check_refuses_failing_functions_by_name(num_workers):
    functions = [length_reward, raising_reward, nonfinite_reward, sleepy_reward]
    with RewardRunner(functions, num_workers=num_workers, timeout=TIMEOUT) as runner:
        runner.check(_batch(["ok"]))
        with pytest.raises(RewardFunctionError, match=r"'raising_reward' failed the set-up check on 1 probe "
                                                      r"completions: it raised ZeroDivisionError: bad completion"):
            runner.check(_batch(["raise"]))
        with pytest.raises(RewardFunctionError, match="'nonfinite_reward' .* it returned nan; a reward must be a"):
            runner.check(_batch(["nan"]))
        started = time.monotonic()
        with pytest.raises(RewardFunctionError, match=r"'sleepy_reward' .* it timed out \(limit 0.5 s per call\); "
                                                      r"if it is only slow, raise the reward timeout"):
            runner.check(_batch(["sleep"]))
        assert time.monotonic() - started < 2 * TIMEOUT + 0.5
    with pytest.raises(ValueError, match="two_values_reward.*2 values for 1"):
        RewardRunner([two_values_reward], num_workers=0).check_problems([{"prompt": "p"}])


def _batch(completions):
    return RewardBatch(["p"] * len(completions), completions, [[]] * len(completions), {})


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
    assert signal.getsignal(TIMEOUT_SIGNAL) == signal.SIG_DFL  # the time limit's handler is gone


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
    with pytest.raises(ValueError, match=r"problem fields \['trainer_state'\] clash"):
        RewardRunner([target_reward], num_workers=0).score_problems([{"prompt": "p", "trainer_state": 1}], [0], ["a"])


def test_in_process_runner_accepts_lambdas_and_duplicate_names_and_pickles():
    runner = RewardRunner(
        [length_reward, length_reward, lambda prompts, completions, **kw: [2.0]], num_workers=0
    )
    result = runner(["p"], ["abc"], {})
    assert result.per_function == {"length_reward": [3.0], "length_reward_1": [3.0], "<lambda>": [2.0]}
    assert runner([], [], {}).rewards.shape == (0,)
    pooled = RewardRunner([length_reward], num_workers=1)
    assert pickle.loads(pickle.dumps(pooled))._workers is None
    assert not math.isnan(result.rewards.item())


def test_score_problems_passes_every_field_but_the_prompt_as_aligned_columns():
    def echo_target(prompts, completions, target, **columns):
        assert "prompt" not in columns and "id" in columns
        return [float(t) for t in target]

    problems = [{"id": "a", "prompt": "p0", "target": 3}, {"id": "b", "prompt": "p1", "target": 7}]
    with RewardRunner([echo_target], num_workers=0) as runner:
        result = runner.score_problems(problems, [1, 1, 0], ["x", "y", "z"])
    assert result.rewards.tolist() == [7.0, 7.0, 3.0]


@pytest.mark.timeout(60)
def test_a_time_limit_that_runs_out_at_once_leaves_no_watchdog_and_no_handler_behind(monkeypatch):
    """A limit of microseconds (a one-by-one retry's share of a nearly spent deadline, on a loaded machine)
    can signal while the watchdog is still starting, before the body begins; the limit still cleans up:
    the handler in place before it is back, no watchdog keeps signalling, and nothing raises
    ``RewardTimeout`` after the limit has ended. The slow start makes the race certain."""
    import threading
    import types

    from rloop_lightning.rewards import calls

    class SlowStart(threading.Thread):
        def start(self):
            super().start()
            time.sleep(0.05)  # the watchdog's signal lands here, inside start()

    monkeypatch.setattr(calls, "threading", types.SimpleNamespace(
        Thread=SlowStart, Event=threading.Event, current_thread=threading.current_thread,
        main_thread=threading.main_thread, get_ident=threading.get_ident))
    before = signal.getsignal(TIMEOUT_SIGNAL)
    timeouts = 0
    for _ in range(5):
        try:
            with calls.time_limit(1e-6):
                sum(range(1000))
        except calls.RewardTimeout:
            timeouts += 1
        assert signal.getsignal(TIMEOUT_SIGNAL) is before
    assert timeouts == 5
    assert not [t for t in threading.enumerate() if t.name == "reward-time-limit"]
    time.sleep(0.3)  # a leaked watchdog would signal every 50 ms into a leaked handler
