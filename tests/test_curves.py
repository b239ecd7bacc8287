"""The learning curve (``loop.curves``, ``PassAtKEvaluation`` with a seed): its points on one axis of RL
steps and training time, the choice of the policy the loop hands over, and its bad settings."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rloop_lightning.callbacks import PassAtKEvaluation
from rloop_lightning.callbacks import pass_at_k
from rloop_lightning.loop import BasePolicySettings, PhaseSettings, RLoop
from rloop_lightning.loop.curves import (
    check_curve, check_curve_interval, choose, compare, load_curve, phase_rl_steps,
)
from rloop_lightning.loop.layout import BASE_EVALUATION, RunLayout
from rloop_lightning.loop.report import curve_lines, write_final
from rloop_lightning.records import write_json_atomic


# ---------------------------------------------------------------------------- the callback


def test_seeded_evaluation_keeps_trainings_random_state_and_counts_rl_steps(tmp_path, monkeypatch):
    calls = []

    def evaluate_policy(policy, evaluators, engine, seed):
        torch.manual_seed(seed)  # as the real one does, before each evaluator
        time.sleep(0.2)
        calls.append(seed)
        return {"countdown/validation": {"avg@4": 0.25}}

    monkeypatch.setattr(pass_at_k, "evaluate_policy", evaluate_policy)
    path = tmp_path / "curve.jsonl"
    callback = PassAtKEvaluation([], every_n_steps=2, seed=7, path=str(path), at_end=False)
    trainer = SimpleNamespace(loggers=[], is_global_zero=True, global_step=0, log_dir=None)
    module = SimpleNamespace(policy=object(), rollout_step=0)
    callback.on_train_start(trainer, module)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for step in (1, 2, 3):
        module.rollout_step, trainer.global_step = step, 4 * step  # 4 optimizer steps per RL step
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
    callback.on_fit_end(trainer, module)  # at_end=False: nothing
    assert torch.equal(torch.rand(3), expected)  # the evaluation's manual_seed did not touch training's stream
    assert calls == [7]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["step"] for row in rows] == [2]
    assert rows[0]["metrics"] == {"countdown/validation": {"avg@4": 0.25}}
    assert rows[0]["seconds"] < 0.2 and callback.state_dict()["training_seconds"] < 0.2  # evaluations left out


def test_the_step_the_loop_evaluates_as_the_end_point_gets_no_curve_point(tmp_path, monkeypatch):
    """``end_step``: the phase's last RL step is its end point (evaluated from the export): not evaluated twice."""
    calls = []
    monkeypatch.setattr(pass_at_k, "evaluate_policy", lambda policy, evaluators, engine, seed: calls.append(seed) or {})
    path = tmp_path / "curve.jsonl"
    callback = PassAtKEvaluation([], every_n_steps=2, seed=0, path=str(path), at_end=False, end_step=4)
    trainer = SimpleNamespace(loggers=[], is_global_zero=True, global_step=0, log_dir=None)
    module = SimpleNamespace(policy=object(), rollout_step=0)
    callback.on_train_start(trainer, module)
    for step in (1, 2, 3, 4):
        module.rollout_step = trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2]
    assert phase_rl_steps(SimpleNamespace(trainer={"max_steps": 8}, model={"num_iterations": 2})) == 4


# ---------------------------------------------------------------------------- bad settings


def test_bad_curve_settings_are_refused_naming_the_setting():
    evaluator = SimpleNamespace(split="test")
    for interval in (0, -3):
        with pytest.raises(ValueError, match=f"curve_every_n_steps must be >= 1.*got {interval}"):
            check_curve(interval, [evaluator], "theta_K")
    with pytest.raises(ValueError, match="curve_every_n_steps is set but evaluators is empty"):
        check_curve(5, [], "theta_K")
    with pytest.raises(ValueError, match="output: best_validation .* no evaluator has split: validation"):
        check_curve(None, [evaluator], "best_validation")
    check_curve(None, [], "theta_K")  # no curve: nothing to check
    with pytest.raises(ValueError, match="curve_every_n_steps=41 exceeds the 40 RL steps of a GRPO phase"):
        check_curve_interval(41, 40)
    check_curve_interval(40, 40)
    config = SimpleNamespace(trainer={"max_steps": 80}, model={"num_iterations": 2, "num_mini_batches": 2})
    assert phase_rl_steps(config) == 20
    assert phase_rl_steps(SimpleNamespace(trainer={"max_steps": -1}, model={})) is None


def test_the_loop_refuses_a_bad_curve_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match="curve_every_n_steps must be >= 1"):
        RLoop(str(tmp_path / "run"), BasePolicySettings("rloop/micro-llama"), PhaseSettings("missing.yaml"),
              PhaseSettings("missing.yaml"), evaluators=[], curve_every_n_steps=0)
    with pytest.raises(ValueError, match="curve_every_n_steps is set but evaluators is empty"):
        RLoop(str(tmp_path / "run"), BasePolicySettings("rloop/micro-llama"), PhaseSettings("missing.yaml"),
              PhaseSettings("missing.yaml"), evaluators=[], curve_every_n_steps=10)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- a run's curve


