"""The ``rloop`` command line, on LightningCLI and jsonargparse.

    rloop fit  --config configs/tiny_cpu.yaml                    # the RLoop loop (the main job)
    rloop report RUN_DIR [--baseline OTHER_RUN_DIR]              # markdown + plots of a run
    rloop rft  fit --config configs/base/tiny_countdown.yaml     # RFT / SFT phase
    rloop grpo fit --config configs/grpo/tiny_countdown.yaml     # GRPO / DAPO exploration phase
    rloop eval --config configs/eval/tiny_countdown.yaml         # avg@n, pass@k, greedy accuracy

Every command accepts ``--config`` (repeatable, later files override), dotted overrides
(``--trainer.max_steps 10``) and ``--print_config``; options are spelled in full (no abbreviations).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

from jsonargparse import CLI, ActionConfigFile, ArgumentParser, set_parsing_settings
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rloop_lightning.evaluation import Evaluator, evaluate_policy
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.loop import RLoop
from rloop_lightning.loop.phases import phase_cli
from rloop_lightning.loop.report import write_report
from rloop_lightning.policy import Policy
from rloop_lightning.rft import RFTModule
from rloop_lightning.rollout.base import RolloutEngine


def rft(args: ArgsType = None) -> LightningCLI:
    """``rloop rft {fit,validate,...}``: fine-tune on (prompt, completion) records."""
    return phase_cli(RFTModule, args, prog="rloop rft")


def grpo(args: ArgsType = None) -> LightningCLI:
    """``rloop grpo {fit,...}``: plain GRPO/DAPO from a policy on a task's prompts."""
    return phase_cli(GRPOModule, args, prog="rloop grpo")


def evaluate(policy: Policy, evaluators: list[Evaluator], engine: Optional[RolloutEngine] = None,
             output: Optional[str] = None, seed: int = 0) -> dict:
    """Evaluate a policy on task splits; print and optionally write the metrics as JSON.

    The same evaluation as the loop's (``evaluate_policy``): with the loop's ``seed`` it reports the
    numbers the loop wrote for that policy.

    Args:
        policy: the policy to evaluate (hub id, local directory or built-in id).
        evaluators: one evaluator per (task, split).
        engine: rollout engine (default: Hugging Face ``generate``).
        output: optional path of a JSON file for the metrics.
        seed: seeds the sampling before each evaluator, so two policies evaluated with one seed see the
            same noise.
    """
    if output:
        check_writable(Path(output))
    report = evaluate_policy(policy, evaluators, engine, seed=seed)
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    return report


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory, or one under a
    directory (or its nearest existing parent) this process cannot write to."""
    if path.is_dir():
        raise IsADirectoryError(f"--output {str(path)!r} is a directory; give a file path")
    existing = next(parent for parent in [path, *path.parents] if parent.exists())
    if existing != path and not existing.is_dir():
        raise NotADirectoryError(f"--output {str(path)!r}: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"--output {str(path)!r} cannot be written ({str(existing)!r} is not writable)")


def eval_command(args: ArgsType = None) -> dict:
    return CLI(evaluate, args=args, as_positional=False, prog="rloop eval", allow_abbrev=False)


def fit_parser():
    """The ``rloop fit`` parser: every ``RLoop`` argument, YAML configs and dotted overrides."""
    parser = ArgumentParser(prog="rloop fit", description=RLoop.__doc__.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (repeatable; later wins)")
    parser.add_class_arguments(RLoop, None, fail_untyped=True)
    return parser


def fit_command(args: ArgsType = None) -> dict:
    """``rloop fit``: run RLoop (or, with ``--vanilla true``, the plain-RL baseline)."""
    parser = fit_parser()
    config = parser.parse_args(args)
    snapshot = json.loads(parser.dump(config, format="json", skip_none=False))  # what resume compares
    for runtime_only in ("config", "__path__", "resume"):
        snapshot.pop(runtime_only, None)
    phase_files = [snapshot["base"].get("build_config")] + [
        path for phase in ("grpo", "rft") for path in [snapshot[phase]["config"], *snapshot[phase].get("extra_configs", [])]]
    snapshot["phase_file_sha256"] = {
        path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in phase_files if path}
    init = parser.instantiate_classes(config).as_dict()
    init.pop("config", None)
    init.pop("__path__", None)
    return RLoop(**init).run(snapshot)


def report_command(args: ArgsType = None):
    """``rloop report RUN_DIR [--baseline OTHER]``: write report.md and report.png into RUN_DIR."""
    def report(run_dir: str, baseline: Optional[str] = None) -> str:
        """Write the report of run_dir, comparing with the baseline run if given.

        Args:
            run_dir: an RLoop run directory.
            baseline: another run directory (e.g. the vanilla-RL baseline) to plot alongside.
        """
        path = write_report(run_dir, baseline)
        print(path)
        return str(path)

    return CLI(report, args=args, prog="rloop report", allow_abbrev=False)


COMMANDS: dict[str, Callable] = {"fit": fit_command, "report": report_command, "rft": rft, "grpo": grpo,
                                 "eval": eval_command}


def configure_logging() -> None:
    logger = logging.getLogger("rloop_lightning")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[rloop %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def configure_parsing() -> None:
    """``--help`` shows each settings field's docstring (the string under the field, as litgpt does)."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)


def cli_main(args: ArgsType = None):
    configure_logging()
    configure_parsing()
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: rloop {{{names}}} ...\n\n{__doc__}")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"rloop: unknown command {argv[0]!r}; choose from {names}")
        return None
    try:
        COMMANDS[argv[0]](argv[1:])  # nothing returned: console scripts print a non-int return value
    except SIGTERMException:  # Lightning's SIGTERM stop (a fit without PhaseCheckpoint) carries no exit code
        raise SystemExit(128 + signal.SIGTERM) from None
