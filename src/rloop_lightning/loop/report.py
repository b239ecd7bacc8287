"""The RLoop report: markdown + matplotlib plots of a run directory (and of a baseline, if given).

    rloop report RUN_DIR [--baseline VANILLA_RUN_DIR]

Plots: training reward per RL step across iterations; held-out avg@n and pass@k per iteration;
forgetting rate and solution diversity per step; expert-set size per iteration; with a learning curve
(``curve_every_n_steps``, ``loop.curves``) held-out avg@n per split over cumulative RL steps, RFT
outputs marked. The markdown adds the curve's table and its candidate answers at equal RL steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rloop_lightning.loop.curves import CurvePoint, average_accuracy, choose, compare, load_curve
from rloop_lightning.loop.layout import BASE_EVALUATION, RunLayout
from rloop_lightning.records import write_json_atomic


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()] if path.exists() else []


def load_run(run_dir: Path) -> dict:
    """Everything the report needs from a run directory, in iteration order."""
    layout = RunLayout(run_dir)
    run = {"name": layout.root.name, "evals": [], "steps": [], "experts": [], "curve": load_curve(layout.root)}
    if layout.evaluation(BASE_EVALUATION).exists():
        run["evals"].append(("theta_0", json.loads(layout.evaluation(BASE_EVALUATION).read_text())["metrics"]))
    offset = 0
    for k in layout.iterations():
        rows = read_jsonl(layout.metrics(layout.phase("grpo", k)))
        for index, row in enumerate(rows):
            run["steps"].append({"rl_step": offset + index, "iteration": k, **row})
        offset += len(rows)
        evaluation = layout.evaluation(layout.phase("eval", k))
        if evaluation.exists():
            run["evals"].append((f"theta_{k + 1}", json.loads(evaluation.read_text())["metrics"]))
        summary = layout.expert_set_summary(k)
        if summary.exists():
            run["experts"].append((k, json.loads(summary.read_text())))
    return run


def split_order(split: str) -> tuple:
    """In-distribution test splits first, then the others, each group by name."""
    return (not split.endswith("/test"), split)


def metric_order(key: str) -> tuple:
    """Splits by ``split_order``; within each task/split avg@n, then pass@k by k, then the rest."""
    split, metric = key.rsplit("/", 1)
    kind, _, k = metric.partition("@")
    return (*split_order(split), {"avg": 0, "pass": 1}.get(kind, 2), int(k) if k.isdigit() else 0, metric)


def duplicate_columns(flat_rows: list[dict[str, float]]) -> set[str]:
    """The ``task/split/pass@1`` keys that equal ``task/split/avg@n`` in every row: pass@1 estimated
    from n samples is c / n, the same number as avg@n, so a table shows it once, as avg@n."""
    keys = {key for row in flat_rows for key in row}
    duplicates = set()
    for key in keys:
        split, metric = key.rsplit("/", 1)
        averages = [k for k in keys if k.rsplit("/", 1)[0] == split and k.rsplit("/", 1)[1].startswith("avg@")]
        if metric == "pass@1" and any(
                all(average in row and abs(row[key] - row[average]) <= 1e-9 for row in flat_rows if key in row)
                for average in averages):
            duplicates.add(key)
    return duplicates


def metric_table(run: dict) -> tuple[list[str], list[list[str]]]:
    """Column keys ``task/split/metric`` in ``metric_order`` and one row of values per policy;
    pass@1 is left out where it repeats avg@n."""
    flat_rows = [{f"{n}/{m}": v for n, ms in results.items() for m, v in ms.items()} for _, results in run["evals"]]
    duplicates = duplicate_columns(flat_rows)
    keys = sorted({key for flat in flat_rows for key in flat} - duplicates, key=metric_order)
    rows = [[policy] + [f"{flat[k]:.3f}" if k in flat else "" for k in keys]
            for (policy, _), flat in zip(run["evals"], flat_rows)]
    return keys, rows


def _smooth(values: list[float], window: int = 5) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def step_segments(steps: list[dict], key: str) -> list[tuple[list[int], list[float]]]:
    """(RL steps, values) of each run of consecutive steps of one iteration that log ``key``: a
    line may join neighbouring steps only, never span steps without data or an iteration boundary."""
    segments: list[tuple[list[int], list[float]]] = []
    previous = None
    for step in steps:
        value = step.get(key)
        if value is None or value != value:
            previous = None
            continue
        if previous is None or step["rl_step"] != previous["rl_step"] + 1 or step["iteration"] != previous["iteration"]:
            segments.append(([], []))
        segments[-1][0].append(step["rl_step"])
        segments[-1][1].append(float(value))
        previous = step
    return segments


def _plot_steps(axis, runs: list[dict], key: str, title: str) -> None:
    """Per run: each step's value as a dot and a 5-step mean as a line, smoothed and drawn per
    segment (``step_segments``) and broken by NaN between segments."""
    for run in runs:
        segments = step_segments(run["steps"], key)
        if segments:
            xs, ys, smoothed = [], [], []
            for steps, values in segments:
                xs += [*steps, float("nan")]
                ys += [*values, float("nan")]
                smoothed += [*_smooth(values), float("nan")]
            line, = axis.plot(xs, smoothed, label=f"{run['name']} (5-step mean)", linewidth=1.5)
            axis.scatter(xs, ys, s=4, alpha=0.3, color=line.get_color())
    starts = {}
    for run in runs:
        for row in run["steps"]:
            starts.setdefault((run["name"], row["iteration"]), row["rl_step"])
    for boundary in {step for step in starts.values() if step > 0}:
        axis.axvline(boundary, color="grey", linewidth=0.5, linestyle=":")
    axis.set_title(title)
    axis.set_xlabel("RL step (dotted: new iteration)")
    axis.legend(fontsize=7)


def _splits(runs: list[dict]) -> list[str]:
    """Every evaluated task/split, in-distribution test splits first."""
    splits = {split for run in runs for _, results in run["evals"] for split in results}
    return sorted(splits, key=split_order)


def _plot_evals(axis, runs: list[dict], prefix: str, title: str, splits: list[str]) -> None:
    """One line per (run, split, metric starting with ``prefix``): colour by split and metric, style by run."""
    styles = ["-", "--", ":", "-."]
    series = {}  # (split, metric) -> colour
    for run in runs:
        for split in splits:
            for metric in sorted({m for _, results in run["evals"] for m in results.get(split, {})
                                  if m.startswith(prefix)}, key=lambda m: int(m.split("@")[1])):
                series.setdefault((split, metric), f"C{len(series) % 10}")
    for index, run in enumerate(runs):
        style = styles[index % len(styles)]
        for (split, metric), colour in series.items():
            ys = [results.get(split, {}).get(metric, float("nan")) for _, results in run["evals"]]
            if any(y == y for y in ys):
                label = f"{run['name']} {split if len(splits) > 1 else ''} {metric}".replace("  ", " ")
                axis.plot(range(len(ys)), ys, style, color=colour, marker="o", label=label)
    axis.set_title(title)
    axis.set_xlabel("iteration (theta_k)")
    axis.set_xticks(range(max((len(run["evals"]) for run in runs), default=0)))
    axis.legend(fontsize=6)


def has_curve(run: dict) -> bool:
    """Whether the run evaluated points inside its GRPO phases (``curve_every_n_steps``)."""
    return any(point.kind == "rl" for point in run.get("curve", []))


def curve_segments(points: list[CurvePoint]) -> list[list[CurvePoint]]:
    """The curve as drawn: one line from each policy RL starts from (theta_0, an RFT output) through its
    phase's points; a plain-RL run is one line."""
    segments: list[list[CurvePoint]] = []
    for point in points:
        if point.kind in ("theta_0", "rft") or not segments:
            segments.append([])
        segments[-1].append(point)
    return segments