def metrics(test: float, validation: float) -> dict:
    return {"countdown/test": {"avg@4": test}, "countdown/validation": {"avg@4": validation}}


def rloop_run(root: Path) -> Path:
    """A finished 2-iteration RLoop run of 4 RL steps per phase, a curve point every 2 steps, by hand:
    GRPO phases of 10 s training (12 s with their curve), RFT phases of 3 s."""
    layout = RunLayout(root)
    write_json_atomic(layout.evaluation(BASE_EVALUATION), {"policy": "base", "metrics": metrics(0.1, 0.1)})
    completed = {}
    for k, (middle, rl_end, rft) in enumerate([(0.2, 0.3, 0.25), (0.35, 0.4, 0.32)]):
        grpo = layout.phase("grpo", k)
        layout.directory(grpo).mkdir(parents=True)
        layout.curve(grpo).write_text(json.dumps({"step": 2, "seconds": 5.0, "metrics": metrics(0.9, middle)}) + "\n")
        completed[grpo] = {"steps": 4, "seconds": 12.0, "training_seconds": 10.0}
        write_json_atomic(layout.evaluation(layout.phase("eval_rl_end", k)),
                          {"policy": str(layout.policy(grpo)), "metrics": metrics(0.9, rl_end)})
        completed[layout.phase("rft", k)] = {"seconds": 3.0}
        write_json_atomic(layout.evaluation(layout.phase("eval", k)),
                          {"policy": str(layout.policy(layout.phase("rft", k))), "metrics": metrics(0.9, rft)})
    layout.manifest.write_text(json.dumps({"config": {"iterations": 2}, "completed": completed}))
    return root


def test_points_lie_on_one_axis_of_rl_steps_and_training_seconds(tmp_path):
    points = load_curve(rloop_run(tmp_path / "run"))
    assert [(p.label, p.kind, p.rl_step, p.seconds) for p in points] == [
        ("theta_0", "theta_0", 0, 0.0),
        ("iter 0 RL step 2", "rl", 2, 5.0), ("iter 0 RL end", "rl_end", 4, 10.0), ("theta_1", "rft", 4, 13.0),
        ("iter 1 RL step 2", "rl", 6, 18.0), ("iter 1 RL end", "rl_end", 8, 23.0), ("theta_2", "rft", 8, 26.0)]
    assert points[1].policy is None and points[2].policy.endswith("iter_00/grpo/policy")


def test_the_answer_is_chosen_by_output_and_the_best_only_on_validation(tmp_path):
    run_dir = rloop_run(tmp_path / "run")
    points = load_curve(run_dir)
    assert choose(points, "theta_K").label == "theta_2"
    assert choose(points, "rl_end").label == "iter 1 RL end"
    assert choose(points, "best_validation").label == "iter 1 RL end"  # 0.4: the best saved point
    # the test split is 0.9 at every trained point: a choice on test would be a tie, not iter 1's RL end
    assert {name: p.label for name, p in compare(points).items()} == {
        "theta_K": "theta_2", "last RL end": "iter 1 RL end", "best on validation": "iter 1 RL end",
        "best saved on validation": "iter 1 RL end"}
    write_final(run_dir, "rl_end")
    final = json.loads(RunLayout(run_dir).final.read_text())
    assert final["policy"].endswith("iter_01/grpo/policy") and final["metrics"] == metrics(0.9, 0.4)
    assert final["rl_step"] == 8 and final["output"] == "rl_end"
    lines = curve_lines({"name": "run", "curve": points})
    assert "| iter 0 RL step 2 | 2 | 5 | 0.900 | 0.200 |" in lines
    assert "| theta_K: theta_2 | 8 | 26 | 0.900 | 0.320 |" in lines


def test_a_mid_phase_best_is_reported_but_not_handed_over(tmp_path):
    run_dir = rloop_run(tmp_path / "run")
    layout = RunLayout(run_dir)
    layout.curve(layout.phase("grpo", 1)).write_text(
        json.dumps({"step": 2, "seconds": 5.0, "metrics": metrics(0.9, 0.8)}) + "\n")
    points = load_curve(run_dir)
    assert compare(points)["best on validation"].label == "iter 1 RL step 2"
    assert choose(points, "best_validation").label == "iter 1 RL end"  # the best point with saved weights


def test_output_may_change_on_resume_and_the_curve_may_not(tmp_path):
    from rloop_lightning.loop.manifest import Manifest

    manifest = Manifest(tmp_path / "manifest.json")
    manifest.check_config({"seed": 0, "output": "theta_K"})  # an older run: no curve_every_n_steps at all
    manifest.check_config({"seed": 0, "output": "best_validation", "curve_every_n_steps": None})
    with pytest.raises(ValueError, match="curve_every_n_steps: None -> 10"):
        manifest.check_config({"seed": 0, "output": "best_validation", "curve_every_n_steps": 10})
