"""The RLoop controller end to end, on the random ``rloop/micro-llama`` and a micro Countdown.

Phase YAMLs are derived from the shipped ones (configs/grpo, configs/rft, configs/tiny_cpu.yaml)
with everything shrunk: 16 prompts, 4 per step, G=4, 8 new tokens, 3 GRPO steps, 1 RFT epoch.
A random model solves no Countdown problem, so the GRPO phase is scored by ``loop_helpers.has_digit``
(correct = the completion holds a digit), which gives non-empty expert sets; one test keeps the
Countdown reward to get the empty-expert-set path.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loop_helpers import STEP_DELAY_ENV
from rloop_lightning.cli import cli_main
from rloop_lightning.loop import RLoop

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
COMPLETIONS_PER_STEP = 4 * 4  # prompts per step x G
MICRO_COUNTDOWN = {"class_path": "rloop_lightning.tasks.Countdown",
                   "init_args": {"num_train": 64, "num_test": 8, "num_ood": 8}}
DIGIT_COUNTDOWN = {**MICRO_COUNTDOWN, "class_path": "loop_helpers.DigitCountdown"}
QUIET_TRAINER = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
STEP_DELAY = {"class_path": "loop_helpers.StepDelay"}


def shipped(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / name).read_text())


def grpo_yaml(digit_reward: bool) -> dict:
    config = shipped("grpo/tiny_countdown.yaml")
    config["trainer"].update(QUIET_TRAINER)
    # keep_truncated: with 8 new tokens almost every completion is truncated, and the harvest must
    # hold every correct one for the count check below; PassAtKEvaluation stays: the loop drops it
    config["trainer"]["callbacks"][0]["init_args"] = {"keep_truncated": True}
    config["trainer"]["callbacks"].append(STEP_DELAY)
    model = config["model"]
    model["policy"]["model_name_or_path"] = "rloop/micro-llama"
    model["sampling"]["max_new_tokens"] = 8
    model["num_generations"] = 4
    if digit_reward:
        model["reward_functions"] = ["loop_helpers.has_digit"]
        model["correctness_function"] = "has_digit"
    config["data"]["init_args"].update(task=MICRO_COUNTDOWN, batch_size=4, limit=16)
    return config


def rft_yaml() -> dict:
    config = shipped("rft/tiny_countdown.yaml")
    config["trainer"].update(QUIET_TRAINER)
    config["trainer"]["callbacks"].append(STEP_DELAY)
    config["model"]["policy"]["model_name_or_path"] = "rloop/micro-llama"
    config["data"]["init_args"]["batch_size"] = 8
    return config


def write_loop_config(directory: Path, run_dir: Path, digit_reward: bool = True) -> Path:
    """Phase YAMLs and the loop YAML in ``directory``; returns the loop YAML's path."""
    directory.mkdir(parents=True, exist_ok=True)
    grpo, rft = directory / "grpo.yaml", directory / "rft.yaml"
    grpo.write_text(yaml.safe_dump(grpo_yaml(digit_reward)))
    rft.write_text(yaml.safe_dump(rft_yaml()))
    loop = shipped("tiny_cpu.yaml")
    loop.update(run_dir=str(run_dir), iterations=2, base={"policy": "rloop/micro-llama"})
    loop["grpo"] = {"config": str(grpo), "overrides": {"trainer.max_steps": 3}}  # shipped YAML says 100
    loop["rft"] = {"config": str(rft), "overrides": {"trainer.max_epochs": 1}}
    loop["expert_set"] = {"filter": "success_rate", "hard_threshold": 0.5, "dedup": True, "max_per_prompt": 4,
                          "replay": False}  # pinned: the tests below count on these, not on shipped defaults
    evaluator = {"task": DIGIT_COUNTDOWN, "num_samples": 4, "ks": [1, 4], "limit": 4,
                 "sampling": {"temperature": 1.0, "max_new_tokens": 8}}
    loop["evaluators"] = [{**evaluator, "split": "test"}, {**evaluator, "split": "ood", "greedy": False}]
    loop["output"] = "theta_K"  # no validation evaluator here; the phases the tests count (no RL-end evaluation)
    path = directory / "loop.yaml"
    path.write_text(yaml.safe_dump(loop))
    return path


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def loaded_from(policy_dir: Path) -> str:
    """Where the policy saved in ``policy_dir`` was loaded from when its phase started."""
    return json.loads((policy_dir / "rloop_policy.json").read_text())["model_name_or_path"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expert_files(run_dir: Path) -> dict[str, bytes]:
    """Expert sets, harvested shards and prompt statistics of a run, by relative path."""
    patterns = ("iter_*/expert_set/experts.jsonl", "iter_*/grpo/experts/rank*/*.jsonl",
                "iter_*/grpo/experts/prompt_stats.rank*.json")
    return {str(p.relative_to(run_dir)): p.read_bytes() for pattern in patterns for p in run_dir.glob(pattern)}


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted 2-iteration RLoop run: (loop YAML, run directory)."""
    root = tmp_path_factory.mktemp("loop")
    config = write_loop_config(root / "configs", root / "run")
    cli_main(["fit", "--config", str(config)])
    return config, root / "run"


# ---------------------------------------------------------------------------- a full run


def test_two_iterations_chain_theta_through_rft(loop_run):
    _, run_dir = loop_run
    completed = manifest(run_dir)["completed"]
    assert set(completed) == {"eval/theta_0"} | {f"iter_{k:02d}/{phase}" for k in (0, 1)
                                                 for phase in ("grpo", "expert_set", "rft", "eval")}
    theta_1, theta_2 = str(run_dir / "iter_00/rft/policy"), str(run_dir / "iter_01/rft/policy")
    # RFT of iteration k restarts from theta_k, not from the GRPO end point
    assert completed["iter_00/rft"]["started_from"] == "rloop/micro-llama"
    assert completed["iter_01/rft"]["started_from"] == theta_1
    assert loaded_from(run_dir / "iter_00/rft/policy") == "rloop/micro-llama"
    # GRPO of iteration k explores from theta_k; theta_{k+1} is evaluated
    assert loaded_from(run_dir / "iter_00/grpo/policy") == "rloop/micro-llama"
    assert loaded_from(run_dir / "iter_01/grpo/policy") == theta_1
    assert json.loads((run_dir / "iter_00/eval/eval.json").read_text())["policy"] == theta_1
    assert json.loads((run_dir / "iter_01/eval/eval.json").read_text())["policy"] == theta_2
    assert completed["iter_00/grpo"]["steps"] == completed["iter_01/grpo"]["steps"] == 3  # the loop's override
    assert set(completed["eval/theta_0"]["metrics"]["countdown/test"]) == {"avg@4", "pass@1", "pass@4",
                                                                           "greedy_accuracy"}
    assert (run_dir / "report.png").stat().st_size > 0
    report = (run_dir / "report.md").read_text()
    assert "| theta_2 |" in report and "| iteration | harvested |" in report


def test_expert_shards_hold_exactly_the_correct_trajectories_seen(loop_run):
    _, run_dir = loop_run
    for k in (0, 1):
        grpo = run_dir / f"iter_{k:02d}" / "grpo"
        steps = read_jsonl(grpo / "metrics.jsonl")
        correct_per_step = [round(row["train/accuracy"] * COMPLETIONS_PER_STEP) for row in steps]
        assert len(steps) == 3 and sum(correct_per_step) > 0
        shards = sorted((grpo / "experts" / "rank00").glob("*.jsonl"))
        for step, correct in enumerate(correct_per_step):
            shard = grpo / "experts" / "rank00" / f"step{step:07d}.jsonl"
            assert len(read_jsonl(shard)) == correct if correct else not shard.exists()
        records = [r for shard in shards for r in read_jsonl(shard)]
        assert len(records) == sum(correct_per_step)
        assert all(any(c.isdigit() for c in r["completion"]) and r["reward"] == 1.0 for r in records)
        summary = json.loads((run_dir / f"iter_{k:02d}" / "expert_set" / "summary.json").read_text())
        assert summary["harvested"] == len(records)
        experts = read_jsonl(run_dir / f"iter_{k:02d}" / "expert_set" / "experts.jsonl")
        assert len(experts) == summary["size"] > 0
        assert all(expert in records for expert in experts)
        stats = json.loads((grpo / "experts" / "prompt_stats.rank00.json").read_text())
        assert sum(s["attempts"] for s in stats.values()) == 3 * COMPLETIONS_PER_STEP
        assert sum(s["successes"] for s in stats.values()) == len(records)


def test_rerun_is_a_no_op(loop_run, monkeypatch):
    config, run_dir = loop_run

    def snapshot() -> dict:
        return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")
                if p.is_file() and not p.name.startswith("report.") and p.name != ".lock"}  # both rewritten on purpose

    before, manifest_before = snapshot(), manifest(run_dir)
    for work in ("run_grpo", "build_experts", "run_rft", "evaluate_held_out"):
        monkeypatch.setattr(RLoop, work, lambda *args, **kwargs: pytest.fail("a completed phase was re-run"))
    cli_main(["fit", "--config", str(config)])
    assert manifest(run_dir) == manifest_before  # same phases, same recorded seconds
    assert snapshot() == before


def test_a_changed_config_is_refused_naming_the_field(loop_run):
    config, run_dir = loop_run
    manifest_before = manifest(run_dir)
    with pytest.raises(ValueError, match="refusing to resume") as error:
        cli_main(["fit", "--config", str(config), "--expert_set.max_per_prompt", "2"])
    assert "expert_set.max_per_prompt: 4 -> 2" in str(error.value)
    assert "iterations" not in str(error.value)
    assert manifest(run_dir) == manifest_before


def test_rloop_eval_reports_the_loops_numbers(loop_run, tmp_path):
    """``rloop eval`` with the loop's evaluators and seed gives the numbers the loop wrote, for theta_0
    and theta_1, and for the second evaluator as well as the first."""
    config, run_dir = loop_run
    loop = yaml.safe_load(config.read_text())
    for phase, policy in (("eval/theta_0", "rloop/micro-llama"), ("iter_00/eval", str(run_dir / "iter_00/rft/policy"))):
        output = tmp_path / "eval.json"
        cli_main(["eval", "--policy.model_name_or_path", policy, "--evaluators", json.dumps(loop["evaluators"]),
                  "--seed", str(loop["seed"]), "--output", str(output)])
        written = json.loads((run_dir / phase / "eval.json").read_text())["metrics"]
        assert set(written) == {"countdown/test", "countdown/ood"}
        assert 0 < written["countdown/ood"]["avg@4"] < 1  # noise-dependent: only equal sampling agrees
        assert json.loads(output.read_text()) == written


# ---------------------------------------------------------------------------- variants


def test_empty_expert_set_skips_rft_and_carries_theta_forward(tmp_path, caplog):
    config = write_loop_config(tmp_path / "configs", tmp_path / "run", digit_reward=False)
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.loop.controller"):
        cli_main(["fit", "--config", str(config)])
    run_dir = tmp_path / "run"
    completed = manifest(run_dir)["completed"]
    assert set(completed) == {"eval/theta_0", "iter_00/grpo", "iter_00/expert_set", "iter_01/grpo",
                              "iter_01/expert_set"}
    assert completed["iter_00/expert_set"]["size"] == completed["iter_00/expert_set"]["harvested"] == 0
    assert not (run_dir / "iter_00" / "rft").exists()
    assert loaded_from(run_dir / "iter_01/grpo/policy") == "rloop/micro-llama"  # theta_1 = theta_0
    warnings = [r.getMessage() for r in caplog.records if "empty expert set" in r.getMessage()]
    assert len(warnings) == 2 and "RFT skipped, theta_0 carried forward" in warnings[0]


def test_vanilla_chains_grpo_end_points(loop_run, tmp_path):
    """... with a learning curve: a point every RL step (curve_every_n_steps: 1)."""
    config, rloop_dir = loop_run
    run_dir = tmp_path / "vanilla"
    cli_main(["fit", "--config", str(config), "--vanilla", "true", "--run_dir", str(run_dir),
              "--curve_every_n_steps", "1"])
    completed = manifest(run_dir)["completed"]
    assert set(completed) == {"eval/theta_0", "iter_00/grpo", "iter_00/eval", "iter_01/grpo", "iter_01/eval"}
    assert not list(run_dir.glob("iter_*/expert_set")) and not list(run_dir.glob("iter_*/rft"))
    rl_end = str(run_dir / "iter_00/grpo/policy")
    assert loaded_from(run_dir / "iter_01/grpo/policy") == rl_end
    assert json.loads((run_dir / "iter_00/eval/eval.json").read_text())["policy"] == rl_end
    assert json.loads((run_dir / "iter_01/eval/eval.json").read_text())["policy"] == str(
        run_dir / "iter_01/grpo/policy")
    # the curve: RL steps 1 and 2 of each phase; step 3, the phase's last, is its end point, evaluated once
    # from the export (the same weights and seed: a curve point there would repeat it)
    curves = [read_jsonl(run_dir / f"iter_{k:02d}/grpo/curve.jsonl") for k in (0, 1)]
    assert [[row["step"] for row in rows] for rows in curves] == [[1, 2], [1, 2]]
    assert all(row["seconds"] > 0 for rows in curves for row in rows)
    # training's random state is kept: phase 0 trains as the same phase without a curve (the RLoop run's)
    def rewards(directory: Path) -> list:
        return [(row["train/reward_mean"], row["train/accuracy"]) for row in read_jsonl(directory / "metrics.jsonl")]
    assert rewards(run_dir / "iter_00/grpo") == rewards(rloop_dir / "iter_00/grpo")
    assert completed["iter_00/grpo"]["training_seconds"] < completed["iter_00/grpo"]["seconds"]
    # on one axis: theta_0 at 0, RL steps 1..6, end points at 3 and 6; handed over: the last end point
    from rloop_lightning.loop.curves import load_curve

    points = load_curve(run_dir)
    assert [(p.rl_step, p.kind) for p in points] == [(0, "theta_0"), (1, "rl"), (2, "rl"), (3, "rl_end"),
                                                     (4, "rl"), (5, "rl"), (6, "rl_end")]
    final = json.loads((run_dir / "final.json").read_text())
    assert final["policy"] == str(run_dir / "iter_01/grpo/policy") and final["output"] == "theta_K"
    assert "| iter 1 RL step 2 | 5 |" in (run_dir / "report.md").read_text()


# ---------------------------------------------------------------------------- crash and resume


def start_loop(config: Path, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    env[STEP_DELAY_ENV] = "0.3"  # a kill window of >= 0.3 s after every training step
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "rloop_lightning", "fit", "--config", str(config)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def kill_when(process: subprocess.Popen, condition, log_path: Path, extra_delay: float = 0.0,
              timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the loop exited (rc {process.returncode}) before the kill point:\n"
                        + log_path.read_text()[-3000:])
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.002)
    time.sleep(extra_delay)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def completed_phases(run_dir: Path) -> set:
    return set(manifest(run_dir)["completed"]) if (run_dir / "manifest.json").exists() else set()


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_expert_sets(loop_run, tmp_path):
    """SIGKILL the loop mid-GRPO, mid-RFT and right after a shard is written; each rerun resumes the
    previous one's wreckage; the final expert sets and shards equal those of an uninterrupted run."""
    reference_config, reference_dir = loop_run
    run_dir = tmp_path / "run"
    config = tmp_path / "loop.yaml"
    config.write_text(reference_config.read_text().replace(str(reference_dir), str(run_dir)))
    log_path = tmp_path / "loop.log"

    def shards(k: int) -> list[Path]:
        return list((run_dir / f"iter_{k:02d}" / "grpo" / "experts" / "rank00").glob("*.jsonl"))

    # (a) during GRPO of iteration 0, once its first shard is on disk
    kill_when(start_loop(config, log_path), lambda: len(shards(0)) >= 1, log_path)
    assert completed_phases(run_dir) == {"eval/theta_0"}
    # (b) during RFT of iteration 0
    kill_when(start_loop(config, log_path), lambda: (run_dir / "iter_00" / "rft").exists(), log_path)
    assert "iter_00/rft" not in completed_phases(run_dir)
    assert (run_dir / "iter_00/expert_set/experts.jsonl").read_bytes() == (
        reference_dir / "iter_00/expert_set/experts.jsonl").read_bytes()
    # (c) at an arbitrary moment right after a shard of iteration 1 appears
    delay = random.Random(os.getpid()).uniform(0.0, 0.3)
    kill_when(start_loop(config, log_path), lambda: len(shards(1)) >= 1, log_path, extra_delay=delay)
    assert "iter_01/grpo" not in completed_phases(run_dir), f"killed {delay:.3f} s after the first shard"
    # resume to completion
    process = start_loop(config, log_path)
    try:
        assert process.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert completed_phases(run_dir) == set(manifest(reference_dir)["completed"])
    resumed, reference = expert_files(run_dir), expert_files(reference_dir)
    assert sorted(resumed) == sorted(reference) and len(reference) >= 10
    assert resumed == reference, f"(c) killed {delay:.3f} s after the first shard of iteration 1"
    assert not list(run_dir.rglob("*.tmp-*"))


def test_replay_adds_earlier_expert_sets_and_rft_from_rl_end_is_one_flag(tmp_path):
    """... with a learning curve, a validation split and the best saved policy on it as the answer."""
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    test, = [e for e in yaml.safe_load(config.read_text())["evaluators"] if e["split"] == "test"]
    evaluators = [test, {**test, "split": "validation", "greedy": False}]
    cli_main(["fit", "--config", str(config), "--expert_set.replay", "true", "--rft_from", "rl_end",
              "--curve_every_n_steps", "2", "--output", "best_validation", "--evaluators", json.dumps(evaluators)])
    run_dir = tmp_path / "run"
    from rloop_lightning.loop.curves import choose, load_curve

    points = load_curve(run_dir)
    assert [(p.rl_step, p.kind) for p in points] == [(0, "theta_0"), (2, "rl"), (3, "rl_end"), (3, "rft"),
                                                     (5, "rl"), (6, "rl_end"), (6, "rft")]
    assert set(points[1].metrics) == {"countdown/test", "countdown/validation"}
    assert points[2].policy == str(run_dir / "iter_00/grpo/policy")
    final = json.loads((run_dir / "final.json").read_text())
    best = choose(points, "best_validation")
    assert final["output"] == "best_validation" and final["policy"] == best.policy
    assert final["metrics"] == best.metrics
    report = (run_dir / "report.md").read_text()
    assert "### run: learning curve" in report and "| best saved on validation: " in report
    first = read_jsonl(run_dir / "iter_00" / "expert_set" / "experts.jsonl")
    second = read_jsonl(run_dir / "iter_01" / "expert_set" / "experts.jsonl")
    summary = json.loads((run_dir / "iter_01" / "expert_set" / "summary.json").read_text())
    assert second[summary["size"]:] == first  # own set first, then the replayed earlier set
    assert summary["size_with_replay"] == summary["size"] + len(first)
    assert manifest(run_dir)["completed"]["iter_00/rft"]["started_from"] == str(run_dir / "iter_00" / "grpo" / "policy")


# ---------------------------------------------------------------------------- the base


def base_build_yaml(steps: int) -> dict:
    config = shipped("base/tiny_countdown.yaml")
    config["trainer"].update(QUIET_TRAINER, max_steps=steps)
    config["trainer"]["callbacks"] = [{"class_path": "rloop_lightning.callbacks.ExportPolicy"}]
    config["model"]["policy"]["model_name_or_path"] = "rloop/micro-llama"
    config["data"]["init_args"].update(task=MICRO_COUNTDOWN, batch_size=8)
    return config


def test_base_is_built_once_and_a_changed_build_config_is_refused(tmp_path):
    from rloop_lightning.loop import BasePolicySettings, PhaseSettings
    from rloop_lightning.loop.controller import BUILD_RECORD

    build = tmp_path / "base.yaml"
    build.write_text(yaml.safe_dump(base_build_yaml(steps=2)))
    policy = tmp_path / "base" / "policy"

    def loop() -> RLoop:
        return RLoop(str(tmp_path / "run"), BasePolicySettings(str(policy), str(build)), PhaseSettings("unused.yaml"),
                     PhaseSettings("unused.yaml"), evaluators=[])

    assert loop().build_base() == str(policy)
    weights = (policy / "model.safetensors").read_bytes()
    assert json.loads((policy / BUILD_RECORD).read_text())["build_config"] == str(build)
    loop().build_base()  # built already: reused as is
    assert (policy / "model.safetensors").read_bytes() == weights
    build.write_text(yaml.safe_dump(base_build_yaml(steps=3)))
    with pytest.raises(ValueError, match="now has other contents") as error:
        loop().build_base()
    assert f"Delete {policy.parent}" in str(error.value)


def test_a_base_build_cut_short_by_max_time_is_warned(tmp_path, caplog):
    from rloop_lightning.loop import BasePolicySettings, PhaseSettings
    from rloop_lightning.loop.controller import BUILD_RECORD

    config = base_build_yaml(steps=100_000)
    config["trainer"]["max_time"] = "00:00:00:01"
    build = tmp_path / "base.yaml"
    build.write_text(yaml.safe_dump(config))
    policy = tmp_path / "base" / "policy"
    loop = RLoop(str(tmp_path / "run"), BasePolicySettings(str(policy), str(build)), PhaseSettings("unused.yaml"),
                 PhaseSettings("unused.yaml"), evaluators=[])
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.loop.controller"):
        loop.build_base()
    steps = json.loads((policy / BUILD_RECORD).read_text())["steps"]
    assert 0 < steps < 100_000
    assert f"stopped after {steps} of 100000 steps" in caplog.text
