"""scripts/reproduce_tiny.py tabulates study arms from run directories (no runs are made here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rloop_lightning.records import write_json_atomic
from rloop_lightning.loop.layout import BASE_EVALUATION, RunLayout
from loop_helpers import curve_run
from script_modules import load_script



@pytest.fixture(scope="module")
def script():
    return load_script("reproduce_tiny")


def evaluation(pass_1: float, pass_32: float, ood_pass_32: float) -> dict:
    """Metrics as the loop writes them: ``{"task/split": {metric: value}}``; avg@n equals pass@1,
    and the OOD split has no greedy accuracy."""
    return {"countdown/ood": {"avg@128": 0.02, "pass@1": 0.02, "pass@32": ood_pass_32},
            "countdown/test": {"avg@128": pass_1, "pass@1": pass_1, "pass@32": pass_32, "greedy_accuracy": 0.3}}


def make_run(run_dir: Path, base: dict, final: dict, iterations: int = 2) -> Path:
    """A finished run directory in the loop's layout: theta_0's evaluation, then one per iteration
    (only the last one carries ``final``)."""
    layout = RunLayout(run_dir)
    write_json_atomic(layout.evaluation(BASE_EVALUATION), {"policy": "base", "metrics": base})
    for k in range(iterations):
        metrics = final if k == iterations - 1 else evaluation(0.0, 0.0, 0.0)
        write_json_atomic(layout.evaluation(layout.phase("eval", k)), {"policy": f"theta_{k + 1}", "metrics": metrics})
    layout.manifest.write_text(json.dumps({"completed": [], "config": {"iterations": iterations}}))
    return run_dir


@pytest.fixture
def study(tmp_path):
    base = evaluation(0.2, 0.9, 0.25)
    for seed, (pass_1, pass_32) in enumerate([(0.30, 0.80), (0.32, 0.90)]):
        make_run(tmp_path / f"rloop_s{seed}", base, evaluation(pass_1, pass_32, 0.4))
    make_run(tmp_path / "grpo_s0", base, evaluation(0.4, 0.7, 0.1), iterations=3)
    return tmp_path


def test_side_study_table_has_one_row_per_arm_in_command_line_order(script, study):
    text = script.study_tables([("base", f"theta_0={study}/rloop_s0"), ("final", f"rloop={study}/rloop_s*"),
                                ("final", f"grpo={study}/grpo_s0")], metrics=["pass@1", "pass@32", "greedy_accuracy"])
    assert text.splitlines() == [
        "### countdown/test", "",
        "| run | seeds | pass@1 | pass@32 | greedy_accuracy |", "|---|---|---|---|---|",
        "| theta_0 | 1 | 0.200 | 0.900 | 0.300 |",
        "| rloop | 2 | 0.310 ± 0.014 | 0.850 ± 0.071 | 0.300 ± 0.000 |",
        "| grpo | 1 | 0.400 | 0.700 | 0.300 |", "",
        "### countdown/ood", "",
        "| run | seeds | pass@1 | pass@32 | greedy_accuracy |", "|---|---|---|---|---|",
        "| theta_0 | 1 | 0.020 | 0.250 | - |",
        "| rloop | 2 | 0.020 ± 0.000 | 0.400 ± 0.000 | - |",
        "| grpo | 1 | 0.020 | 0.100 | - |"]


def test_default_columns_show_pass_at_1_once(script):
    assert "pass@1" in script.METRICS and not any(m.startswith("avg@") for m in script.METRICS)


def test_final_evaluation_is_the_last_iteration_that_has_one(script, tmp_path):
    run_dir = make_run(tmp_path / "run", evaluation(0.2, 0.9, 0.2), evaluation(0.5, 0.5, 0.5))
    RunLayout(run_dir).directory(RunLayout.phase("grpo", 2)).mkdir(parents=True)  # a third iteration, unfinished
    assert script.final_eval(run_dir)["countdown/test"]["pass@1"] == 0.5
    with pytest.raises(FileNotFoundError, match="no iteration has an evaluation"):
        script.final_eval(tmp_path / "empty")


def test_a_run_counts_as_finished_only_with_the_evaluation_of_its_last_iteration(script, tmp_path):
    base = evaluation(0.2, 0.9, 0.2)
    done = make_run(tmp_path / "done", base, evaluation(0.3, 0.8, 0.3), iterations=2)
    stopped = make_run(tmp_path / "stopped", base, evaluation(0.3, 0.8, 0.3), iterations=2)
    RunLayout(stopped).evaluation(RunLayout.phase("eval", 1)).unlink()  # killed after theta_1's evaluation
    assert script.finished(done) and not script.finished(stopped)
    assert script.final_eval(stopped)["countdown/test"]["pass@1"] == 0.0  # theta_1's, not a theta_K
    (tmp_path / "no_manifest").mkdir()
    assert not script.finished(tmp_path / "no_manifest")
    trl = make_run(tmp_path / "trl", base, evaluation(0.3, 0.8, 0.3), iterations=2)
    RunLayout(trl).manifest.write_text(json.dumps({"trl": True, "steps": 80, "seed": 0}))  # scripts/trl_arm.py's
    assert script.finished(trl)


def test_command_line_prints_the_tables_under_the_command_that_made_them(script, study, capsys):
    argv = ["--arm", f"rloop={study}/rloop_s*", "--arm", f"grpo={study}/grpo_s0", "--split", "countdown/test",
            "--metrics", "avg@n", "pass@32"]
    script.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Produced by `python scripts/reproduce_tiny.py --arm") and "grpo_s0" in lines[0]
    assert lines[2:] == ["### countdown/test", "", "| run | seeds | avg@n | pass@32 |", "|---|---|---|---|",
                         "| rloop | 2 | 0.310 ± 0.014 | 0.850 ± 0.071 |", "| grpo | 1 | 0.400 | 0.700 |", ""]
    with pytest.raises(SystemExit, match="no run directory matches"):
        script.main(["--arm", f"missing={study}/nothing_*"])


def test_results_page_keeps_its_prose_and_replaces_only_the_config_block(script, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nProse.\n\n<!-- reproduce_tiny: tiny_cpu -->\nold table\n"
                   "<!-- end reproduce_tiny: tiny_cpu -->\n\nMore prose.\n")
    script.write_results(doc, "tiny_cpu", "new table")
    script.write_results(doc, "tiny_cpu_arithmetic", "arithmetic table")
    assert doc.read_text() == (
        "# Results\n\nProse.\n\n<!-- reproduce_tiny: tiny_cpu -->\nnew table\n"
        "<!-- end reproduce_tiny: tiny_cpu -->\n\nMore prose.\n\n"
        "<!-- reproduce_tiny: tiny_cpu_arithmetic -->\narithmetic table\n<!-- end reproduce_tiny: tiny_cpu_arithmetic -->\n")


# ---------------------------------------------------------------------------- choosing on validation


def held_out(value: float):
    """A test split with avg@n ``value`` after theta_0 (0.1) and pass@32 0.5."""
    return lambda step: {"countdown/test": {"avg@4": value if step else 0.1, "pass@32": 0.5}}


def test_quick_study_chooses_on_validation_and_plots_the_curves(script, tmp_path, monkeypatch):
    """--quick --report-only: RLoop leads on test, vanilla on validation: the search picks vanilla."""
    monkeypatch.setattr(script, "run_one", lambda *args: pytest.fail("--report-only ran a run"))
    out = tmp_path / "study"
    curve_run(out / "tiny_cpu" / "rloop_seed0", vanilla=False, validation=[0.1, 0.2, 0.3, 0.2, 0.25], other=held_out(0.6))
    curve_run(out / "tiny_cpu" / "vanilla_seed0", vanilla=True, validation=[0.1, 0.3, 0.4, 0.5, 0.45], other=held_out(0.4))
    doc = tmp_path / "docs" / "results.md"
    script.main(["--quick", "--report-only", "--out", str(out), "--doc", str(doc)])
    text = doc.read_text()
    assert ("Chosen on countdown/validation (avg@n of theta_K, mean over seeds): **vanilla** "
            "(`vanilla` 0.450, `rloop` 0.250)") in text
    assert "| rloop: theta_K | 1 | 0.250 | 0.750 |" in text  # validation avg@n and pass@32
    assert "| vanilla: best on validation | 1 | 0.500 | 1.000 |" in text  # step 6, mid-phase
    assert script.curve_series(out / "tiny_cpu" / "rloop_seed0", "countdown/validation") == {
        0: 0.1, 2: 0.2, 4: 0.3, 6: 0.2, 8: 0.25}
    assert script.curve_series(out / "tiny_cpu" / "rloop_seed0", "countdown/validation", rft=True) == {4: 0.3, 8: 0.25}
    assert script.curve_series(out / "tiny_cpu" / "rloop_seed0", "countdown/validation", name="pass@32") == pytest.approx(
        {0: 0.6, 2: 0.7, 4: 0.8, 6: 0.7, 8: 0.75})  # loop_helpers.curve_run: pass@32 = avg + 0.5
    assert (tmp_path / "docs" / "results" / "tiny_cpu_curves.png").stat().st_size > 0
    assert "![held-out avg@n over RL steps, countdown/test](results/tiny_cpu_curves.png)" in text


def test_a_search_that_would_read_the_test_split_is_refused_before_anything_runs(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "run_one", lambda *args: pytest.fail("a run started"))
    for split in ("countdown/test", "countdown/ood"):
        with pytest.raises(SystemExit, match=f"--select-split {split}: settings are chosen on a validation split"):
            script.main(["--quick", "--select-split", split, "--out", str(tmp_path / "study")])
    assert not (tmp_path / "study").exists()
