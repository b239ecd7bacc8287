"""Faulty reward functions, one per fault a verifier can have, for the fault tests and probes.

Light on imports on purpose: spawned reward workers import this module by name. Sampled completions
always have at least one token (EOS or a truncated one), while the set-up check's probe completions
have none, so ``*_on_real_completions`` functions pass the set-up check and fail during training.
"""

from __future__ import annotations

import math
import time


def never_returns(completions, **kwargs):
    time.sleep(1000)


def stalls_on_real_completions(completions, completion_ids, **kwargs):
    if any(completion_ids):
        time.sleep(1000)
    return [0.0] * len(completions)


def always_raises(completions, **kwargs):
    raise KeyError("gold")


def nan_reward(completions, **kwargs):
    return [math.nan] * len(completions)


def nan_on_real_completions(completions, completion_ids, **kwargs):
    return [math.nan if ids else 0.0 for ids in completion_ids]


def digit_share(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def exits(completions, **kwargs):
    raise SystemExit(0)


def exits_on_real_completions(completions, completion_ids, **kwargs):
    if any(completion_ids):
        raise SystemExit(0)
    return [0.0] * len(completions)


def interrupts(completions, **kwargs):
    raise KeyboardInterrupt


def appends_to_numbers(completions, numbers, **kwargs):
    for row in numbers:
        row.append(99)
    return [0.0] * len(completions)


def rewrites_completions(completions, **kwargs):
    completions[:] = [""] * len(completions)
    return [0.0] * len(completions)


def returns_a_set(completions, **kwargs):
    return {float(i) for i in range(len(completions))}


def returns_a_generator(completions, **kwargs):
    return (0.0 for _ in completions)


def returns_a_string(completions, **kwargs):
    return "1" * len(completions)


FAULTS = {
    "verifier never returns": never_returns,
    "verifier stalls on real completions": stalls_on_real_completions,
    "verifier always raises": always_raises,
    "verifier returns NaN": nan_reward,
    "verifier returns NaN on real completions": nan_on_real_completions,
}
"""Fault description -> reward function, for a probe table."""


def closes_stdout(completions, **kwargs):
    import sys

    sys.stdout.close()
    return [0.0] * len(completions)
