"""A run's learning curve: held-out metrics on one axis of cumulative RL steps (and training time).

The points, in order (``load_curve``):

    theta_0                      step 0
    per iteration k:
      RL points                  every ``curve_every_n_steps`` RL steps of the GRPO phase (``curve.jsonl``)
      RL end point               the GRPO phase's exported policy (``iter_KK/eval_rl_end``; in a plain-RL
                                 run ``iter_KK/eval``), at the phase's last step
      RFT output theta_{k+1}     (RLoop) at the same step: RFT adds no RL step; it is where iteration
                                 k+1's RL starts

Every point is ``evaluate_policy`` with the run's seed and evaluators, so the arms (RLoop, plain RL)
and the points of one curve compare like for like. Training time counts the GRPO and RFT phases,
never the held-out evaluations. ``choose`` picks the policy the loop hands over (its ``output``);
``compare`` sets the candidates side by side at the run's total RL steps, selecting only on a
validation split (``tasks.base.GeneratedTask``), never on the splits the tables report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from rloop_lightning.loop.layout import BASE_EVALUATION, RunLayout

Output = Literal["theta_K", "rl_end", "best_validation"]
PointKind = Literal["theta_0", "rl", "rl_end", "rft"]
VALIDATION = "validation"


@dataclass
class CurvePoint:
    """One held-out evaluation on the curve."""

    rl_step: int
    """RL steps (rollout batches) of every GRPO phase before this point."""
    seconds: Optional[float]
    """Training time (GRPO and RFT phases) before this point; None where the run did not record it."""
    kind: PointKind
    """``theta_0``, ``rl`` (mid-phase), ``rl_end`` (a GRPO phase's end point) or ``rft`` (theta_{k+1})."""
    label: str
    """How tables name it: ``theta_0``, ``iter 1 RL step 20``, ``iter 1 RL end``, ``theta_2``."""
    metrics: dict[str, dict[str, float]]
    """``{"task/split": {metric: value}}``, as ``evaluate_policy`` returns them."""
    policy: Optional[str] = None
    """The exported policy directory; None for a mid-phase point (its weights are not saved)."""


# ---------------------------------------------------------------------------- settings


def check_curve(every_n_steps: Optional[int], evaluators: Sequence, output: str) -> None:
    """Refuse, before anything loads, a curve interval below 1, a curve or an output choice with nothing to
    evaluate, and ``output: best_validation`` with no evaluator of a validation split."""
    if every_n_steps is not None and every_n_steps < 1:
        raise ValueError(f"curve_every_n_steps must be >= 1 (RL steps between held-out evaluations) or null "
                         f"(no curve), got {every_n_steps}")
    if every_n_steps is not None and not evaluators:
        raise ValueError("curve_every_n_steps is set but evaluators is empty: the curve evaluates the loop's "
                         "evaluators; add one (e.g. a validation split) or set curve_every_n_steps to null")
    if output == "best_validation" and not any(getattr(e, "split", None) == VALIDATION for e in evaluators):
        raise ValueError("output: best_validation chooses on a validation split, but no evaluator has "
                         "split: validation; add one to evaluators or choose output theta_K or rl_end")


def phase_rl_steps(grpo_config: Any) -> Optional[int]:
    """RL steps (rollout batches) of one GRPO phase from its parsed configuration: ``trainer.max_steps``
    optimizer steps over ``num_iterations x num_mini_batches`` per batch; None when set by epochs."""
    max_steps = grpo_config.trainer.get("max_steps")
    if max_steps is None or max_steps < 1:
        return None
    model = grpo_config.model
    return max_steps // max(1, (model.get("num_iterations") or 1) * (model.get("num_mini_batches") or 1))


def check_curve_interval(every_n_steps: Optional[int], rl_steps: Optional[int]) -> None:
    """Refuse an interval longer than a GRPO phase: the curve would have no point inside any phase."""
    if every_n_steps is not None and rl_steps is not None and every_n_steps > rl_steps:
        raise ValueError(f"curve_every_n_steps={every_n_steps} exceeds the {rl_steps} RL steps of a GRPO phase "
                         "(grpo trainer.max_steps): no evaluation would fall inside a phase; lower it")


# ---------------------------------------------------------------------------- reading a run


def _evaluation(layout: RunLayout, phase: str) -> Optional[dict]:
    path = layout.evaluation(phase)
    return json.loads(path.read_text()) if path.exists() else None


def _rows(path: Path) -> list[dict]:
    """A curve file's rows by step, the last row of a step winning (a resumed phase may repeat one)."""
    if not path.exists():
        return []
    rows = {row["step"]: row for row in map(json.loads, filter(str.strip, path.read_text().splitlines()))}
    return [rows[step] for step in sorted(rows)]


def _is_rl_end(policy: str, k: int) -> bool:
    return Path(policy).parts[-3:] == (f"iter_{k:02d}", "grpo", "policy")


def load_curve(run_dir: str | Path) -> list[CurvePoint]:
    """Every evaluated point of a run directory, in order along the RL-step axis."""
    layout = RunLayout(run_dir)
    completed = json.loads(layout.manifest.read_text()).get("completed") if layout.manifest.exists() else None
    completed = completed if isinstance(completed, dict) else {}  # a manifest of scripts/trl_arm.py has none
    points = []
    base = _evaluation(layout, BASE_EVALUATION)
    if base is not None:
        points.append(CurvePoint(0, 0.0, "theta_0", "theta_0", base["metrics"], base.get("policy")))
    steps, seconds = 0, 0.0
    for k in layout.iterations():
        grpo = completed.get(layout.phase("grpo", k), {})
        for row in _rows(layout.curve(layout.phase("grpo", k))):
            points.append(CurvePoint(steps + row["step"], seconds + row["seconds"] if seconds is not None else None,
                                     "rl", f"iter {k} RL step {row['step']}", row["metrics"]))
        if "steps" not in grpo:  # unfinished
            break
        steps += grpo["steps"]
        phase_seconds = grpo.get("training_seconds", grpo.get("seconds"))
        seconds = seconds + phase_seconds if seconds is not None and phase_seconds is not None else None
        rl_end = _evaluation(layout, layout.phase("eval_rl_end", k))
        evaluation = _evaluation(layout, layout.phase("eval", k))
        if evaluation is not None and _is_rl_end(evaluation.get("policy", ""), k):  # a plain-RL run
            rl_end, evaluation = evaluation, None
        if rl_end is not None:
            points.append(CurvePoint(steps, seconds, "rl_end", f"iter {k} RL end", rl_end["metrics"],
                                     rl_end.get("policy")))
        rft_seconds = completed.get(layout.phase("rft", k), {}).get("seconds")
        if evaluation is not None:
            rft_time = seconds + rft_seconds if seconds is not None and rft_seconds is not None else None
            points.append(CurvePoint(steps, rft_time, "rft", f"theta_{k + 1}", evaluation["metrics"],
                                     evaluation.get("policy")))
        if rft_seconds is not None and seconds is not None:
            seconds += rft_seconds
    return points


# ---------------------------------------------------------------------------- choosing


def validation_split(points: Sequence[CurvePoint]) -> Optional[str]:
    """The first evaluated ``task/validation`` split, or None."""
    return next((split for point in points for split in sorted(point.metrics)
                 if split.endswith(f"/{VALIDATION}")), None)


def average_accuracy(metrics: dict[str, float]) -> float:
    """A split's avg@n (average accuracy over its n samples per problem)."""
    return next((value for key, value in metrics.items() if key.startswith("avg@")), float("nan"))


def best_on_validation(points: Sequence[CurvePoint], exported_only: bool = False) -> Optional[CurvePoint]:
    """The point of highest validation avg@n (the earliest among equals); with ``exported_only``, among the
    points whose policy was saved. None without a validation split."""
    split = validation_split(points)
    if split is None:
        return None
    scored = [p for p in points if split in p.metrics and (p.policy is not None or not exported_only)]
    scored = [p for p in scored if average_accuracy(p.metrics[split]) == average_accuracy(p.metrics[split])]
    return max(scored, key=lambda p: (average_accuracy(p.metrics[split]), -p.rl_step), default=None)


def last_of(points: Sequence[CurvePoint], kinds: tuple[str, ...]) -> Optional[CurvePoint]:
    return next((point for point in reversed(points) if point.kind in kinds), None)


def choose(points: Sequence[CurvePoint], output: Output) -> Optional[CurvePoint]:
    """The point whose policy the loop hands over: ``theta_K`` (the last RFT output, in a plain-RL run the
    last end point), ``rl_end`` (the last GRPO phase's end point) or ``best_validation`` (the saved policy
    of highest validation avg@n). None when the run has no such point."""
    if output == "best_validation":
        return best_on_validation(points, exported_only=True)
    if output == "rl_end":
        return last_of(points, ("rl_end",))
    return last_of(points, ("rft", "rl_end") if any(p.kind == "rft" for p in points) else ("rl_end", "theta_0"))


def compare(points: Sequence[CurvePoint]) -> dict[str, CurvePoint]:
    """The candidates for the run's answer, each at most once: theta_K, the last RL end point, and the best
    point of the curve on validation (any point; mid-phase ones are not saved) and among the saved ones."""
    candidates = {"theta_K": choose(points, "theta_K"), "last RL end": choose(points, "rl_end"),
                  "best on validation": best_on_validation(points),
                  "best saved on validation": choose(points, "best_validation")}
    return {name: point for name, point in candidates.items() if point is not None}
