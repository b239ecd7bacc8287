"""Replay the faults of a hostile but fair user and print a table of each with its outcome.

The probes are the fault tests themselves (tests/test_reward_faults.py, tests/test_faults.py, the
crash/resume test of tests/test_loop.py, and the second round's tests/test_preemption.py,
tests/test_checks.py, tests/test_data_errors.py, tests/test_resume_verify.py and
tests/test_command_inputs.py; from the third, tests/test_base_identity.py, tests/test_grpo.py,
tests/test_truncation.py, tests/test_reproduce_tiny.py, tests/test_agreement.py,
tests/test_async_rollouts.py, tests/test_micro_batches.py, tests/test_true_size.py and
tests/test_rft_micro_batches.py too): each
asserts one fault's intended outcome, so a passing test means that outcome, a failing one a
regression, and one that runs past its time limit a hang.
They run in one pytest process under pytest-timeout, the whole run under a wall-clock limit too.

    python scripts/fault_probes.py            # every probe (about 6 minutes on 2 cores)
    python scripts/fault_probes.py --fast     # without the end-to-end runs (about 3 minutes)
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
PREEMPT, CHECKS, DATA = "tests/test_preemption.py::", "tests/test_checks.py::", "tests/test_data_errors.py::"
VERIFY, COMMANDS = "tests/test_resume_verify.py::", "tests/test_command_inputs.py::"
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
    Probe("SIGTERM mid-GRPO phase", "handled: checkpoint after the batch, exit 143, resumes identically",
          PREEMPT + "test_a_signal_mid_phase_saves_a_checkpoint_exits_128_plus_signal_and_resumes[grpo_sigterm]"),
    Probe("SIGINT mid-RFT phase, at an epoch's last batch", "handled: checkpoint, exit 130, resumes identically",
          PREEMPT + "test_a_signal_mid_phase_saves_a_checkpoint_exits_128_plus_signal_and_resumes[rft_sigint]"),
    Probe("SIGTERM in a phase without checkpoint cadence", "handled: exit 143, no checkpoint",
          PREEMPT + "test_a_phase_without_checkpoint_cadence_stops_with_no_checkpoint_and_a_non_zero_status"),
    Probe("SIGTERM after a phase's last batch, during its export", "handled: exit 143, the phase redone on rerun",
          PREEMPT + "test_a_signal_after_the_last_batch_still_stops_the_run_with_a_non_zero_status"),
    Probe("SIGTERM then SIGINT on rloop fit (subprocess)", "handled: exit 143, then 130; the rerun resumes",
          PREEMPT + "test_sigterm_then_sigint_mid_loop_exit_143_and_130_and_the_rerun_resumes", slow=True),
    Probe("SIGTERM to the main one of 2 DDP processes", "handled: both stop after one step, exit 143",
          PREEMPT + "test_sigterm_to_the_main_process_of_two_ranks_stops_both_after_the_same_batch", slow=True),
    Probe("SIGTERM in a fit without PhaseCheckpoint (base build)", "handled: exit 143, not 0",
          PREEMPT + "test_lightning_sigterm_stop_outside_a_phase_checkpoint_exits_143"),
    Probe("reward function exits (set-up, in-process)", "clear error naming it",
          REWARDS + "test_a_reward_that_exits_at_set_up_is_a_named_error_never_a_clean_exit[0]"),
    Probe("reward function exits (set-up, 2 workers)", "clear error naming it",
          REWARDS + "test_a_reward_that_exits_at_set_up_is_a_named_error_never_a_clean_exit[2]"),
    Probe("reward exits mid-training; one raises KeyboardInterrupt", "clear error naming it",
          REWARDS + "test_a_reward_that_exits_mid_training_or_raises_keyboard_interrupt_is_a_named_error"),
    Probe("Ctrl-C during an in-process reward call", "handled: stays a KeyboardInterrupt",
          REWARDS + "test_a_real_ctrl_c_during_a_reward_call_stays_a_keyboard_interrupt"),
    Probe("reward mutates problem columns and completions", "handled: each call gets its own copy",
          REWARDS + "test_reward_functions_get_their_own_copies_of_problems_and_completions"),
    *(Probe(f"reward function returns a {kind}", "clear error naming it",
            REWARDS + f"test_a_reward_returning_a_set_generator_or_string_is_refused_by_name[{kind}]")
      for kind in ("set", "generator", "string")),
    *(Probe(f"{case.replace('_', ' ')}", "clear error naming phase and field, before anything is written",
            CHECKS + f"test_a_bad_value_fails_before_anything_is_written_naming_phase_and_field[{case}]")
      for case in ("num_generations_1", "grpo_batch_size_0", "max_new_tokens_0", "temperature_-1", "top_k_-1",
                   "reward_timeout_0", "grpo_limit_0", "grpo_max_steps_0", "rft_max_epochs_0", "rft_batch_size_0",
                   "rft_max_length_0", "devices_0", "hard_threshold_1.5", "hard_threshold_-0.5", "max_per_prompt_-1",
                   "checkpoint_every_n_steps_0", "checkpoint_every_seconds_0", "grpo_prompt_past_the_context")),
    *(Probe(f"evaluator {field} out of range", "clear error before anything is written",
            CHECKS + f"test_an_evaluator_value_fails_before_anything_is_written[{field}]")
      for field in ("limit", "num_samples", "reward_timeout")),
    Probe("1 MB prompt in an evaluation", "clear error before anything is written",
          CHECKS + "test_a_one_megabyte_prompt_in_an_evaluation_fails_before_anything_is_written"),
    Probe("bad values in rloop grpo fit, rloop rft fit, rloop eval", "clear error",
          CHECKS + "test_the_standalone_commands_check_the_same_values"),
    *(Probe(f"GSM8K question of type {kind}", "clear error with file and line",
            DATA + f"test_a_gsm8k_row_with_a_non_text_question_names_file_line_and_type[{kind}]")
      for kind in ("int", "list", "bool", "dict")),
    Probe("GSM8K answer is a number", "clear error with file and line",
          DATA + "test_a_gsm8k_answer_that_is_a_number_names_the_row"),
    Probe("MATH parquet column of the wrong type", "clear error with file and row",
          DATA + "test_a_parquet_column_of_the_wrong_type_names_file_and_row"),
    *(Probe(f"DAPO row: {case.replace('_', ' ')}", "clear error with file and line",
            DATA + f"test_dapo_rows_of_the_wrong_type_name_file_and_line[{case}]")
      for case in ("int_prompt", "list_content", "str_reward_model", "list_ground_truth")),
    *(Probe(f"{damage} parquet file", "clear error naming it", DATA + f"test_a_corrupt_parquet_file_is_named[{damage}]")
      for damage in ("garbage", "truncated")),
    Probe("hub dataset row of the wrong type", "clear error with dataset, split and row",
          DATA + "test_a_hub_row_of_the_wrong_type_names_dataset_split_and_row"),
    *(Probe(f"RFT record: {case.replace('_', ' ')}", "clear error with file and line",
            DATA + f"test_an_rft_record_of_the_wrong_type_names_file_and_line[{case}]")
      for case in ("null_prompt", "int_completion", "list_prompt")),
    Probe("RFT parquet column of the wrong type", "clear error with file and row",
          DATA + "test_an_rft_parquet_column_of_the_wrong_type_names_the_row"),
    Probe("RFT completion longer than the context", "handled: truncated to fit, counted, warned",
          DATA + "test_an_rft_phase_truncates_records_past_the_context_and_warns"),
    *(Probe(f"theta_k's weights: {damage}, then resume", "clear error naming the file, before anything runs",
            VERIFY + f"test_a_changed_or_missing_policy_is_refused_naming_the_file_before_anything_runs[{damage}]")
      for damage in ("flip", "truncate", "delete")),
    Probe("finished expert set deleted, resume with replay", "handled: rebuilt identically, replayed whole",
          VERIFY + "test_a_deleted_expert_set_is_rebuilt_identically_and_replay_uses_all_of_it"),
    Probe("expert set deleted and a harvest shard changed", "clear error naming the shard",
          VERIFY + "test_an_expert_set_whose_harvest_changed_is_refused"),
    Probe("finished evaluation deleted", "handled: redone to the same numbers",
          VERIFY + "test_a_deleted_evaluation_is_redone_to_the_same_numbers"),
    Probe("replay of a missing earlier expert set", "clear error naming it",
          VERIFY + "test_replay_of_a_missing_earlier_expert_set_is_an_error_never_a_smaller_set"),
    Probe("rloop report on a directory that is not a run", "clear error, nothing written",
          COMMANDS + "test_report_refuses_a_directory_that_is_not_a_run_and_writes_nothing"),
    Probe("rloop report --baseline missing", "clear error, nothing written",
          COMMANDS + "test_report_refuses_a_missing_baseline_before_writing"),
    *(Probe(f"rloop eval --output {case.replace('_', ' ')}", "clear error before evaluating",
            COMMANDS + f"test_eval_checks_its_output_before_evaluating[{case}]") for case in ("directory", "under_a_file")),
    *(Probe(f"run_dir with {kind} characters", "handled: paths reach the phases as written",
            COMMANDS + f"test_a_run_directory_with_non_ascii_characters_reaches_the_phases_as_written[{kind}]")
      for kind in ("latin", "cjk", "emoji")),
    Probe("run's .lock deleted while it runs, same fit again", "clear error naming the live holder",
          FAULTS + "test_a_live_holder_keeps_the_lock_when_its_file_is_deleted"),
    Probe("finished phase's logs appended to or deleted, resume", "handled: resumes, nothing redone",
          VERIFY + "test_changed_or_deleted_logs_do_not_block_resume"),
    Probe("theta_0's weights changed, resume", "clear error naming the base, before anything runs",
          VERIFY + "test_a_changed_base_refuses_to_resume_naming_it_before_anything_runs"),
    Probe("base directory rebuilt or deleted, resume", "clear error naming the base and file, before a rebuild",
          "tests/test_base_identity.py::test_a_base_the_run_builds_is_recorded_once_built_and_a_deleted_one_refused"
          "_before_a_rebuild"),
    Probe("hub base's cached main moved to a new commit, resume", "clear error naming both commits",
          "tests/test_base_identity.py::test_a_hub_base_whose_cache_moved_to_another_commit_refuses_to_resume"
          "_naming_both"),
    Probe("importance weights computed and logged but not applied", "handled: the weights scale the gradient",
          "tests/test_grpo.py::test_importance_weights_scale_the_gradient_of_the_loss"),
    Probe("LoRA dropout in the old-policy and training passes", "handled: dropout off, ratio exactly 1 at a step's start",
          "tests/test_grpo.py::test_old_log_probs_are_those_of_an_eval_pass_and_each_step_starts_at_ratio_one_under_lora_"
          "dropout"),
    Probe("top-k ties at the k-th logit, a sampler keeping exactly k", "handled: scored with the sampler's tie rule",
          "tests/test_truncation.py::test_exact_ties_give_every_token_of_an_exactly_k_sampler_its_sampler_log_prob[5]"),
    Probe("a top-k sampler with neither tie rule", "clear error naming sampling.top_k",
          "tests/test_truncation.py::test_the_tie_rule_of_each_engine"),
    Probe("RFT records whose completions are all empty", "clear error naming the file",
          "tests/test_data_errors.py::test_rft_records_that_are_all_empty_completions_are_refused_naming_the_file"),
    Probe("one empty RFT completion among others", "handled: left out, warned naming its line/row",
          "tests/test_data_errors.py::test_an_empty_rft_completion_among_others_is_left_out_with_a_warning_naming_its_row"),
    *(Probe(f"tokenizer: {case.replace('_', ' ')}", "clear error naming the model, before any weights load",
            CHECKS + f"test_a_broken_tokenizer_is_named_before_any_weights_load[{case}]")
      for case in ("template_syntax", "template_raises", "template_renders_nothing", "eos_past_the_embedding")),
    *(Probe(f"{case.replace('_', ' ')}", "clear error naming the seed setting",
            CHECKS + f"test_a_seed_numpy_cannot_take_is_named[{case}]")
      for case in ("loop_seed_negative", "loop_seed_past_the_last_phase", "phase_seed_everything")),
    *(Probe(f"run_dir is a file ({where.replace('_', ' ')})", "clear error before anything is written",
            CHECKS + f"test_a_run_dir_that_is_a_file_is_named_before_anything_is_written[{where}]")
      for where in ("file", "under_a_file")),
    Probe("a prompt longer than the context on its own", "clear error: no max_new_tokens fits",
          CHECKS + "test_a_prompt_that_fills_the_context_on_its_own_is_told_so"),
    *(Probe(f"missing relative data path, {case.replace('_', ' ')}", "clear error naming task and field, no Hub request",
            DATA + f"test_a_missing_relative_data_path_is_no_such_file_never_a_hub_request[{case}]")
      for case in ("under_a_local_directory", "not_a_hub_id", "dot_relative")),
    Probe("hub dataset that cannot be loaded", "clear error naming the source and working directory",
          DATA + "test_a_hub_dataset_that_cannot_be_loaded_names_the_source_and_the_working_directory"),
    *(Probe(f"reward closes sys.stdout ({workers} workers)", "clear error naming it; the stream usable again",
            REWARDS + f"test_a_reward_that_closes_stdout_is_named_and_the_stream_is_usable_again[{workers}]")
      for workers in (0, 2)),
    *(Probe(f"rloop fit, reward {case.replace('_', ' ')}", "clear error naming it, before theta_0 is evaluated",
            REWARDS + f"test_rloop_fit_probes_the_rewards_before_any_evaluation[{case}]")
      for case in ("set", "exits", "spins_2_workers")),
    *(Probe(f"{case.replace('_', ' ')}", "clear error naming the setting, before anything is written",
            CHECKS + f"test_a_bad_value_fails_before_anything_is_written_naming_phase_and_field[{case}]")
      for case in ("curve_every_n_steps_0", "curve_past_a_phase", "curve_without_evaluators",
                   "best_validation_without_validation")),
    Probe("validation split the train split leaves no room for", "clear error naming num_train and num_validation, "
          "before anything is written",
          CHECKS + "test_an_evaluator_value_fails_before_anything_is_written[validation_split_without_room]"),
    Probe("study search choosing on the test or OOD split", "clear error naming --select-split, before any run",
          "tests/test_reproduce_tiny.py::test_a_search_that_would_read_the_test_split_is_refused_before_anything_runs"),
    Probe("FSDP2, HF engine: ranks refill different amounts (2 ranks)", "handled: as many generate calls on every rank",
          "tests/test_agreement.py::test_dynamic_sampling_runs_as_many_rounds_on_every_rank_under_fsdp2", slow=True),
    Probe("a main-process step fails: expert set, export, checkpoint (2 ranks)", "clear error on every rank at once",
          "tests/test_agreement.py::test_every_rank_gets_the_same_answers_and_errors_on_two_processes"),
    Probe("rloop fit with async rollouts on 2 ranks", "clear error before any rank or model starts",
          "tests/test_agreement.py::test_async_rollouts_on_several_ranks_are_refused_by_rloop_fit_before_any_rank_or_"
          "model_starts"),
    Probe("a reward exits on rank 1 of 2", "clear error: RewardFunctionExit on every rank",
          "tests/test_agreement.py::test_a_reward_that_exits_on_one_rank_stops_every_rank_with_its_named_error",
          slow=True),
    Probe("SIGTERM to the process group: async sampler mid-batch, 2 reward workers",
          "handled: the batch is sampled and scored, checkpoint, exit 143",
          PREEMPT + "test_sigterm_to_the_whole_process_group_with_a_sampler_and_reward_workers_stops_after_the_batch",
          slow=True),
    Probe("SIGTERM to the process group with 2 reward workers", "handled: the batch is scored, the exit does not hang",
          REWARDS + "test_sigterm_to_the_process_group_neither_loses_the_batch_nor_hangs_the_exit"),
    Probe("trainer SIGKILLed while its sampler starts", "handled: the sampler exits at once",
          "tests/test_async_rollouts.py::test_a_trainer_sigkilled_while_its_sampler_starts_leaves_no_sampler"),
    Probe("async sampler alive but stalled", "clear error naming rollout.timeout (default 1800 s), sampler stopped",
          "tests/test_async_rollouts.py::test_a_stalled_sampler_is_a_named_timeout_by_default_and_close_stops_it_at_once"),
    Probe("micro_batch_tokens below the longest prompt + max_new_tokens", "clear error naming micro_batch_tokens, "
          "before the model loads",
          "tests/test_micro_batches.py::test_a_budget_below_the_longest_prompt_and_completion_is_refused_before_the_"
          "model_loads"),
    Probe("FSDP2, token budget: ranks cut different numbers of micro-batches (2 ranks)",
          "handled: as many micro-batches on every rank, the same gradients",
          "tests/test_micro_batches.py::test_ranks_with_unequal_lengths_run_as_many_micro_batches_and_keep_the_"
          "gradients"),
    Probe("benchmarks.true_size: recipe's model config not in the repository", "clear error naming recipe, field, file",
          "tests/test_true_size.py::test_a_recipe_whose_model_config_is_not_in_the_repository_is_refused_naming_it"),
    Probe("benchmarks.true_size: a recipe that is not GRPO", "clear error naming the fields",
          "tests/test_true_size.py::test_a_recipe_that_is_not_grpo_is_refused_naming_the_fields"),
    Probe("benchmarks.true_size: a size beyond the machine's memory", "clear error before allocating",
          "tests/test_true_size.py::test_a_size_beyond_the_machines_memory_is_refused_before_allocating"),
    Probe("RFT micro_batch_tokens below the longest record, or with accumulate_grad_batches / gradient_clip_val",
          "clear error naming micro_batch_tokens (and the Trainer setting) before the model loads; records drawn "
          "as they load: at the first batch",
          "tests/test_rft_micro_batches.py::test_a_budget_below_the_longest_record_is_refused_naming_it"),
    Probe("RFT, FSDP2, token budget: ranks cut different numbers of micro-batches (2 ranks)",
          "handled: as many micro-batches on every rank, the uncut gradient",
          "tests/test_rft_micro_batches.py::test_ranks_with_unequal_lengths_agree_on_micro_batches_and_keep_the_gradient"),
    Probe("balance_ranks without micro_batch_tokens", "clear error naming balance_ranks and micro_batch_tokens, "
          "before the model loads",
          "tests/test_micro_batches.py::test_balancing_ranks_without_a_token_budget_is_refused_naming_the_setting"),
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
