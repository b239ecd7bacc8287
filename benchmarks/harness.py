"""What every benchmark shares: clocks, interleaved repeats, the result table, the environment line.

A benchmark module builds a list of ``Row`` (ours against a reference, wall-clock and CPU time) and
prints ``report(rows, ...)``: one environment line, one markdown table, optional detail lines.
Run benchmarks from the repository root as modules, e.g. ``python -m benchmarks.grpo_step --quick``
(see benchmarks/README.md); nothing here runs at import time or imports torch at module level.

CPU time is measured next to wall-clock time because the machines these run on are often shared:
time spent descheduled inflates wall-clock time but not the process's CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "rloop/tiny-llama"


@dataclass
class Row:
    """One line of the result table: wall-clock and CPU-time values of ours and of the reference."""

    measurement: str
    setting: str
    ours: float
    reference: float
    ours_cpu: float
    reference_cpu: float
    target: str
    unit_format: str = "{:.0f}"


@dataclass
class Timing:
    """One timed call: wall-clock and CPU seconds, and what the call returned (e.g. tokens made)."""

    wall: float
    cpu: float
    value: Any = None


# --------------------------------------------------------------------------- clocks


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds; CPU time is this process's, so time spent descheduled does not count."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds elapsed since ``start = clock()``."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(obj: Any, name: str, seconds: list[float]) -> None:
    """Wrap ``obj.name`` (a bound method) so each call appends its wall-clock seconds to ``seconds``."""
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(obj, name, wrapper)


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Timing]]:
    """Call every run ``repeats`` times, taking turns so that load drifts hit all of them alike.

    One extra untimed round comes first (warm-up); the order reverses every round. Returns, per
    run name, the ``repeats`` timings with what each call returned.
    """
    timings: dict[str, list[Timing]] = {name: [] for name in runs}
    order = list(runs.items())
    for repeat in range(repeats + 1):
        for name, run in order if repeat % 2 else order[::-1]:
            start = clock()
            value = run()
            wall, cpu = since(start)
            if repeat:
                timings[name].append(Timing(wall, cpu, value))
    return timings


def median_seconds(timings: list[Timing]) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``timings``."""
    return median_or_nan([t.wall for t in timings]), median_or_nan([t.cpu for t in timings])


def median_rates(timings: list[Timing]) -> tuple[float, float]:
    """Median (wall, CPU) rate of ``timings`` whose value is an amount of work (e.g. tokens)."""
    return (median_or_nan([t.value / t.wall for t in timings]), median_or_nan([t.value / t.cpu for t in timings]))


# --------------------------------------------------------------------------- memory


def current_rss_mib() -> float:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(module: str, arguments: list[str]) -> dict:
    """Run ``python -m module *arguments`` from the repository root and parse the last stdout line
    as JSON: a measurement that needs a fresh process (peak memory is per process)."""
    command = [sys.executable, "-m", module, *arguments]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- output


def log(message: str) -> None:
    """Progress goes to stderr so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def format_table(rows: list[Row]) -> str:
    """The ours-vs-reference markdown table, with wall-clock and CPU-time ratios."""
    lines = ["| measurement | setting | ours | reference | ratio ours/ref (wall) | ratio (CPU time) | target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        cells = [row.unit_format.format(value) if math.isfinite(value) else "n/a" for value in (row.ours, row.reference)]
        ratios = [f"{a / b:.2f}" if math.isfinite(a) and math.isfinite(b) and b else "n/a"
                  for a, b in ((row.ours, row.reference), (row.ours_cpu, row.reference_cpu))]
        lines.append(f"| {row.measurement} | {row.setting} | {cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} "
                     f"| {row.target} |")
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain markdown table, for benchmarks whose rows are not ours-vs-reference pairs."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> str:
    """Library versions, CPU count, torch threads and load average, as one line."""
    import lightning
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, "
            f"lightning {lightning.__version__}; {os.cpu_count()} CPUs, {gpu}, torch threads "
            f"{torch.get_num_threads()}, load average {load}")


def report(table: str, started: float, details: list[str] = ()) -> str:
    """Environment line with the total time, the table, then ``details`` as a bullet list."""
    lines = [f"{environment()}; total {time.perf_counter() - started:.0f} s", "", table]
    if details:
        lines += ["", *(f"- {line}" for line in details)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- set-up


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the module docstring as help and the flags every benchmark has:
    ``--quick`` (smallest settings, a smoke run) and ``--threads``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smallest settings: a smoke run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine a descheduled "
                             "OpenMP thread stalls every parallel region)")
    return parser


def fill_defaults(args: argparse.Namespace, quick: dict, full: dict) -> argparse.Namespace:
    """Set every option left at None from ``quick`` or ``full``, as ``args.quick`` says."""
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def setup(threads: int) -> float:
    """Set torch threads, silence library logging and warnings; returns the start time for ``report``."""
    import logging
    import warnings

    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    for name in ("lightning", "lightning.pytorch", "rloop_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    return time.perf_counter()


def tiny_model_dir(name: str = TINY_MODEL) -> str:
    """The embedded tiny model saved to the cache directory (built once), as a model directory."""
    from rloop_lightning import tiny

    return str(tiny.materialize(name))
