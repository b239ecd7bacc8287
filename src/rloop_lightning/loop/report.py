"""The RLoop report: markdown + matplotlib plots of a run directory (and of a baseline, if given).

    rloop report RUN_DIR [--baseline VANILLA_RUN_DIR]

Plots: training reward per RL step across iterations; held-out avg@n and pass@k per iteration;
forgetting rate and solution diversity per step; expert-set size per iteration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

ITERATION_DIRS = "iter_*"


def load_run(run_dir: Path) -> dict:
    """Everything the report needs from a run directory, in iteration order."""
    run = {"name": run_dir.name, "evals": [], "steps": [], "experts": []}
    base_eval = run_dir / "eval" / "theta_0" / "eval.json"
    if base_eval.exists():
        run["evals"].append(("theta_0", json.loads(base_eval.read_text())["metrics"]))
    offset = 0
    for iteration in sorted(run_dir.glob(ITERATION_DIRS)):
        k = int(iteration.name.split("_")[1])
        rows = [json.loads(line) for line in (iteration / "grpo" / "metrics.jsonl").open()] \
            if (iteration / "grpo" / "metrics.jsonl").exists() else []
        for index, row in enumerate(rows):
            run["steps"].append({"rl_step": offset + index, "iteration": k, **row})
        offset += len(rows)
        evaluation = iteration / "eval" / "eval.json"
        if evaluation.exists():
            run["evals"].append((f"theta_{k + 1}", json.loads(evaluation.read_text())["metrics"]))
        summary = iteration / "expert_set" / "summary.json"
        if summary.exists():
            run["experts"].append((k, json.loads(summary.read_text())))
    return run


def metric_table(run: dict) -> tuple[list[str], list[list[str]]]:
    keys = sorted({f"{name}/{metric}" for _, results in run["evals"] for name, ms in results.items()
                   for metric in ms})
    rows = []
    for policy, results in run["evals"]:
        flat = {f"{n}/{m}": v for n, ms in results.items() for m, v in ms.items()}
        rows.append([policy] + [f"{flat[k]:.3f}" if k in flat else "" for k in keys])
    return keys, rows


def _plot_steps(axis, runs: list[dict], key: str, title: str) -> None:
    for run in runs:
        points = [(s["rl_step"], s[key]) for s in run["steps"] if key in s]
        if points:
            xs, ys = zip(*points)
            axis.plot(xs, ys, label=run["name"], linewidth=1)
    axis.set_title(title)
    axis.set_xlabel("RL step")
    axis.legend(fontsize=7)


def _plot_evals(axis, runs: list[dict], metric_suffixes: list[str], title: str) -> None:
    for run in runs:
        for suffix in metric_suffixes:
            ys = []
            for _, results in run["evals"]:
                values = [v for name, ms in results.items() for m, v in ms.items() if m == suffix]
                ys.append(values[0] if values else float("nan"))
            if ys:
                axis.plot(range(len(ys)), ys, marker="o", label=f"{run['name']} {suffix}")
    axis.set_title(title)
    axis.set_xlabel("iteration (theta_k)")
    axis.legend(fontsize=7)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    _plot_steps(axes[0][0], runs, "train/reward_mean", "training reward")
    pass_keys = sorted({m for run in runs for _, results in run["evals"] for ms in results.values() for m in ms
                        if m.startswith("pass@")}, key=lambda m: int(m.split("@")[1]))
    avg_keys = sorted({m for run in runs for _, results in run["evals"] for ms in results.values() for m in ms
                       if m.startswith("avg@")})
    _plot_evals(axes[0][1], runs, avg_keys, "held-out avg@n (first task/split)")
    _plot_evals(axes[0][2], runs, pass_keys, "held-out pass@k (first task/split)")
    _plot_steps(axes[1][0], runs, "rloop/forgetting_rate", "forgetting rate")
    _plot_steps(axes[1][1], runs, "rloop/distinct_correct_per_prompt", "distinct correct solutions / prompt")
    axis = axes[1][2]
    for run in runs:
        if run["experts"]:
            axis.bar([k for k, _ in run["experts"]], [s["size"] for _, s in run["experts"]], label=run["name"])
    axis.set_title("expert-set size")
    axis.set_xlabel("iteration")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def markdown(runs: list[dict], image: str) -> str:
    lines = ["# RLoop report", "", f"![dynamics]({image})", ""]
    for run in runs:
        keys, rows = metric_table(run)
        lines += [f"## {run['name']}: held-out evaluation per iteration", "",
                  "| policy | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        if run["experts"]:
            lines += ["", "| iteration | harvested | prompts solved | kept (hard) | hard share | size |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {k} | {s['harvested']} | {s['prompts_solved']} | {s['prompts_kept']} | "
                      f"{s['hard_share']:.2f} | {s['size']} |" for k, s in run["experts"]]
        rewards = [s["train/reward_mean"] for s in run["steps"] if "train/reward_mean" in s]
        if rewards:
            head, tail = rewards[: max(1, len(rewards) // 10)], rewards[-max(1, len(rewards) // 10):]
            lines += ["", f"Training reward: first 10% of steps {sum(head) / len(head):.3f}, "
                          f"last 10% {sum(tail) / len(tail):.3f} over {len(rewards)} RL steps."]
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path, baseline: Optional[str | Path] = None) -> Path:
    """Write ``{run_dir}/report.md`` and ``report.png``; include ``baseline`` runs for comparison."""
    run_dir = Path(run_dir)
    runs = [load_run(run_dir)] + ([load_run(Path(baseline))] if baseline else [])
    plot(runs, run_dir / "report.png")
    path = run_dir / "report.md"
    path.write_text(markdown(runs, "report.png"))
    return path
