"""Faulty reward functions in a GRPO phase: none hangs, none is silently wrong, each error names the function.

Each test here failed before the runner's rework: the set-up check called functions directly (a
verifier that never returns hung it, a raising one gave a bare exception, NaN passed), NaN rewards
counted as 0 without a word, and a phase whose every reward failed trained on zeros forever.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import pytest
import torch

from rloop_lightning.data.datamodules import PromptDataModule
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.policy import Policy
from rloop_lightning.rewards import RewardFunctionError
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.tasks import Countdown

from faulty_rewards import (  # noqa: I001 -- tests/ is on sys.path
    always_raises, digit_share, nan_on_real_completions, nan_reward, never_returns, stalls_on_real_completions,
)

TIMEOUT = 0.5


def fit(*functions, steps: int = 2, **settings) -> tuple[GRPOModule, float]:
    torch.manual_seed(0)
    module = GRPOModule(policy=Policy("rloop/micro-llama"), sampling=SamplingParams(max_new_tokens=6),
                        num_generations=2, reward_functions=list(functions), reward_timeout=TIMEOUT,
                        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), **settings)
    data = PromptDataModule(Countdown(num_train=16, num_test=4, num_ood=4), batch_size=4)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    started = time.monotonic()
    trainer.fit(module, data)
    return module, time.monotonic() - started


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_verifier_that_never_returns_is_refused_at_set_up_in_bounded_time(workers):
    started = time.monotonic()
    with pytest.raises(RewardFunctionError, match=r"'never_returns' failed the set-up check .* timed out "
                                                  r"\(limit 0.5 s per call\)"):
        fit(never_returns, reward_workers=workers)
    assert time.monotonic() - started < 30  # model load and, with workers, the pool's start included


@pytest.mark.timeout(120)
def test_a_verifier_that_stalls_mid_training_costs_bounded_time_then_aborts_the_phase(caplog):
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.rewards.runner"), \
            pytest.raises(RuntimeError, match=r"every reward of the last 2 steps failed \(max_bad_steps=2\): "
                                              r"reward function 'stalls_on_real_completions' timed out"):
        fit(stalls_on_real_completions, steps=5, max_bad_steps=2)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings[0] == ("reward function 'stalls_on_real_completions' timed out (limit 0.5 s per call) "
                           "on 8/8 completions; scored 0")


def test_a_stall_next_to_a_working_function_is_counted_and_training_goes_on():
    module, elapsed = fit(stalls_on_real_completions, digit_share, steps=2)
    assert module.scoring_stats.num_timeouts == 2 * 8  # 8 completions per step, none scored
    assert module.scoring_stats.failed_steps_in_a_row == 0
    assert elapsed < 2 * (2 * TIMEOUT) + 20  # two timeouts per step, plus sampling and training


def test_a_function_that_raises_at_set_up_is_named():
    with pytest.raises(RewardFunctionError, match="'always_raises' failed the set-up check on 2 probe completions: "
                                                  "it raised KeyError: 'gold'"):
        fit(always_raises)


def test_nan_rewards_are_refused_at_set_up():
    with pytest.raises(RewardFunctionError, match="'nan_reward' .* it returned nan; a reward must be a finite"):
        fit(nan_reward)


def test_nan_rewards_at_run_time_are_counted_and_warned_as_errors(caplog):
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.rewards.runner"):
        module, _ = fit(nan_on_real_completions, digit_share, steps=1)
    assert module.scoring_stats.num_errors == 8
    assert "reward function 'nan_on_real_completions' returned nan on 8/8 completions; scored 0" in [
        r.getMessage() for r in caplog.records]
