"""Helpers of the end-to-end loop tests, importable by path from their YAML.

``tests/`` is on ``sys.path`` under pytest (rootdir conftest), so the module is ``loop_helpers``;
the crash/resume tests give their subprocesses ``PYTHONPATH=tests``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import lightning as L

from rloop_lightning.loop.layout import BASE_EVALUATION, RunLayout
from rloop_lightning.records import write_json_atomic
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


def curve_run(run_dir: Path, vanilla: bool, validation: list[float],
              other: Callable[[int], dict] = lambda step: {}) -> Path:
    """A finished 2-iteration run in the loop's layout with a learning curve (4 RL steps per phase, a point at
    step 2) whose countdown/validation avg@n is ``validation`` at steps 0, 2, 4, 6, 8 (pass@32: avg@n + 0.5),
    plus ``other(step)``'s splits; RFT outputs evaluate as their RL end points."""
    layout = RunLayout(run_dir)

    def metrics(step: int) -> dict:
        value = validation[step // 2]
        return {**other(step), "countdown/validation": {"avg@32": value, "pass@1": value, "pass@32": value + 0.5}}

    write_json_atomic(layout.evaluation(BASE_EVALUATION), {"policy": "base", "metrics": metrics(0)})
    completed = {}
    for k in (0, 1):
        grpo = layout.phase("grpo", k)
        layout.directory(grpo).mkdir(parents=True)
        layout.curve(grpo).write_text(json.dumps({"step": 2, "seconds": 1.0, "metrics": metrics(4 * k + 2)}) + "\n")
        completed[grpo] = {"steps": 4, "seconds": 2.0}
        end = {"policy": str(layout.policy(grpo)), "metrics": metrics(4 * k + 4)}
        write_json_atomic(layout.evaluation(layout.phase("eval" if vanilla else "eval_rl_end", k)), end)
        if not vanilla:
            write_json_atomic(layout.evaluation(layout.phase("eval", k)),
                              {"policy": str(layout.policy(layout.phase("rft", k))), "metrics": metrics(4 * k + 4)})
    layout.manifest.write_text(json.dumps({"config": {"iterations": 2}, "completed": completed}))
    return run_dir
