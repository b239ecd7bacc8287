"""The study of docs/results.md: RLoop against plain GRPO where plain GRPO over-specialises, every setting
chosen on the validation split, the test and OOD splits read only for the final tables.

    python scripts/study.py --task countdown        # the search, then the final comparison
    python scripts/study.py --task arithmetic
    python scripts/study.py --task countdown --stage search     # validation only
    python scripts/study.py --task countdown --stage final      # the search's choice (or --setting NAME)
    python scripts/study.py --task countdown --report-only      # tabulate finished runs, run nothing
    python scripts/study.py --quick ...                          # 2 arms, 2 final seeds: the pipeline, cheaply

**Search** (``--search-seeds``, default 100: seeds apart from the final ones, so the choice is not fitted to
the seeds that report it): every arm of ``SEARCH_ARMS`` is ``rloop fit --config configs/study/<task>.yaml``
plus its flags, each evaluating only the validation split, theta_0, every ``curve_every_n_steps`` RL steps
and every phase end. Each RLoop arm offers three answers at the run's total RL steps (``output``: theta_K,
the last RL phase's end point, the saved policy best on validation); plain GRPO offers its end point and its
best saved policy on validation (early stopping). The choice: the RLoop (arm, answer) of highest validation
avg@n among those at or above plain GRPO's answer of the same rule at pass@32, else the highest avg@n. A
search config with an evaluator of any other split is refused before anything runs.

**Final** (``--seeds``, default 0-4): the chosen arm and plain GRPO per seed, plus plain GRPO in the chosen arm's
own phases when its K differs (``MATCHED_PLAIN``: each phase restarts the optimizer under its own seed, so only
that comparison isolates RFT and the expert set); each candidate answer is then
evaluated on the test and OOD splits (``rloop eval --config configs/study/eval_<task>.yaml --seed S``,
``<run>/study_eval/<answer>.json``). Tables: mean ± std over seeds, and a paired t-test by seed
(``rloop_lightning.loop.significance``) of the chosen answer against each plain-GRPO answer.

Everything goes to ``runs/study/<task>/{search,final}/<arm>_seed<S>``; the page's block between
``<!-- study: <task> -->`` markers is rewritten, and ``docs/results/study_<task>_curves.png`` drawn.
``--pool N`` runs every arm on another GRPO prompt pool (``<task>_pool<N>`` in those names): the map of where
RLoop wins and loses over pool size, RL steps per iteration and expert-set setting.

``--model small`` repeats a comparison on the 36M-parameter ``rloop/small-llama-32k`` (``configs/study/<task>_small.yaml``
and ``eval_<task>_small.yaml``, its own base, ``runs/study/<task>_small``); ``--plains matched`` runs plain GRPO in the
chosen arm's phases only::

    python scripts/study.py --task countdown --model small --stage final --setting rloop_k2_hard:rl_end \
        --plains matched --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_tiny as tiny  # noqa: E402  (a sibling script: tables, curves, the results page)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("countdown", "arithmetic")
STEPS = 120  # RL steps of every arm: K x steps per iteration
POOL = 128


PLAIN = "plain_grpo"
SEARCH_ARMS = {  # name -> (K, `rloop fit` flags on top of configs/study/<task>.yaml); every arm K x STEPS / K RL steps
    PLAIN: (6, ["--vanilla", "true"]),
    "rloop_k6_hard": (6, []),
    "rloop_k6_all": (6, ["--expert_set.filter", "none"]),
    "rloop_k2_hard": (2, []),
    "rloop_k2_all": (2, ["--expert_set.filter", "none"]),
}
CONFIG_K = 6  # the study configs' iterations
MATCHED_PLAIN = {2: "plain_grpo_k2"}  # final stage: plain GRPO in the chosen arm's phases (K x STEPS / K chained)
ARMS = SEARCH_ARMS | {name: (k, ["--vanilla", "true"]) for k, name in MATCHED_PLAIN.items()}


MODELS = {  # --model: the study config's suffix (configs/study/<task><suffix>.yaml, eval_<task><suffix>.yaml)
    "tiny": "",  # rloop/tiny-llama, 0.8M parameters
    "small": "_small",  # rloop/small-llama-32k, 36M parameters (Countdown only)
}


def config_of(task: str, model: str = "tiny") -> str:
    return f"configs/study/{task}{MODELS[model]}.yaml"


def eval_config_of(task: str, model: str = "tiny") -> str:
    return f"configs/study/eval_{task}{MODELS[model]}.yaml"


def grpo_overrides(config: str) -> tuple[int, dict]:
    """The study config's iterations and GRPO overrides (its steps per phase and prompt pool among them)."""
    import yaml

    loop = yaml.safe_load((ROOT / config).read_text())
    return loop["iterations"], loop["grpo"]["overrides"]


