"""`rloop report`: metrics ordered for reading (test splits first, then avg@n, pass@k by k, the rest),
pass@1 shown once (it repeats avg@n), and step curves with no line across steps without data."""

import math

from rloop_lightning.loop.report import _plot_steps, _splits, metric_table, step_segments


def run(evals):
    return {"name": "r", "evals": evals}


def test_table_puts_the_test_split_first_and_pass_at_k_in_numeric_order():
    results = {"countdown/ood": {"pass@16": 0.2, "avg@128": 0.02, "pass@4": 0.1},
               "countdown/test": {"greedy_accuracy": 0.3, "pass@32": 0.9, "pass@4": 0.5, "avg@128": 0.2}}
    keys, rows = metric_table(run([("theta_0", results)]))
    assert keys == ["countdown/test/avg@128", "countdown/test/pass@4", "countdown/test/pass@32",
                    "countdown/test/greedy_accuracy", "countdown/ood/avg@128", "countdown/ood/pass@4",
                    "countdown/ood/pass@16"]
    assert rows == [["theta_0", "0.200", "0.500", "0.900", "0.300", "0.020", "0.100", "0.200"]]


def test_plots_get_one_pass_at_k_panel_per_split_test_first_across_runs():
    first = run([("theta_0", {"b/ood": {}, "b/test": {}})])
    second = run([("theta_0", {"a/test": {}})])
    assert _splits([first, second]) == ["a/test", "b/test", "b/ood"]


def test_table_shows_pass_at_1_once_where_it_repeats_avg_at_n():
    results = {"countdown/test": {"avg@128": 0.25, "pass@1": 0.25, "pass@4": 0.6},
               "countdown/ood": {"avg@128": 0.05, "pass@1": 0.07}}  # not the same number: both stay
    keys, rows = metric_table(run([("theta_0", results), ("theta_1", results)]))
    assert keys == ["countdown/test/avg@128", "countdown/test/pass@4", "countdown/ood/avg@128",
                    "countdown/ood/pass@1"]
    assert rows[1] == ["theta_1", "0.250", "0.600", "0.050", "0.070"]


def steps_with_gaps():
    """Two 40-step iterations where the forgetting rate exists only at steps 32-39 of each
    (prompts come back after one pass over the pool), and is NaN at step 35 of the second."""
    steps = []
    for k in range(2):
        for index in range(40):
            step = {"rl_step": 40 * k + index, "iteration": k, "train/reward_mean": 0.5}
            if index >= 32:
                step["rloop/forgetting_rate"] = float("nan") if (k, index) == (1, 35) else 0.1 * index
            steps.append(step)
    return steps


def test_step_segments_stop_at_missing_values_and_iteration_boundaries():
    segments = step_segments(steps_with_gaps(), "rloop/forgetting_rate")
    assert [xs for xs, _ in segments] == [list(range(32, 40)), [72, 73, 74], [76, 77, 78, 79]]
    assert segments[0][1][0] == 3.2
    assert [xs for xs, _ in step_segments(steps_with_gaps(), "train/reward_mean")] == [
        list(range(40)), list(range(40, 80))]


def test_step_plot_draws_no_line_across_steps_without_data():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    try:
        _plot_steps(axis, [{"name": "r", "steps": steps_with_gaps()}], "rloop/forgetting_rate", "forgetting rate")
        xs = axis.lines[0].get_xdata()
        joined = [(a, b) for a, b in zip(xs, xs[1:]) if not (math.isnan(a) or math.isnan(b))]
    finally:
        plt.close(figure)
    assert joined and all(b - a == 1 for a, b in joined), joined
