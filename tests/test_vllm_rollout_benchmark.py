"""``benchmarks.vllm_rollout``'s step clock: a GRPO step's time holds the weight sync that follows its
update (ours, ``on_train_batch_end``) or runs inside it (TRL's, before each rollout), and the sync is
also counted on its own. A fake clock gives exact numbers."""

from __future__ import annotations

import math

from benchmarks import vllm_rollout
from benchmarks.vllm_rollout import StepClock, step_medians, step_split


class FakeTime:
    """Wall-clock time ``now``; CPU time runs at half its speed (a process that gets half a core)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def process_time(self) -> float:
        return self.now / 2


class Engine:
    def __init__(self, time: FakeTime, seconds: float):
        self.time, self.seconds, self.calls = time, seconds, 0

    def sync_weights(self, *args):
        self.calls += 1
        self.time.now += self.seconds


def test_a_sync_after_the_step_hooks_is_part_of_the_step(monkeypatch):
    time = FakeTime()
    monkeypatch.setattr(vllm_rollout, "time", time)
    clock, engine = StepClock(), Engine(time, seconds=2.0)
    clock.time_syncs(engine)
    engine.sync_weights()  # before the first step (on_train_start): in no step
    for step_seconds in (5.0, 3.0, 4.0):
        time.now += 1.0  # between steps (data, logging): in no step
        clock.begin()
        time.now += step_seconds  # rollout + update
        clock.mark()  # the callback's on_train_batch_end
        engine.sync_weights()  # the module's on_train_batch_end, after the callback's
    time.now += 10.0  # after the last step: not counted
    clock.close()
    assert engine.calls == 4
    assert clock.steps == [7.0, 5.0, 6.0] and clock.syncs == [2.0, 2.0, 2.0]
    assert clock.steps_cpu == [3.5, 2.5, 3.0]
    assert clock.medians() == (5.5, 2.0, 2.75)  # the first step is left out


def test_a_sync_inside_the_step_is_counted_once_and_the_step_ends_at_its_hook(monkeypatch):
    time = FakeTime()
    monkeypatch.setattr(vllm_rollout, "time", time)
    clock, engine = StepClock(), Engine(time, seconds=0.5)
    clock.time_syncs(engine)
    clock.begin()  # TRL's on_step_begin
    engine.sync_weights()  # before the rollout
    time.now += 3.0
    clock.mark()  # on_step_end
    clock.close()
    clock.close()  # closing twice adds nothing
    assert clock.steps == [3.5] and clock.syncs == [0.5] and clock.steps_cpu == [1.75]
    assert math.isnan(clock.medians()[0])  # one step only: nothing after the first


def test_step_medians_and_table_cells():
    assert step_medians([9.0, 1.0, 3.0, 2.0], [0.0, 0.1, 0.3, 0.2]) == (2.0, 0.2)
    assert all(map(math.isnan, step_medians([1.0], [0.5], [0.7])))  # one step: none after the first
    assert step_split(2.0, 0.5) == ["2.00", "0.500", "1.50", "25%"]
    assert step_split(0.0, 0.0) == ["0.00", "0.000", "0.00", "n/a"]
    assert step_split(float("nan"), 0.1) == ["n/a"] * 4