def arm_flags(arm: str, pool: int | None = None, config: str | None = None) -> list[str]:
    """The arm's ``rloop fit`` flags on ``config`` (default the Countdown study's); another K or ``pool`` than the
    config's restates its GRPO overrides whole, with K x STEPS / K RL steps."""
    k, flags = ARMS[arm]
    config_k, overrides = grpo_overrides(config or config_of(TASKS[0]))
    if k == config_k and pool in (None, overrides["data.init_args.limit"]):
        return list(flags)
    overrides = overrides | {"trainer.max_steps": STEPS // k, "data.init_args.limit": pool or overrides["data.init_args.limit"]}
    return ["--iterations", str(k), *flags, "--grpo.overrides", json.dumps(overrides)]


DESCRIPTIONS = {  # how the tables name an arm's setting
    PLAIN: "plain GRPO, 6 phases of 20 RL steps chained",
    "plain_grpo_k2": "plain GRPO, 2 phases of 60 RL steps chained",
    "rloop_k6_hard": "K = 6 x 20 RL steps; hard prompts only (solved <= 0.5), 2 per prompt, replay",
    "rloop_k6_all": "K = 6 x 20; every solved prompt (`--expert_set.filter none`), 2 per prompt, replay",
    "rloop_k2_hard": "K = 2 x 60; hard prompts only, 2 per prompt, replay",
    "rloop_k2_all": "K = 2 x 60; every solved prompt, 2 per prompt, replay",
}
QUICK_ARMS = (PLAIN, "rloop_k6_hard")
ANSWERS = {"theta_K": "theta_K", "rl_end": "last RL end", "best_validation": "best saved on validation"}


def check_search_config(config: str) -> None:
    """Refuse a search config that evaluates anything but a validation split: the search reads validation only."""
    import yaml

    evaluators = yaml.safe_load((ROOT / config).read_text()).get("evaluators") or []
    splits = sorted({e.get("split", "test") for e in evaluators} - {"validation"})
    if splits or not evaluators:
        raise SystemExit(f"{config}: the search evaluates the validation split only (evaluators with split: "
                         f"validation); it has {', '.join(splits) or 'no evaluator'}. Test and OOD are read only "
                         "by the final tables (configs/study/eval_<task>.yaml)")


def run(config: str, run_dir: Path, seed: int, flags: list[str], extra: list[str]) -> Path:
    """``rloop fit`` for one arm and seed (skipped when finished), one core."""
    if tiny.finished(run_dir):
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "rloop_lightning", "fit", "--config", config, "--run_dir", str(run_dir),
               "--seed", str(seed), *flags, *extra]
    with open(run_dir.with_suffix(".log"), "w") as log:
        result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log,
                                stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); see {run_dir.with_suffix('.log')}")
    print(f"done: {run_dir}", flush=True)
    return run_dir


def run_all(jobs: list[tuple], parallel: int) -> None:
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda job: run(*job), jobs))
    print(f"{len(jobs)} runs in {time.perf_counter() - started:.0f} s", flush=True)


def answers(run_dir: Path) -> dict:
    """The run's candidate answers (``loop.curves.choose``) by ``output`` name; plain GRPO has no theta_K of
    its own (its last end point)."""
    from rloop_lightning.loop.curves import choose, load_curve

    points = load_curve(run_dir)
    rloop = any(p.kind == "rft" for p in points)
    return {output: point for output in ANSWERS if (rloop or output != "theta_K")
            and (point := choose(points, output)) is not None}


def validation_scores(run_dirs: list[Path]) -> dict[str, tuple[float, float]]:
    """Per answer: (validation avg@n, pass@32), mean over the runs (seeds)."""
    from rloop_lightning.loop.curves import validation_split

    by_answer: dict[str, list[tuple[float, float]]] = {}
    for run_dir in run_dirs:
        found = answers(run_dir)
        split = validation_split(list(found.values()))
        for output, point in found.items():
            values = point.metrics[split]
            by_answer.setdefault(output, []).append((tiny.metric(values, "avg@n"), values.get("pass@32", float("nan"))))
    return {output: (statistics.mean(v[0] for v in vs), statistics.mean(v[1] for v in vs))
            for output, vs in by_answer.items()}