def _plot_curve(axis, runs: list[dict], split: str) -> None:
    """avg@n of ``split`` over cumulative RL steps, per run; RFT outputs as stars."""
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        for number, segment in enumerate(curve_segments(run["curve"])):
            xs = [p.rl_step for p in segment if split in p.metrics]
            ys = [average_accuracy(p.metrics[split]) for p in segment if split in p.metrics]
            axis.plot(xs, ys, "-o", color=colour, markersize=3, label=run["name"] if number == 0 else None)
        rft = [p for p in run["curve"] if p.kind == "rft" and split in p.metrics]
        axis.scatter([p.rl_step for p in rft], [average_accuracy(p.metrics[split]) for p in rft], marker="*",
                     s=80, color=colour, label=f"{run['name']} RFT output" if rft else None, zorder=3)
    axis.set_title(f"held-out avg@n: {split}")
    axis.set_xlabel("cumulative RL steps (stars: RFT outputs)")
    axis.legend(fontsize=6)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = _splits(runs)
    columns = 2 + max(len(splits), 1)
    curves = any(has_curve(run) for run in runs)
    figure, axes = plt.subplots(2 + curves, columns, figsize=(5 * columns, 4 * (2 + curves)), squeeze=False)
    if curves:
        for column, split in enumerate(splits):
            _plot_curve(axes[2][column], runs, split)
        for axis in axes[2][len(splits):]:
            axis.axis("off")
    _plot_steps(axes[0][0], runs, "train/reward_mean", "training reward")
    _plot_evals(axes[0][1], runs, "avg@", "held-out avg@n", splits)
    for column, split in enumerate(splits, start=2):
        _plot_evals(axes[0][column], runs, "pass@", f"held-out pass@k: {split}", [split])
    _plot_steps(axes[1][0], runs, "rloop/forgetting_rate", "forgetting rate")
    _plot_steps(axes[1][1], runs, "rloop/distinct_correct_per_prompt", "distinct correct solutions / prompt")
    axis = axes[1][2]
    width = 0.8 / max(len(runs), 1)
    for index, run in enumerate(runs):
        if run["experts"]:
            axis.bar([k + index * width for k, _ in run["experts"]], [s["size"] for _, s in run["experts"]],
                     width=width, label=run["name"])
    axis.set_title("expert-set size")
    axis.set_xlabel("iteration")
    axis.set_xticks(sorted({k for run in runs for k, _ in run["experts"]}))
    for axis in axes[1][3:]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def curve_lines(run: dict) -> list[str]:
    """The learning curve's table (every point: RL step, training time, avg@n per split) and the run's
    candidate answers at its total RL steps (``curves.compare``)."""
    points = run["curve"]
    splits = sorted({split for p in points for split in p.metrics}, key=split_order)
    header = "| {} | RL step | training s | " + " | ".join(f"{split} avg@n" for split in splits) + " |"
    rule = "|---|---|---|" + "---|" * len(splits)

    def row(name: str, point: CurvePoint) -> str:
        seconds = "" if point.seconds is None else f"{point.seconds:.0f}"
        cells = [f"{average_accuracy(point.metrics[s]):.3f}" if s in point.metrics else "" for s in splits]
        return f"| {name} | {point.rl_step} | {seconds} | " + " | ".join(cells) + " |"

    lines = [f"### {run['name']}: learning curve", "", header.format("point"), rule]
    lines += [row(point.label, point) for point in points]
    candidates = compare(points)
    lines += ["", f"Candidate answers at {max(p.rl_step for p in points)} RL steps (best: highest validation "
                  "avg@n; mid-phase points are not saved):", "", header.format("candidate"), rule]
    lines += [row(f"{name}: {point.label}", point) for name, point in candidates.items()]
    return lines + [""]


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
        if has_curve(run):
            lines += [""] + curve_lines(run)
        rewards = [s["train/reward_mean"] for s in run["steps"] if "train/reward_mean" in s]
        if rewards:
            head, tail = rewards[: max(1, len(rewards) // 10)], rewards[-max(1, len(rewards) // 10):]
            lines += ["", f"Training reward: first 10% of steps {sum(head) / len(head):.3f}, "
                          f"last 10% {sum(tail) / len(tail):.3f} over {len(rewards)} RL steps."]
        lines.append("")
    return "\n".join(lines)


def check_run_directory(path: str | Path, role: str = "run_dir") -> None:
    """Refuse, before anything is written, a path that is not an RLoop run directory (no ``manifest.json``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{role} {str(path)!r} is not a directory")
    if not RunLayout(path).manifest.is_file():
        raise ValueError(f"{role} {str(path)!r} is not an RLoop run directory (it has no manifest.json); "
                         "point it at the run_dir of an rloop fit")


def write_final(run_dir: str | Path, output: str) -> Optional[Path]:
    """Write ``final.json``: the policy the loop hands over (``curves.choose`` by ``output``), its point on
    the curve and its held-out metrics. None (nothing written) when the run has no such point."""
    layout = RunLayout(run_dir)
    point = choose(load_curve(layout.root), output)
    if point is None:
        return None
    final = {"output": output, "point": point.label, "rl_step": point.rl_step, "policy": point.policy,
             "metrics": point.metrics}
    if not layout.final.exists() or json.loads(layout.final.read_text()) != final:  # a rerun changes no file
        write_json_atomic(layout.final, final)
    return layout.final


def write_report(run_dir: str | Path, baseline: Optional[str | Path] = None) -> Path:
    """Write ``{run_dir}/report.md`` and ``report.png``; include ``baseline`` runs for comparison."""
    check_run_directory(run_dir)
    if baseline is not None:
        check_run_directory(baseline, "baseline")
    layout = RunLayout(run_dir)
    runs = [load_run(layout.root)] + ([load_run(Path(baseline))] if baseline else [])
    plot(runs, layout.report_image)
    layout.report_markdown.write_text(markdown(runs, layout.report_image.name))
    return layout.report_markdown
