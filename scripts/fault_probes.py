"""Replay the faults of a hostile but fair user and print a table of each with its outcome.

The probes are the fault tests themselves (tests/test_reward_faults.py, tests/test_faults.py and the
crash/resume test of tests/test_loop.py): each asserts one fault's intended outcome, so a passing test
means that outcome, a failing one a regression, and one that runs past its time limit a hang.
They run in one pytest process under pytest-timeout, the whole run under a wall-clock limit too.

    python scripts/fault_probes.py            # every probe (about 5 minutes on 2 cores)
    python scripts/fault_probes.py --fast     # without the end-to-end runs (about 2 minutes)
    python scripts/fault_probes.py --timeout 60

Outcomes: "clear error" (refused, the message names the culprit, before any compute or write where
that matters), "handled" (the run goes on or resumes correctly), "hang", "FAILED" (with the test's
first error line). CI runs the same tests (``pytest -q``; the slow one is marked).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Probe:
    fault: str
    outcome: str
    """What the test asserts when it passes."""
    test: str
    """pytest node id, relative to the repository."""
    slow: bool = False
    """An end-to-end ``rloop fit`` run (30-120 s)."""


REWARDS, FAULTS, LOOP = "tests/test_reward_faults.py::", "tests/test_faults.py::", "tests/test_loop.py::"
PROBES = [
    Probe("verifier never returns (set-up, in-process)", "clear error, bounded",
          REWARDS + "test_a_verifier_that_never_returns_is_refused_at_set_up_in_bounded_time[0]"),
    Probe("verifier never returns (set-up, 2 workers)", "clear error, bounded",
          REWARDS + "test_a_verifier_that_never_returns_is_refused_at_set_up_in_bounded_time[2]"),
    Probe("verifier stalls on every real completion", "handled, then clear error after max_bad_steps",
          REWARDS + "test_a_verifier_that_stalls_mid_training_costs_bounded_time_then_aborts_the_phase"),
    Probe("verifier stalls next to a working one", "handled: bounded, counted, warned",
          REWARDS + "test_a_stall_next_to_a_working_function_is_counted_and_training_goes_on"),
    Probe("reward function always raises", "clear error naming it",
          REWARDS + "test_a_function_that_raises_at_set_up_is_named"),
    Probe("reward function returns NaN (set-up)", "clear error naming it",
          REWARDS + "test_nan_rewards_are_refused_at_set_up"),
    Probe("reward function returns NaN (run time)", "handled: counted as errors, warned",
          REWARDS + "test_nan_rewards_at_run_time_are_counted_and_warned_as_errors"),
    Probe("two rloop fit on one run directory", "clear error at once naming the holder; first run intact",
          FAULTS + "test_a_second_fit_on_a_run_directory_is_refused_at_once_naming_the_holder", slow=True),
    Probe("lock holder SIGKILLed", "handled: the rerun takes the lock",
          FAULTS + "test_a_killed_holder_blocks_nothing_and_other_ranks_are_never_refused"),
    Probe("copied run directory, other reward_workers", "handled: resumes, nothing recomputed",
          FAULTS + "test_a_copied_run_directory_resumes_after_changes_that_compute_nothing_differently", slow=True),
    Probe("typo trainer.max_epochz in rft.overrides", "clear error before anything is written",
          FAULTS + "test_a_typo_in_a_phase_override_fails_before_anything_is_written"),
    Probe("base policy path does not exist", "clear error before anything is written",
          FAULTS + "test_a_missing_base_path_fails_before_anything_is_written[runs/no/such/policy]"),
    Probe("unknown built-in base policy", "clear error before anything is written",
          FAULTS + "test_an_unknown_built_in_policy_fails_before_anything_is_written"),
    Probe("truncated manifest.json", "clear error naming it and what to do",
          FAULTS + "test_a_corrupt_manifest_is_named_with_what_to_do"),
    Probe("non-UTF-8 byte in a local dataset", "clear error with file and line",
          FAULTS + "test_a_local_dataset_with_a_byte_that_is_not_utf8_names_file_and_line"),
    Probe("--iteration 3 for --iterations", "clear error",
          FAULTS + "test_long_options_are_never_abbreviated_and_the_tip_names_the_command[command0-abbreviation0-"
                   "rloop fit --help]"),
    Probe("rloop grpo fit --trainer.max_step 3", "clear error; tip names rloop grpo fit --help",
          FAULTS + "test_long_options_are_never_abbreviated_and_the_tip_names_the_command[command1-abbreviation1-"
                   "rloop grpo fit --help]"),
    Probe("SIGKILL mid-GRPO, mid-RFT, after a shard", "handled: resumes to identical expert sets",
          LOOP + "test_killed_runs_resume_to_the_same_expert_sets", slow=True),
]


def junit_outcomes(report: Path) -> dict[str, tuple[str, float, str]]:
    """``{test name with parameters: (passed|failed|skipped, seconds, first error line)}``."""
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        status = "passed" if problem is None else ("skipped" if problem.tag == "skipped" else "failed")
        message = (problem.get("message") or problem.text or "").strip().splitlines()[0] if problem is not None else ""
        outcomes[case.get("name")] = (status, float(case.get("time", 0)), message)
    return outcomes


def run_probes(probes: list[Probe], timeout: float) -> list[tuple[Probe, str, float]]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--timeout={timeout:g}",
                   f"--junitxml={report}", *(probe.test for probe in probes)]
        limit = timeout * len(probes) + 120
        started = time.monotonic()
        try:
            subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=limit)
        except subprocess.TimeoutExpired:
            pass
        outcomes = junit_outcomes(report) if report.exists() else {}
    rows = []
    for probe in probes:
        status, seconds, message = outcomes.get(probe.test.split("::")[-1], ("missing", time.monotonic() - started, ""))
        if status == "passed":
            outcome = probe.outcome
        elif "Timeout" in message or status == "missing":
            outcome = f"hang (no result within {timeout:g} s)"
        else:
            outcome = f"{status.upper()}: {message[:100]}"
        rows.append((probe, outcome, seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("--fast", action="store_true", help="skip the end-to-end rloop fit runs")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per probe before it counts as a hang")
    args = parser.parse_args(argv)
    probes = [probe for probe in PROBES if not (args.fast and probe.slow)]
    rows = run_probes(probes, args.timeout)
    print("| fault | outcome | s |\n|---|---|---:|")
    for probe, outcome, seconds in rows:
        print(f"| {probe.fault} | {outcome} | {seconds:.1f} |")
    return 0 if all(outcome == probe.outcome for probe, outcome, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