def choose_setting(scores: dict[str, dict[str, tuple[float, float]]]) -> tuple[str, str, bool]:
    """(arm, answer, beats plain GRPO at pass@32): the RLoop (arm, answer) of highest validation avg@n among
    those at or above plain GRPO's answer of the same rule at pass@32 (theta_K and rl_end against its end point,
    best_validation against its best saved policy), else of highest avg@n."""
    plain = scores[PLAIN]
    candidates = [(avg, pass32 >= plain["best_validation" if answer == "best_validation" else "rl_end"][1], arm, answer)
                  for arm, by_answer in scores.items() if arm != PLAIN for answer, (avg, pass32) in by_answer.items()]
    winners = [c for c in candidates if c[1]] or candidates
    avg, beats, arm, answer = max(winners, key=lambda c: c[0])
    return arm, answer, beats


def study_command(task: str, pool: int | None = None, model: str = "tiny") -> str:
    """``python scripts/study.py`` with the flags that name a study: its task, model and a pool other than its
    config's."""
    config_pool = grpo_overrides(config_of(task, model))[1]["data.init_args.limit"]
    return (f"python scripts/study.py --task {task}" + (f" --model {model}" if model != "tiny" else "")
            + (f" --pool {pool}" if pool not in (None, config_pool) else ""))


def versus(mine: tuple[float, float], theirs: tuple[float, float]) -> str:
    """"+/-", "=/+", ...: (avg@n, pass@32) ahead of, level with or behind plain GRPO's."""
    return "/".join("+" if a > b else "=" if a == b else "-" for a, b in zip(mine, theirs))


def search_section(task: str, runs: dict[str, list[Path]], pool: int = POOL,
                   model: str = "tiny") -> tuple[list[str], tuple[str, str, bool]]:
    """The search's map (validation avg@n and pass@32 of every arm's answers) and its choice."""
    scores = {arm: validation_scores(dirs) for arm, dirs in runs.items()}
    choice = choose_setting(scores)
    seeds = ", ".join(sorted({d.name.rsplit("_seed", 1)[1] for dirs in runs.values() for d in dirs}))
    lines = [f"Search: `{study_command(task, pool, model)} --stage search` (seed {seeds}; "
             f"validation split only; a pool of {pool} prompts). Validation avg@n / pass@32 of each arm's answers "
             f"after {STEPS} RL steps:", "",
             "| arm | setting | " + " | ".join(ANSWERS.values()) + " |", "|---|---|" + "---|" * len(ANSWERS)]
    plain = scores[PLAIN]
    for arm, by_answer in scores.items():
        cells = []
        for a in ANSWERS:
            if a not in by_answer:
                cells.append("(its end point)")
                continue
            cell = f"{by_answer[a][0]:.3f} / {by_answer[a][1]:.3f}"
            if arm != PLAIN:  # ahead (+) or not (-) of plain GRPO's answer of the same rule, avg@n / pass@32
                against = plain["best_validation" if a == "best_validation" else "rl_end"]
                cell += f" ({versus(by_answer[a], against)})"
            cells.append(cell)
        lines.append(f"| {arm} | {DESCRIPTIONS.get(arm, arm)} | " + " | ".join(cells) + " |")
    arm, answer, beats = choice
    lines += ["", "(avg@n/pass@32): +, = or - against plain GRPO's answer of the same rule (its end point; its best "
              "saved on validation).", "",
              f"Chosen on validation: **{arm}**, answer **{answer}** ({ANSWERS[answer]}), "
              + ("at or above plain GRPO's answer of the same rule at pass@32, highest avg@n among those."
                 if beats else "no RLoop answer reaches plain GRPO's pass@32 on validation; highest avg@n."), ""]
    return lines, choice


