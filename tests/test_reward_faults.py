"""Faulty reward functions in a GRPO phase: none hangs, none is silently wrong, each error names the function.

Each test here failed before the runner's rework: the set-up check called functions directly (a
verifier that never returns hung it, a raising one gave a bare exception, NaN passed), NaN rewards
counted as 0 without a word, and a phase whose every reward failed trained on zeros forever.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import lightning as L
import pytest
import torch

from rloop_lightning.cli import cli_main
from rloop_lightning.data.datamodules import PromptDataModule
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.policy import Policy
from rloop_lightning.rewards import RewardFunctionError, RewardFunctionExit, RewardRunner, check_reward_output
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.tasks import Countdown

from test_loop import write_loop_config  # noqa: I001 -- tests/ is on sys.path
from faulty_rewards import (  # noqa: I001
    always_raises, appends_to_numbers, closes_stdout, digit_share, exits, exits_on_real_completions, interrupts, nan_on_real_completions,
    nan_reward, never_returns, returns_a_generator, returns_a_set, returns_a_string, rewrites_completions,
    stalls_on_real_completions,
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
    warnings = [r.getMessage() for r in caplog.records if r.name == "rloop_lightning.rewards.runner"]
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


# ---------------------------------------------------------------------------- exits, mutation, return types


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reward_that_exits_at_set_up_is_a_named_error_never_a_clean_exit(workers):
    with pytest.raises(RewardFunctionExit, match=r"reward function 'exits' raised SystemExit\(0\): a reward function "
                                                 "must return scores"):
        fit(exits, reward_workers=workers)


def test_a_reward_that_exits_mid_training_or_raises_keyboard_interrupt_is_a_named_error():
    with pytest.raises(RewardFunctionExit, match=r"'exits_on_real_completions' raised SystemExit\(0\)"):
        fit(exits_on_real_completions, digit_share, steps=2)
    with pytest.raises(RewardFunctionExit, match=r"'interrupts' raised KeyboardInterrupt\(\)"):
        fit(interrupts)


def test_a_real_ctrl_c_during_a_reward_call_stays_a_keyboard_interrupt():
    def waits_for_ctrl_c(completions, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        return [0.0] * len(completions)

    # the precondition, a process with Python's own Ctrl-C handler, set here: a pytest-xdist worker can hold
    # another test's handler (one that records the signal instead of raising), and the call then obeys that one
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        runner = RewardRunner([waits_for_ctrl_c], num_workers=0, timeout=10)
        with pytest.raises(KeyboardInterrupt):
            runner(["p"], ["c"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_reward_functions_get_their_own_copies_of_problems_and_completions():
    problems = [{"prompt": "p0", "numbers": [1, 2], "target": 3}, {"prompt": "p1", "numbers": [4], "target": 4}]
    completions = ["12", "a4", "x"]
    alone = RewardRunner([digit_share], num_workers=0).score_problems(problems, [0, 1, 1], completions)
    runner = RewardRunner([appends_to_numbers, rewrites_completions, digit_share], num_workers=0)
    for _ in range(2):
        result = runner.score_problems(problems, [0, 1, 1], completions)
        assert result.per_function["digit_share"] == alone.per_function["digit_share"] == [1.0, 0.5, 0.0]
    assert problems[0]["numbers"] == [1, 2] and problems[1]["numbers"] == [4]
    assert completions == ["12", "a4", "x"]


@pytest.mark.parametrize("function, message", [
    (returns_a_set, "returned set, expected a list of numbers or None, one per completion; a set has no order"),
    (returns_a_generator, "returned generator, expected a list .*; return a list, not an iterator or generator"),
    (returns_a_string, "returned str, expected a list of numbers or None"),
], ids=["set", "generator", "string"])
def test_a_reward_returning_a_set_generator_or_string_is_refused_by_name(function, message):
    with pytest.raises(ValueError, match=f"reward function '{function.__name__}' {message}"):
        RewardRunner([function], num_workers=0)(["p", "q"], ["c", "d"])
    assert check_reward_output(digit_share, (0.5, None), 2) == [0.5, None]  # a tuple is a sequence
    assert check_reward_output(digit_share, torch.tensor([1.0, 0.0]), 2) == [1.0, 0.0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reward_that_closes_stdout_is_named_and_the_stream_is_usable_again(workers):
    """Before: in-process, the next print or log line failed with a bare "ValueError: I/O operation on closed
    file", naming no reward; in a worker, every later function that printed failed in its place."""
    stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")  # the function's to close, not pytest's capture
    try:
        with RewardRunner([closes_stdout], num_workers=workers) as runner, \
                pytest.raises(RewardFunctionExit, match="reward function 'closes_stdout' closed sys.stdout: a reward "
                                                        "function must leave the process's standard streams open"):
            runner(["p", "q"], ["c", "d"])
        print("still printable", file=sys.stdout)
        assert not sys.stdout.closed
    finally:
        sys.stdout = stdout


