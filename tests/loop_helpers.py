"""Helpers of the end-to-end loop tests, importable by path from their YAML.

``tests/`` is on ``sys.path`` under pytest (rootdir conftest), so the module is ``loop_helpers``;
the crash/resume tests give their subprocesses ``PYTHONPATH=tests``.
"""

from __future__ import annotations

import os
import time

import lightning as L

from rloop_lightning.tasks import Countdown

STEP_DELAY_ENV = "RLOOP_TEST_STEP_DELAY"
EVAL_DELAY_ENV = "RLOOP_TEST_EVAL_DELAY"


def has_digit(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the completion contains a digit, else 0.0: a reward a random micro model often earns."""
    return [1.0 if any(character.isdigit() for character in completion) else 0.0 for completion in completions]


class DigitCountdown(Countdown):
    """Countdown problems scored by ``has_digit``: a random micro model's held-out numbers then vary
    with the sampling noise, so two evaluations agree only if they sample alike.

    Each scoring first sleeps ``$RLOOP_TEST_EVAL_DELAY`` seconds (no-op when unset): the window in which
    the crash tests kill a held-out evaluation, changing nothing it writes."""

    def reward(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        delay = float(os.environ.get(EVAL_DELAY_ENV, "0") or 0)
        if delay > 0:
            time.sleep(delay)
        return has_digit(prompts, completions)


class StepDelay(L.Callback):
    """Sleep ``$RLOOP_TEST_STEP_DELAY`` seconds after every training batch (no-op when unset).

    Widens the window in which the crash tests kill a phase, without touching any state that the
    phase's outputs depend on, so the same YAML drives the timed and the untimed runs.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
        if delay > 0:
            time.sleep(delay)