def evaluate_answers(task: str, run_dir: Path, seed: int, model: str = "tiny") -> dict[str, dict]:
    """Test and OOD metrics of the run's saved answers (one ``rloop eval`` per distinct policy)."""
    out, done = {}, {}
    for output, point in answers(run_dir).items():
        if point.policy is None:
            continue
        path = run_dir / "study_eval" / f"{output}.json"
        if point.policy in done:
            out[output] = done[point.policy]
            continue
        if not path.exists():
            command = [sys.executable, "-m", "rloop_lightning", "eval", "--config", eval_config_of(task, model),
                       "--policy.model_name_or_path", point.policy, "--seed", str(seed), "--output", str(path)]
            subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out[output] = done[point.policy] = {"rl_step": point.rl_step, "label": point.label,
                                            "metrics": json.loads(path.read_text())}
    return out


def seed_of(run_dir: Path) -> int:
    return int(run_dir.name.rsplit("_seed", 1)[1])


def plains_for(arm: str) -> list[str]:
    """The plain-GRPO arms the final stage compares ``arm`` with: the search's, and plain GRPO in ``arm``'s own
    phases (same K and steps per phase: optimizer restarts and data order alike) when they differ."""
    k = ARMS[arm][0]
    return [PLAIN] + ([MATCHED_PLAIN[k]] if k != ARMS[PLAIN][0] else [])


def plain_label(name: str) -> str:
    k = ARMS[name][0]
    return "plain GRPO" if name == PLAIN else f"plain GRPO, K = {k} x {STEPS // k}"