LOOP_PROBES = {  # one per way the probe fails: a bad return value, an exit, a spin in a worker
    "set": (returns_a_set, 0, ValueError, "returned set, expected a list of numbers or None"),
    "exits": (exits, 0, RewardFunctionExit, r"raised SystemExit\(0\)"),
    "spins_2_workers": (never_returns, 2, RewardFunctionError, r"failed the set-up check .* timed out"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(LOOP_PROBES))
def test_rloop_fit_probes_the_rewards_before_any_evaluation(case, tmp_path, monkeypatch):
    """Before: the GRPO phase's set-up probe caught each of these only after theta_0's held-out evaluation
    (the expensive part of a real recipe); now ``validate_phases`` probes them before anything is written."""
    function, workers, kind, message = LOOP_PROBES[case]

    def evaluate_policy(*args, **kwargs):
        raise AssertionError("theta_0 was evaluated before the reward functions were probed")

    monkeypatch.setattr("rloop_lightning.loop.controller.evaluate_policy", evaluate_policy)
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    overrides = {"trainer.max_steps": 3, "model.reward_functions": [f"faulty_rewards.{function.__name__}"],
                 "model.correctness_function": None, "model.reward_workers": workers,
                 "model.reward_timeout": TIMEOUT}
    with pytest.raises(kind, match=f"grpo phase .*grpo.yaml.*reward function '{function.__name__}' {message}"):
        cli_main(["fit", "--config", str(config), "--vanilla", "true", "--grpo.overrides", json.dumps(overrides)])
    assert not (tmp_path / "run").exists()


GROUP_SIGTERM_SCRIPT = """
import sys

if __name__ == "__main__":  # the reward workers are spawned and import this file: nothing above this line
    import os
    import signal
    import time

    from faulty_rewards import digit_share
    from rloop_lightning.rewards import RewardRunner

    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # as a phase's StopSignals
    runner = RewardRunner([digit_share], num_workers=2, timeout=1.0)
    completions = ["1", "ab", "12", "b"]
    print(runner(["p"] * 4, completions).rewards.tolist(), flush=True)
    os.killpg(0, signal.SIGTERM)  # as Slurm or systemd: every process of the job, the reward workers too
    time.sleep(0.5)
    print(received, runner(["p"] * 4, completions).rewards.tolist(), flush=True)
    # and exit with the workers running, as a phase stopped by the signal does
"""


@pytest.mark.timeout(120)
def test_sigterm_to_the_process_group_neither_loses_the_batch_nor_hangs_the_exit(tmp_path):
    """The workers ignore a job-wide SIGTERM (the trainer finishes its batch: it is scored), and the exit with
    workers running ends them. (They used to die, the batch waited out its limit and scored 0, and
    ``multiprocessing.Pool``, whose shared queue lock a killed worker held, hung the exit for 880 s.)"""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "score.py"
    script.write_text(GROUP_SIGTERM_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                    os.environ.get("PYTHONPATH")])))
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output
    assert output.splitlines()[-2:] == ["[1.0, 0.0, 1.0, 0.0]", f"[{int(signal.SIGTERM)}] [1.0, 0.0, 1.0, 0.0]"], output
    assert time.monotonic() - started < 60
