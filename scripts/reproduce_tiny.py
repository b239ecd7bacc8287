"""Seeded side-by-side study on a tiny CPU setting: RLoop vs plain GRPO, plus ablations.

Every run is ``rloop fit --config CONFIG`` with a different run directory, seed and flags, so each
row of the results is one command away from being reproduced by hand. CONFIG is a loop config:
``configs/tiny_cpu.yaml`` (Countdown, the default) or ``configs/tiny_cpu_arithmetic.yaml``
(multi-step arithmetic).

    python scripts/reproduce_tiny.py                 # 3 seeds x {RLoop, vanilla} + ablations (seed 0)
    python scripts/reproduce_tiny.py --quick         # 1 seed, RLoop vs vanilla only
    python scripts/reproduce_tiny.py --no-ablations  # 3 seeds x {RLoop, vanilla} only
    python scripts/reproduce_tiny.py --ablation-seeds 3  # ablations over all 3 seeds too
    python scripts/reproduce_tiny.py --report-only   # re-aggregate finished runs
    python scripts/reproduce_tiny.py --config configs/tiny_cpu_arithmetic.yaml --no-ablations

Side studies (runs made by hand with ``rloop fit`` and the flags the results notes name) are
tabulated from their run directories, arms named on the command line; this runs nothing and
prints one table per evaluated split (final policy theta_K, mean ± std over the runs of an arm):

    python scripts/reproduce_tiny.py --base "theta_0 (base)=runs/study/pool/p128_rloop_s0" \
        --arm "RLoop=runs/study/pool/p128_rloop_s*" --arm "plain GRPO=runs/study/pool/p128_vanilla_s*"

``--arm NAME=DIR[,DIR...]`` takes run directories or glob patterns (one per seed); ``--base
NAME=DIR[,DIR...]`` adds a row of those runs' theta_0 evaluations; rows keep the command line's order.

Equal compute: the vanilla baseline runs the same K GRPO phases with the same steps, prompts and
rollouts per step from the same base; RLoop adds the (cheap) RFT phases on top. Runs of a config go
to ``runs/study/<config stem>/<name>_seed<S>``. Its tables replace the block between
``<!-- reproduce_tiny: <config stem> -->`` and ``<!-- end reproduce_tiny: <config stem> -->`` in
``docs/results.md`` (appended when the page has no such block), its reward curves go to
``docs/results/<config stem>_reward_curves.png``; the rest of the page is prose, kept across reruns.

Choosing on validation: the arms run here are the search (variants and ablations); the section names
the arm of highest ``--select-metric`` (default avg@n) on ``--select-split``, a ``task/validation``
split the runs evaluated (an evaluator with ``split: validation`` in the loop config). A search that
would choose on a test or OOD split is refused before anything runs: those splits are read only for
the tables. Runs with a learning curve (``curve_every_n_steps``) add, per arm, the candidate answers
at equal RL steps (theta_K, the last RL end point, the best point on validation) and
``docs/results/<config stem>_curves.png``: held-out avg@n over RL steps, mean and a ±1 std band over seeds.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/tiny_cpu.yaml"
VARIANTS = {  # name -> extra `rloop fit` flags
    "rloop": [],
    "vanilla": ["--vanilla", "true"],
}
ABLATIONS = {
    "no_hard_filter": ["--expert_set.filter", "none"],
    "rft_from_rl_end": ["--rft_from", "rl_end"],
    "no_replay": ["--expert_set.replay", "false"],
    "k3": ["--iterations", "3"],
    "vanilla_k3": ["--iterations", "3", "--vanilla", "true"],
}
# pass@1 from n samples is avg@n (c / n), so tables show it once; "avg@n" names whatever n a config sets
METRICS = ["pass@1", "pass@4", "pass@16", "pass@32", "greedy_accuracy"]


def run_one(config: str, out: Path, name: str, seed: int, flags: list[str]) -> Path:
    run_dir = out / f"{name}_seed{seed}"
    command = [sys.executable, "-m", "rloop_lightning", "fit", "--config", config, "--run_dir", str(run_dir),
               "--seed", str(seed), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # parallel runs must not oversubscribe the cores
    log = out / f"{name}_seed{seed}.log"
    with open(log, "w") as handle:
        result = subprocess.run(command, check=False, cwd=ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); see {log}")
    print(f"done: {name} seed {seed}", flush=True)
    return run_dir


def final_evaluation_path(run_dir: Path) -> Path | None:
    """The ``eval.json`` of the last iteration that has one (theta_K), or None."""
    from rloop_lightning.loop.layout import RunLayout

    layout = RunLayout(run_dir)
    paths = [layout.evaluation(layout.phase("eval", k)) for k in layout.iterations()]
    return next((path for path in reversed(paths) if path.exists()), None)


def finished(run_dir: Path) -> bool:
    """Whether the run evaluated theta_K of all its ``iterations`` (its manifest's configuration): a run
    stopped after theta_1's evaluation has one, but theta_1 is not its final policy."""
    from rloop_lightning.loop.layout import RunLayout

    layout = RunLayout(run_dir)
    if not layout.manifest.exists():
        return False
    manifest = json.loads(layout.manifest.read_text())
    if "config" not in manifest:  # scripts/trl_arm.py writes its manifest after its one evaluation
        return final_evaluation_path(run_dir) is not None
    return layout.evaluation(layout.phase("eval", manifest["config"]["iterations"] - 1)).exists()


def final_eval(run_dir: Path) -> dict:
    path = final_evaluation_path(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no iteration has an evaluation (iter_KK/eval/eval.json)")
    return json.loads(path.read_text())["metrics"]


def base_eval(run_dir: Path) -> dict:
    from rloop_lightning.loop.layout import BASE_EVALUATION, RunLayout

    return json.loads(RunLayout(run_dir).evaluation(BASE_EVALUATION).read_text())["metrics"]


def mean_std(values: list[float]) -> str:
    if all(math.isnan(value) for value in values):  # all NaN: the split does not report this metric
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def metric(evaluation: dict, name: str) -> float:
    """``name`` from one split's metrics; NaN where the split does not report it (greedy accuracy is
    optional per split)."""
    from rloop_lightning.loop.curves import average_accuracy

    return average_accuracy(evaluation) if name == "avg@n" else evaluation.get(name, float("nan"))


def table(rows: dict[str, list[dict]], split: str, metrics: list[str] = METRICS) -> list[str]:
    """One markdown row per arm: the number of runs and mean ± std of each metric on ``split``."""
    lines = ["| run | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, evals in rows.items():
        cells = [mean_std([metric(e.get(split, {}), m) for e in evals]) for m in metrics]
        lines.append(f"| {name} | {len(evals)} | " + " | ".join(cells) + " |")
    return lines


def split_tables(rows: dict[str, list[dict]], splits: list[str], metrics: list[str] = METRICS) -> list[str]:
    """``table`` for each split under a ``### split`` heading."""
    lines = []
    for split in splits:
        lines += [f"### {split}", ""] + table(rows, split, metrics) + [""]
    return lines


def arm_runs(patterns: str) -> list[Path]:
    """The run directories named by comma-separated paths or glob patterns, sorted per pattern."""
    runs = []
    for pattern in filter(None, patterns.split(",")):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise SystemExit(f"no run directory matches {pattern!r}")
        runs += [Path(match) for match in matches]
    return runs


def study_tables(arms: list[tuple[str, str]], splits: list[str] | None = None,
                 metrics: list[str] = METRICS) -> str:
    """Tables of a side study: ``arms`` are ``(kind, "NAME=DIR[,DIR...]")`` in row order, kind
    ``final`` (theta_K of each run) or ``base`` (theta_0 of each run); one table per split."""
    from rloop_lightning.loop.report import split_order

    rows: dict[str, list[dict]] = {}
    for kind, spec in arms:
        name, separator, patterns = spec.partition("=")
        if not separator or not name:
            raise SystemExit(f"an arm is NAME=DIR[,DIR...]; got {spec!r}")
        read = base_eval if kind == "base" else final_eval
        rows[name] = [read(run_dir) for run_dir in arm_runs(patterns)]
    if splits is None:
        splits = sorted({split for evals in rows.values() for e in evals for split in e}, key=split_order)
    return "\n".join(split_tables(rows, splits, metrics))


def reward_curve(run_dir: Path) -> list[float]:
    from rloop_lightning.loop.layout import RunLayout

    layout = RunLayout(run_dir)
    rows = []
    for k in layout.iterations():
        metrics = layout.metrics(layout.phase("grpo", k))
        if metrics.exists():
            rows += [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["train/reward_mean"] for r in rows if "train/reward_mean" in r]


def plot_curves(runs: dict[str, list[Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in ("rloop", "vanilla"):
        curves = [reward_curve(d) for d in runs.get(name, [])]
        curves = [c for c in curves if c]
        if not curves:
            continue
        length = min(map(len, curves))
        mean = [statistics.mean(c[i] for c in curves) for i in range(length)]
        smooth = [statistics.mean(mean[max(0, i - 4): i + 1]) for i in range(length)]
        axis.plot(range(length), smooth, label=f"{name} (mean of {len(curves)} seeds, 5-step mean)")
    axis.set_xlabel("RL step")
    axis.set_ylabel("training reward")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def check_select_split(split: str | None) -> None:
    """Refuse a search that would choose on anything but a validation split (``task/validation``)."""
    if split is not None and not split.endswith("/validation"):
        raise SystemExit(f"--select-split {split}: settings are chosen on a validation split only "
                         "(task/validation); the test and OOD splits are read only for the final tables")


def selection(runs: dict[str, list[Path]], split: str | None, metric_name: str) -> list[str]:
    """The arm of highest mean ``metric_name`` on the validation ``split`` (default: the first validation
    split the runs evaluated), over its seeds' final policies; never a test or OOD split."""
    check_select_split(split)
    evals = {name: [final_eval(d) for d in dirs] for name, dirs in runs.items() if dirs}
    if split is None:
        split = next((s for e in evals.values() for ev in e for s in sorted(ev) if s.endswith("/validation")), None)
    if split is None:
        return ["Chosen on validation: nothing (the runs evaluated no validation split; the tables' splits are "
                "not used for choosing).", ""]
    scores = {name: statistics.mean(metric(e.get(split, {}), metric_name) for e in es) for name, es in evals.items()}
    scores = {name: score for name, score in scores.items() if not math.isnan(score)}
    if not scores:
        return [f"Chosen on validation: nothing (no arm reports {metric_name} on {split}).", ""]
    best = max(scores, key=scores.get)
    ranked = ", ".join(f"`{name}` {score:.3f}" for name, score in sorted(scores.items(), key=lambda i: -i[1]))
    return [f"Chosen on {split} ({metric_name} of theta_K, mean over seeds): **{best}** ({ranked}).", ""]


def candidate_tables(runs: dict[str, list[Path]], splits: list[str]) -> list[str]:
    """Per arm with learning curves: theta_K, the last RL end point and the best point on validation
    (``loop.curves.compare``), mean ± std over seeds, at the arm's total RL steps."""
    from rloop_lightning.loop.curves import compare, load_curve

    rows: dict[str, list[dict]] = {}
    for name, dirs in runs.items():
        for run_dir in dirs:
            points = load_curve(run_dir)
            if not any(p.kind == "rl" for p in points):
                continue
            for candidate, point in compare(points).items():
                rows.setdefault(f"{name}: {candidate}", []).append(point.metrics)
    if not rows:
        return []
    return ["Candidate answers at equal RL steps (runs with a learning curve; best = highest validation avg@n):",
            ""] + split_tables(rows, splits, ["avg@n", "pass@32"])


def curve_series(run_dir: Path, split: str, rft: bool = False, name: str = "avg@n") -> dict[int, float]:
    """Metric ``name`` (default avg@n) of ``split`` by cumulative RL step over a run's curve: theta_0, RL points
    and RL end points, or with ``rft`` the RFT outputs."""
    from rloop_lightning.loop.curves import load_curve

    return {p.rl_step: metric(p.metrics[split], name) for p in load_curve(run_dir)
            if (p.kind == "rft") == rft and split in p.metrics}


def plot_held_out_curves(runs: dict[str, list[Path]], split: str, path: Path, metrics: tuple[str, ...] = ("avg@n",)
                         ) -> bool:
    """Held-out ``metrics`` (one panel each) over RL steps per arm: mean over seeds and a ±1 std band, at the
    steps every seed evaluated. False (nothing drawn) when no run has a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4), squeeze=False)
    drawn = False
    for axis, name in zip(axes[0], metrics):
        for arm, dirs in runs.items():
            series = [curve_series(d, split, name=name) for d in dirs]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if len(steps) < 3:  # theta_0 and end points only: no curve
                continue
            means = [statistics.mean(s[step] for s in series) for step in steps]
            stds = [statistics.stdev(s[step] for s in series) if len(series) > 1 else 0.0 for step in steps]
            line, = axis.plot(steps, means, label=f"{arm} ({len(series)} seeds)")
            axis.fill_between(steps, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                              color=line.get_color(), alpha=0.2)
            outputs = [curve_series(d, split, rft=True, name=name) for d in dirs]
            rft_steps = sorted(set.intersection(*(set(s) for s in outputs)))
            if rft_steps:
                axis.scatter(rft_steps, [statistics.mean(s[step] for s in outputs) for step in rft_steps],
                             marker="*", s=80, color=line.get_color(), label=f"{arm} RFT outputs", zorder=3)
            drawn = True
        axis.set_xlabel("cumulative RL steps (stars: RFT outputs)")
        axis.set_ylabel(f"held-out {name}, {split}")
        axis.legend()
    if drawn:
        figure.tight_layout()
        figure.savefig(path, dpi=90)
    plt.close(figure)
    return drawn


def write_section(config: str, runs: dict[str, list[Path]], figures: Path, select_split: str | None = None,
                  select_metric: str = "avg@n") -> str:
    """This config's tables (one per evaluated split) and reward curves (``figures/<config stem>_reward_curves.png``),
    as the markdown that goes between the config's markers in the results page."""
    from rloop_lightning.loop.report import split_order, write_report

    stem = Path(config).stem
    figures.mkdir(parents=True, exist_ok=True)
    evals = {name: [final_eval(d) for d in dirs] for name, dirs in runs.items() if dirs}
    first = next(iter(runs.values()))[0]
    rows = {"theta_0 (base)": [base_eval(first)], **evals}
    splits = sorted(base_eval(first), key=split_order)  # test first
    tasks = ", ".join(sorted({split.split("/")[0] for split in splits}))
    lines = [(f"Produced by `python scripts/reproduce_tiny.py --config {config}` (each run is `rloop fit "
              f"--config {config} --run_dir ... --seed S` plus the flags named below). Held-out metrics of "
              "the final policy theta_K; mean ± std over seeds."), ""]
    lines += split_tables(rows, splits)
    lines += selection(runs, select_split, select_metric)
    lines += candidate_tables(runs, splits)
    lines += ["Flags: " + "; ".join(f"`{n}`: `{' '.join(f) or '(defaults)'}`"
                                    for n, f in {**VARIANTS, **ABLATIONS}.items() if n in runs), ""]
    if "trl" in runs:
        lines += ["`trl`: plain GRPO in TRL's GRPOTrainer at the same settings (`python scripts/trl_arm.py`), "
                  "evaluated by the same Evaluator.", ""]
    plot_curves(runs, figures / f"{stem}_reward_curves.png")
    for name, dirs in runs.items():
        if name != "trl":  # TRL runs have only their final evaluation
            write_report(dirs[0], runs["vanilla"][0] if name == "rloop" and runs.get("vanilla") else None)
    lines += [f"![training reward, {tasks}]({figures.name}/{stem}_reward_curves.png)"]
    if plot_held_out_curves(runs, splits[0], figures / f"{stem}_curves.png"):
        lines += ["", f"![held-out avg@n over RL steps, {splits[0]}]({figures.name}/{stem}_curves.png)"]
    return "\n".join(lines)


def write_results(doc: Path, stem: str, section: str, marker: str = "reproduce_tiny") -> None:
    """Replace ``stem``'s block of ``doc`` (between its ``<!-- marker: stem -->`` markers) with ``section``;
    append the block when ``doc`` has none. Everything outside the blocks is left as it is."""
    begin, end = f"<!-- {marker}: {stem} -->", f"<!-- end {marker}: {stem} -->"
    block = f"{begin}\n{section}\n{end}"
    text = doc.read_text() if doc.exists() else "# Results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
    print(doc)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="loop config (path from the repository root)")
    parser.add_argument("--quick", action="store_true", help="one seed, RLoop vs vanilla only")
    parser.add_argument("--no-ablations", action="store_true", help="every seed, RLoop vs vanilla only")
    parser.add_argument("--ablation-seeds", type=int, default=1, help="how many of --seeds the ablations use")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one core each)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study",
                        help="runs go to OUT/<config stem>/<name>_seed<S>")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--report-only", action="store_true", help="aggregate finished runs, run nothing")
    parser.add_argument("--select-split", default=None,
                        help="the task/validation split the search chooses on (default: the runs' first "
                             "validation split); a test or OOD split is refused")
    parser.add_argument("--select-metric", default="avg@n", help="the metric the search chooses by (default avg@n)")
    parser.add_argument("--arm", dest="arms", action="append", type=lambda spec: ("final", spec),
                        metavar="NAME=DIR[,DIR...]",
                        help="side-study mode: a row of theta_K of these runs (paths or globs, one per seed); "
                             "prints the tables and runs nothing")
    parser.add_argument("--base", dest="arms", action="append", type=lambda spec: ("base", spec),
                        metavar="NAME=DIR[,DIR...]", help="side-study mode: a row of theta_0 of these runs")
    parser.add_argument("--split", dest="splits", action="append",
                        help="side-study mode: only this task/split (repeatable; default every evaluated split)")
    parser.add_argument("--metrics", nargs="+", default=METRICS,
                        help=f"side-study mode: columns (default {' '.join(METRICS)}; avg@n is also known)")
    args = parser.parse_args(argv)
    check_select_split(args.select_split)  # before anything runs
    if args.arms:
        command = shlex.join(["python", "scripts/reproduce_tiny.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"Produced by `{command}`.\n\n{study_tables(args.arms, args.splits, args.metrics)}")
        return
    out = args.out / Path(args.config).stem
    seeds = args.seeds[:1] if args.quick else args.seeds
    plan = [(name, seed, flags) for name, flags in VARIANTS.items() for seed in seeds]
    if not (args.quick or args.no_ablations):
        plan += [(name, seed, flags) for name, flags in ABLATIONS.items() for seed in seeds[: args.ablation_seeds]]
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        started = time.perf_counter()
        # build the shared base once, before the parallel runs race to build it
        run_one(args.config, out, *plan[0])
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run_one(args.config, out, *job), plan[1:]))
        print(f"{len(plan)} runs in {time.perf_counter() - started:.0f} s", flush=True)
    runs: dict[str, list[Path]] = {}
    # every finished run of every arm and seed, including ablation seeds an earlier invocation ran
    # (--ablation-seeds 3) and the TRL arm, which scripts/trl_arm.py runs into the same layout
    names = [*VARIANTS, *([] if args.quick or args.no_ablations else ABLATIONS), "trl"]
    for name, seed in ((name, seed) for name in names for seed in seeds):
        run_dir = out / f"{name}_seed{seed}"
        if finished(run_dir):
            runs.setdefault(name, []).append(run_dir)
        elif run_dir.exists():
            print(f"left out (unfinished): {run_dir}", flush=True)
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    section = write_section(args.config, runs, args.doc.parent / "results", args.select_split, args.select_metric)
    write_results(args.doc, Path(args.config).stem, section)


if __name__ == "__main__":
    main()