def final_section(task: str, arm: str, answer: str, runs: dict[str, list[Path]], evals: dict,
                  pool: int = POOL, model: str = "tiny", flags: str = "") -> list[str]:
    """Mean ± std over seeds of every answer on test and OOD, and paired t-tests (by seed) of every RLoop answer
    against each plain-GRPO answer; the answer chosen on validation is the one the search committed to."""
    from rloop_lightning.loop.significance import paired_t_test

    plains = [name for name in plains_for(arm) if name in runs]
    by_seed: dict[str, dict[int, dict]] = {}  # label -> seed -> metrics
    for name in (*plains, arm):
        for run_dir in runs[name]:
            for output, result in evals[run_dir].items():
                label = f"{plain_label(name)}: end point" if (name in plains and output == "rl_end") else \
                    f"{plain_label(name) if name in plains else name}: {ANSWERS[output]}"
                by_seed.setdefault(label, {})[seed_of(run_dir)] = result["metrics"]
    rows = {label: [metrics for _, metrics in sorted(seeds.items())] for label, seeds in by_seed.items()}
    splits = sorted({s for rs in rows.values() for r in rs for s in r}, key=lambda s: (not s.endswith("/test"), s))
    lines = [f"Final: `{study_command(task, pool, model)} --stage final{flags}` (seeds {', '.join(str(seed_of(d)) for d in runs[arm])}), every arm {STEPS} RL "
             "steps; mean ± std over seeds.",
             ""] + tiny.split_tables(rows, splits, ["avg@n", "pass@4", "pass@16", "pass@32"])
    chosen = f"{arm}: {ANSWERS[answer]}"
    lines += [f"Paired t-tests by seed, RLoop minus plain GRPO: mean difference (t, p; df = seeds - 1; * p < 0.05). "
              f"**{chosen}** is the answer chosen on validation, the test the search committed to; the other rows "
              "are exploratory (no correction for the number of comparisons).", "",
              "| RLoop | plain GRPO | split | avg@n | pass@32 |", "|---|---|---|---|---|"]
    rloop_labels = [label for label in rows if not label.startswith("plain GRPO")]
    for label in sorted(rloop_labels, key=lambda label: label != chosen):
        for other in (f"{plain_label(name)}: {answer}" for name in plains
                      for answer in ("end point", ANSWERS["best_validation"])):
            common = sorted(set(by_seed[label]) & set(by_seed.get(other, {})))
            if len(common) < 2:
                continue
            for split in splits:
                cells = []
                for name in ("avg@n", "pass@32"):
                    test = paired_t_test([tiny.metric(by_seed[label][s][split], name) for s in common],
                                         [tiny.metric(by_seed[other][s][split], name) for s in common])
                    t = "-" if math.isnan(test.t) else f"{test.t:.2f}"  # every seed's difference 0
                    cells.append(f"{test.mean_difference:+.3f} ({t}, {test.p:.3f}){' *' if test.significant() else ''}")
                shown = f"**{label}**" if label == chosen else label
                lines.append(f"| {shown} | {other} | {split} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def finished_runs(out: Path, arms, seeds) -> dict[str, list[Path]]:
    runs = {arm: [out / f"{arm}_seed{s}" for s in seeds if tiny.finished(out / f"{arm}_seed{s}")] for arm in arms}
    return {arm: dirs for arm, dirs in runs.items() if dirs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="countdown")
    parser.add_argument("--stage", choices=("search", "final", "all"), default="all")
    parser.add_argument("--setting", default=None, help="final stage: ARM:ANSWER instead of the search's choice")
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help=f"arms {', '.join(QUICK_ARMS)}, 2 final seeds")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one core each)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs, run nothing")
    parser.add_argument("--pool", type=int, default=None, help="GRPO prompt pool (data.limit) of every arm; another "
                        "pool than the config's goes to runs/study/<task>_pool<N> and its own block of the page")
    parser.add_argument("--model", choices=MODELS, default="tiny", help="tiny: rloop/tiny-llama (0.8M); small: "
                        "rloop/small-llama-32k (36M), configs/study/<task>_small.yaml, runs/study/<task>_small")
    parser.add_argument("--plains", choices=("all", "matched"), default="all", help="final stage: plain GRPO in the "
                        "chosen arm's phases and the search's (all), or only in the chosen arm's phases (matched)")
    parser.add_argument("--flags", default="", help="extra `rloop fit` flags for every run (e.g. a quick setting)")
    args = parser.parse_args(argv)
    config = config_of(args.task, args.model)
    if not (ROOT / config).exists():
        raise SystemExit(f"--model {args.model} has no study config for {args.task} ({config})")
    check_search_config(config)  # before anything runs
    config_pool = grpo_overrides(config)[1]["data.init_args.limit"]
    pool = args.pool or config_pool
    arms = {a: arm_flags(a, args.pool, config) for a in SEARCH_ARMS if not args.quick or a in QUICK_ARMS}
    seeds = args.seeds[:2] if args.quick else args.seeds
    extra = args.flags.split()
    name = args.task + MODELS[args.model] + ("" if pool == config_pool else f"_pool{pool}")
    out = args.out / name
    search_lines: list[str] = []
    final_lines: list[str] = []
    search_out = out / "search"
    if args.stage in ("search", "all") and not args.report_only:
        run_all([(config, search_out / f"{a}_seed{s}", s, f, extra) for s in args.search_seeds for a, f in arms.items()],
                args.jobs)
    searched = finished_runs(search_out, arms, args.search_seeds)
    if PLAIN in searched and len(searched) > 1:
        search_lines, (arm, answer, _) = search_section(args.task, searched, pool, args.model)
    elif args.setting is None:
        raise SystemExit(f"no finished search runs under {search_out} (plain GRPO and an RLoop arm); run the search")
    if args.setting:
        arm, answer = args.setting.split(":")
    if args.stage in ("final", "all"):
        final_out = out / "final"
        plains = plains_for(arm)[-1:] if args.plains == "matched" else plains_for(arm)
        if not args.report_only:
            run_all([(config, final_out / f"{a}_seed{s}", s, arm_flags(a, args.pool, config), extra)
                     for s in seeds for a in (*plains, arm)], args.jobs)
        runs = finished_runs(final_out, (*plains, arm), seeds)
        if arm in runs and set(plains) & set(runs):
            from rloop_lightning.loop.curves import load_curve, validation_split

            split = validation_split(load_curve(runs[arm][0]))
            figures = args.doc.parent / "results"
            figures.mkdir(parents=True, exist_ok=True)
            named = {plain_label(name) if name in plains else name: dirs for name, dirs in runs.items()}
            if tiny.plot_held_out_curves(named, split,
                                         figures / f"study_{name}_curves.png", ("avg@n", "pass@32")):
                final_lines += [f"![validation avg@n and pass@32 over RL steps, {split}]"
                                f"(results/study_{name}_curves.png)", ""]
            with ThreadPoolExecutor(args.jobs) as executor:
                dirs = [d for ds in runs.values() for d in ds]
                evals = dict(zip(dirs, executor.map(lambda d: evaluate_answers(args.task, d, seed_of(d), args.model), dirs)))
            flags = (f" --setting {args.setting}" if args.setting else "") + \
                (" --plains matched" if args.plains == "matched" else "")
            final_lines += final_section(args.task, arm, answer, runs, evals, pool, args.model, flags)
    lines = final_lines + search_lines  # the final comparison first, then how its setting was chosen
    tiny.write_results(args.doc, name, "\n".join(lines), marker="study")


if __name__ == "__main__":
    main()
