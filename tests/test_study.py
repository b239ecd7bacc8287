"""scripts/study.py (the search on validation, the final tables, the paired tests) and
``loop.significance``: pure functions against hand computations, the pipeline on run directories in the
loop's layout (no run is made here: each piece it calls, the loop with a curve and ``rloop eval``, is
tested end to end elsewhere)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rloop_lightning.loop.significance import PairedTest, paired_t_test, regularized_beta, t_two_sided_p
from loop_helpers import curve_run
from script_modules import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("study")


# ---------------------------------------------------------------------------- the paired t-test


def test_paired_t_test_matches_a_hand_computation():
    # d = [0.5, 0.1, 1.0, 0.9, 0.4]: mean 0.58, std sqrt(0.548 / 4) = 0.370135, t = 0.58 / (0.370135 / sqrt 5)
    test = paired_t_test([1, 2, 3, 4, 5], [0.5, 1.9, 2.0, 3.1, 4.6])
    assert test.n == 5 and test.mean_difference == pytest.approx(0.58)
    assert test.t == pytest.approx(0.58 / (math.sqrt(0.548 / 4) / math.sqrt(5)), rel=1e-12)
    assert test.p == pytest.approx(0.024808, abs=1e-6) and test.significant()
    assert paired_t_test([0.5, 1.9, 2.0, 3.1, 4.6], [1, 2, 3, 4, 5]).t == pytest.approx(-test.t)  # sign follows a - b


def test_the_t_distribution_at_its_critical_values():
    assert t_two_sided_p(2.776445, 4) == pytest.approx(0.05, abs=1e-6)  # 5 seeds: the 0.05 threshold
    assert t_two_sided_p(2.228139, 10) == pytest.approx(0.05, abs=1e-6)
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)  # Cauchy: P(|T| >= 1) = 1/2
    assert t_two_sided_p(0.0, 4) == 1.0
    assert regularized_beta(0.3, 1.0, 1.0) == pytest.approx(0.3)  # uniform
    assert regularized_beta(0.3, 2.0, 3.0) == pytest.approx(0.3483, abs=1e-12)  # 1 - sum_{j<2} C(4,j) 0.3^j 0.7^(4-j)
    assert not PairedTest(0.1, 2.776445, 0.05, 5).significant() and PairedTest(0.1, 2.8, 0.0499, 5).significant()


def test_degenerate_and_bad_pairs():
    assert paired_t_test([1.0, 1.0], [1.0, 1.0]).p == 1.0
    constant = paired_t_test([2.0, 3.0], [1.0, 2.0])  # every difference is 1: no spread
    assert constant.t == math.inf and constant.p == 0.0
    with pytest.raises(ValueError, match="at least 2 seeds, got 1"):
        paired_t_test([1.0], [0.0])
    with pytest.raises(ValueError, match="one value of each arm per seed, got 2 and 3"):
        paired_t_test([1.0, 2.0], [1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------- the search reads validation only


def test_a_search_config_with_a_test_or_ood_evaluator_is_refused_before_anything_runs(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run", lambda *args: pytest.fail("a run started"))
    config = Path("configs/study/countdown.yaml")
    for split in ("test", "ood"):
        text = config.read_text().replace("split: validation", f"split: {split}")
        bad = tmp_path / f"{split}.yaml"
        bad.write_text(text)
        monkeypatch.setattr(study, "config_of", lambda task, model="tiny", bad=bad: str(bad))
        with pytest.raises(SystemExit, match=f"{bad}: the search evaluates the validation split only .* it has {split}"):
            study.main(["--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "results.md")])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results.md").exists()


def test_the_shipped_study_configs_evaluate_validation_only_and_run_equal_rl_steps(study):
    import yaml

    for task in study.TASKS:
        study.check_search_config(study.config_of(task))
        loop = yaml.safe_load(Path(study.config_of(task)).read_text())
        assert loop["iterations"] * loop["grpo"]["overrides"]["trainer.max_steps"] == study.STEPS
        assert loop["grpo"]["overrides"]["data.init_args.limit"] == study.POOL
        assert loop["iterations"] == study.CONFIG_K
        for arm, (k, _) in study.SEARCH_ARMS.items():
            flags = study.arm_flags(arm)
            if k == study.CONFIG_K:  # the config as shipped
                assert "--grpo.overrides" not in flags and "--iterations" not in flags, arm
                continue
            # restated overrides: K x steps is still STEPS, everything else as the config has it
            assert int(flags[flags.index("--iterations") + 1]) == k
            overrides = json.loads(flags[flags.index("--grpo.overrides") + 1])
            assert k * overrides["trainer.max_steps"] == study.STEPS, arm
            assert {key: value for key, value in overrides.items() if key != "trainer.max_steps"} == {
                key: value for key, value in loop["grpo"]["overrides"].items() if key != "trainer.max_steps"}


def test_another_pool_restates_every_arms_overrides_with_that_pool(study):
    for arm, (k, arm_only) in study.SEARCH_ARMS.items():
        flags = study.arm_flags(arm, pool=512)
        overrides = json.loads(flags[flags.index("--grpo.overrides") + 1])
        assert overrides["data.init_args.limit"] == 512 and k * overrides["trainer.max_steps"] == study.STEPS
        assert flags[:2] == ["--iterations", str(k)] and all(flag in flags for flag in arm_only)


def test_another_pool_reads_and_writes_its_own_directory(study, tmp_path):
    with pytest.raises(SystemExit, match=f"no finished search runs under {tmp_path}/countdown_pool512/search"):
        study.main(["--pool", "512", "--report-only", "--out", str(tmp_path), "--doc", str(tmp_path / "results.md")])


def test_the_map_marks_ahead_level_and_behind(study):
    assert study.versus((0.3, 0.8), (0.3, 0.7)) == "=/+"
    assert study.versus((0.2999, 0.8), (0.3, 0.8)) == "-/="


def test_every_arm_is_described(study):
    assert set(study.DESCRIPTIONS) == set(study.ARMS)


def test_the_choice_needs_plain_grpos_pass_at_32_of_the_same_rule(study):
    plain = {"rl_end": (0.30, 0.80), "best_validation": (0.32, 0.85)}
    scores = {study.PLAIN: plain,
              "a": {"theta_K": (0.35, 0.79), "rl_end": (0.31, 0.80), "best_validation": (0.40, 0.84)},
              "b": {"theta_K": (0.33, 0.90)}}
    # a/theta_K (0.35) misses 0.80; a/best_validation (0.40) misses 0.85; a/rl_end ties 0.80: counts
    assert study.choose_setting(scores) == ("b", "theta_K", True)
    scores["b"] = {"theta_K": (0.30, 0.79)}
    assert study.choose_setting(scores) == ("a", "rl_end", True)  # exactly at plain GRPO's pass@32
    scores["a"]["rl_end"] = (0.31, 0.7999)
    assert study.choose_setting(scores) == ("a", "best_validation", False)  # none reaches it: highest avg@n


# ---------------------------------------------------------------------------- the pipeline on finished runs


def test_quick_study_searches_on_validation_then_tabulates_test_with_paired_tests(study, tmp_path, monkeypatch):
    """--quick --report-only on finished runs: the search picks RLoop's best saved policy on validation
    (0.6 against plain GRPO's 0.5 and pass@32 1.1 against 1.0); the final tables read test only through
    the answers' evaluations; RLoop is ahead by 0.1 on every seed but one (paired test)."""
    monkeypatch.setattr(study, "run", lambda *args: pytest.fail("--report-only ran a run"))
    out = tmp_path / "runs"
    search = out / "countdown" / "search"
    curve_run(search / "plain_grpo_seed100", True, [0.1, 0.3, 0.5, 0.4, 0.3])
    curve_run(search / "rloop_k6_hard_seed100", False, [0.1, 0.2, 0.6, 0.3, 0.2])
    final = out / "countdown" / "final"
    evaluated = []

    def evaluate(task, run_dir, seed, model):  # the answers' test evaluations, as rloop eval writes them
        evaluated.append((run_dir.name, seed))
        rloop = "rloop" in run_dir.name
        lead = 0.1 + 0.01 * seed if rloop else 0.0
        return {output: {"rl_step": 8, "label": output, "metrics": {
                    "countdown/test": {"avg@128": 0.3 + lead, "pass@4": 0.5, "pass@16": 0.7, "pass@32": 0.8 + lead}}}
                for output in (("theta_K", "rl_end", "best_validation") if rloop else ("rl_end", "best_validation"))}

    monkeypatch.setattr(study, "evaluate_answers", evaluate)
    for seed in (0, 1):
        curve_run(final / f"plain_grpo_seed{seed}", True, [0.1, 0.3, 0.5, 0.4, 0.3])
        curve_run(final / f"rloop_k6_hard_seed{seed}", False, [0.1, 0.2, 0.6, 0.3, 0.2])
    curve_run(final / "rloop_k6_hard_seed2", False, [0.1, 0.2, 0.6, 0.3, 0.2])  # --quick: 2 final seeds only
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nProse.\n")
    study.main(["--quick", "--report-only", "--out", str(out), "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith("# Results\n\nProse.\n\n<!-- study: countdown -->\n") and "<!-- end study: countdown -->" in text
    assert "| plain_grpo | plain GRPO, 6 phases of 20 RL steps chained | (its end point) | 0.300 / 0.800 | 0.500 / 1.000 |" in text
    assert "| rloop_k6_hard | K = 6 x 20 RL steps; hard prompts only (solved <= 0.5), 2 per prompt, replay | 0.200 / 0.700 (-/-) | 0.200 / 0.700 (-/-) | 0.600 / 1.100 (+/+) |" in text
    assert "Chosen on validation: **rloop_k6_hard**, answer **best_validation**" in text
    assert sorted(evaluated) == [("plain_grpo_seed0", 0), ("plain_grpo_seed1", 1),
                                 ("rloop_k6_hard_seed0", 0), ("rloop_k6_hard_seed1", 1)]
    assert "| rloop_k6_hard: best saved on validation | 2 | 0.405 ± 0.007 | 0.500 ± 0.000 |" in text
    assert "| plain GRPO: end point | 2 | 0.300 ± 0.000 |" in text
    # d = [0.10, 0.11]: mean 0.105, std 0.00707, t = 21.0, df = 1: p = 0.0303
    tests = text[text.index("| RLoop | plain GRPO |"):].splitlines()
    assert tests[2] == ("| **rloop_k6_hard: best saved on validation** | plain GRPO: end point | countdown/test | "
                        "+0.105 (21.00, 0.030) * | +0.105 (21.00, 0.030) * |")  # the committed test first
    assert tests[3].startswith("| **rloop_k6_hard: best saved on validation** | plain GRPO: best saved on validation |")
    assert text.index("Final: ") < text.index("Search: ")  # the page reads the comparison first
    assert (tmp_path / "docs" / "results" / "study_countdown_curves.png").stat().st_size > 0


def test_answers_are_evaluated_once_per_policy_and_read_as_rloop_eval_writes_them(study, tmp_path, monkeypatch):
    from rloop_lightning import cli

    run_dir = curve_run(tmp_path / "rloop_k6_hard_seed3", False, [0.1, 0.2, 0.3, 0.4, 0.9])  # best: the last RL end
    monkeypatch.setattr(cli, "evaluate_policy", lambda policy, evaluators, engine, seed: {
        "countdown/test": {"avg@128": len(policy) / 1000 + seed}})
    calls = []

    def run(command, **kwargs):  # `rloop eval ...` in-process: the real writer of the --output file
        flags = dict(zip(command[4::2], command[5::2]))
        calls.append(flags["--policy.model_name_or_path"])
        cli.evaluate(flags["--policy.model_name_or_path"], [], output=flags["--output"], seed=int(flags["--seed"]))

    monkeypatch.setattr(study.subprocess, "run", run)
    found = study.evaluate_answers("countdown", run_dir, 3)
    rl_end, theta_k = str(run_dir / "iter_01/grpo/policy"), str(run_dir / "iter_01/rft/policy")
    assert calls == [theta_k, rl_end]  # best saved on validation is the last RL end: evaluated once
    assert found["rl_end"] == found["best_validation"]
    assert found["theta_K"]["metrics"] == {"countdown/test": {"avg@128": len(theta_k) / 1000 + 3}}
    assert sorted(path.name for path in (run_dir / "study_eval").iterdir()) == ["rl_end.json", "theta_K.json"]
    assert study.evaluate_answers("countdown", run_dir, 3) == found and len(calls) == 2  # written files are reused


def test_paired_tests_pair_runs_by_seed(study):
    """RLoop finished seeds 0, 1, 2 and plain GRPO 0 and 2: the tests pair seeds 0 and 2 only."""
    def evaluation(avg):
        return {"rl_end": {"metrics": {"countdown/test": {"avg@128": avg, "pass@32": 0.8}}}}

    runs = {study.PLAIN: [Path("plain_grpo_seed0"), Path("plain_grpo_seed2")],
            "rloop_k6_hard": [Path(f"rloop_k6_hard_seed{s}") for s in (0, 1, 2)]}
    evals = {Path("plain_grpo_seed0"): evaluation(0.3), Path("plain_grpo_seed2"): evaluation(0.3)}
    evals |= {Path(f"rloop_k6_hard_seed{s}"): evaluation(0.4 + 0.01 * s) for s in (0, 1, 2)}
    lines = study.final_section("countdown", "rloop_k6_hard", "rl_end", runs, evals)
    # d = [0.10, 0.12]: mean 0.11, std 0.01414, t = 11.0, df = 1: p = 1 - 2 atan(11) / pi = 0.0577
    assert "| **rloop_k6_hard: last RL end** | plain GRPO: end point | countdown/test | +0.110 (11.00, 0.058) | +0.000 (-, 1.000) |" in lines


def test_an_arm_of_other_phases_is_also_compared_with_plain_grpo_in_those_phases(study):
    """K = 2 x 60 against plain GRPO in 6 x 20 (the search's) and in 2 x 60 (same optimizer restarts, same data
    order per phase); K = 6 x 20 arms have the search's plain GRPO only."""
    assert study.plains_for("rloop_k2_all") == ["plain_grpo", "plain_grpo_k2"]
    assert study.plains_for("rloop_k6_hard") == ["plain_grpo"]
    flags = study.arm_flags("plain_grpo_k2", pool=512)
    assert flags[:3] == ["--iterations", "2", "--vanilla"] and json.loads(flags[-1])["trainer.max_steps"] == 60
    runs = {name: [Path(f"{name}_seed{s}") for s in (0, 1)] for name in ("plain_grpo", "plain_grpo_k2", "rloop_k2_hard")}
    evals = {d: {"rl_end": {"metrics": {"countdown/test": {"avg@128": 0.3 + 0.1 * ("rloop" in d.name) + 0.01 * i,
                                                             "pass@32": 0.8}}}}
             for i, d in enumerate(d for dirs in runs.values() for d in dirs)}
    lines = study.final_section("countdown", "rloop_k2_hard", "rl_end", runs, evals)
    assert any(line.startswith("| plain GRPO, K = 2 x 60: end point | 2 |") for line in lines)
    compared = [line.split(" | ")[1] for line in lines if line.startswith("| **rloop_k2_hard: last RL end**")]
    assert compared == ["plain GRPO: end point", "plain GRPO, K = 2 x 60: end point"]


# ---------------------------------------------------------------------------- the larger point (--model small)


def test_the_larger_point_runs_the_matched_comparison_on_its_own_configs(study, tmp_path, monkeypatch):
    """--model small --plains matched: the 36M configs (K = 2 x 60 and pool 512 as shipped, so the K = 2 arms run
    them unchanged), only plain GRPO in the chosen arm's phases, its own directory, block and eval config."""
    import yaml

    config = study.config_of("countdown", "small")
    assert config == "configs/study/countdown_small.yaml" and study.eval_config_of("countdown", "small") == \
        "configs/study/eval_countdown_small.yaml"
    study.check_search_config(config)
    loop = yaml.safe_load(Path(config).read_text())
    assert loop["iterations"] * loop["grpo"]["overrides"]["trainer.max_steps"] == study.STEPS
    assert study.arm_flags("rloop_k2_hard", None, config) == [] and \
        study.arm_flags("plain_grpo_k2", None, config) == ["--vanilla", "true"]
    six = study.arm_flags(study.PLAIN, None, config)  # another K restates the config's own overrides
    assert json.loads(six[-1]) == {"trainer.max_steps": 20, "model.optimizer.init_args.lr": 0.00005,
                                   "data.init_args.limit": 512}
    jobs, evaluated = [], []
    monkeypatch.setattr(study, "run_all", lambda batch, parallel: jobs.extend(batch))
    monkeypatch.setattr(study, "evaluate_answers", lambda task, run_dir, seed, model: evaluated.append(model) or {
        "rl_end": {"metrics": {"countdown/test": {"avg@32": 0.3 + 0.01 * seed + 0.1 * ("rloop" in run_dir.name),
                                                  "pass@32": 0.8}}}})
    final = tmp_path / "countdown_small" / "final"
    for seed in (0, 1):
        curve_run(final / f"plain_grpo_k2_seed{seed}", True, [0.1, 0.3, 0.5, 0.4, 0.3])
        curve_run(final / f"rloop_k2_hard_seed{seed}", False, [0.1, 0.2, 0.6, 0.3, 0.2])
    doc = tmp_path / "results.md"
    study.main(["--model", "small", "--stage", "final", "--setting", "rloop_k2_hard:rl_end", "--plains", "matched",
                "--seeds", "0", "1", "--out", str(tmp_path), "--doc", str(doc)])
    assert sorted((run_dir.name, flags) for _, run_dir, _, flags, _ in jobs) == [
        ("plain_grpo_k2_seed0", ["--vanilla", "true"]), ("plain_grpo_k2_seed1", ["--vanilla", "true"]),
        ("rloop_k2_hard_seed0", []), ("rloop_k2_hard_seed1", [])]
    assert {job[0] for job in jobs} == {config} and evaluated == ["small"] * 4
    text = doc.read_text()
    assert "<!-- study: countdown_small -->" in text and "plain GRPO: end point" not in text
    assert ("Final: `python scripts/study.py --task countdown --model small --stage final --setting "
            "rloop_k2_hard:rl_end --plains matched` (seeds 0, 1)") in text
    assert "| **rloop_k2_hard: last RL end** | plain GRPO, K = 2 x 60: end point | countdown/test | +0.100 (inf, 0.000) * |" in text
    with pytest.raises(SystemExit, match=r"--model small has no study config for arithmetic \(configs/study/"
                                         r"arithmetic_small.yaml\)"):
        study.main(["--model", "small", "--task", "arithmetic", "--out", str(tmp_path), "--doc", str(doc)])
