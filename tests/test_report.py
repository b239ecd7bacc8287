"""`rloop report` orders metrics for reading: test splits first, then avg@n, pass@k by k, the rest."""

from rloop_lightning.loop.report import _splits, metric_table


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
