"""The ``rloop`` command line, on LightningCLI and jsonargparse.

    rloop fit  --config configs/tiny_cpu.yaml                    # the RLoop loop (the main job)
    rloop report RUN_DIR [--baseline OTHER_RUN_DIR]              # markdown + plots of a run
    rloop rft  fit --config configs/base/tiny_countdown.yaml     # RFT / SFT phase
    rloop grpo fit --config configs/grpo/tiny_countdown.yaml     # GRPO / DAPO exploration phase
    rloop eval --config configs/eval/tiny_countdown.yaml         # avg@n, pass@k, greedy accuracy

Every command accepts ``--config`` (repeatable, later files override), dotted overrides
(``--trainer.max_steps 10``) and ``--print_config``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from jsonargparse import CLI
from lightning.pytorch.cli import ArgsType, LightningCLI

from rloop_lightning.evaluation import Evaluator
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.policy import Policy
from rloop_lightning.rft import RFTModule
from rloop_lightning.rollout.base import RolloutEngine
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.strategies import check_strategy


class PhaseCLI(LightningCLI):
    """LightningCLI that refuses strategies this machine cannot run before anything is built."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is not None:
            check_strategy(trainer.get("accelerator", "auto"), _class_path_or_value(trainer.get("strategy", "auto")))
            if self.model_class is GRPOModule and "fsdp" in str(_class_path_or_value(trainer.get("strategy"))).lower():
                raise NotImplementedError(
                    "GRPO under FSDPStrategy (FSDP1) is not supported: its manual backward runs inside FSDP1's root "
                    "forward, after which full weights cannot be gathered (vLLM sync, export). Use FSDP2 instead: "
                    "--config configs/strategies/fsdp2.yaml (ModelParallelStrategy), or DDP with LoRA/QLoRA.")


def _class_path_or_value(value):
    return getattr(value, "class_path", value) if value is not None else "auto"


def lightning_cli(module_class: type[L.LightningModule], args: ArgsType, run: bool = True) -> LightningCLI:
    # ``rloop`` strips its own sub-command and passes the rest as ``args``; that is intended
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return PhaseCLI(
        module_class, L.LightningDataModule, subclass_mode_data=True, args=args, run=run,
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
    )


def rft(args: ArgsType = None) -> LightningCLI:
    """``rloop rft {fit,validate,...}``: fine-tune on (prompt, completion) records."""
    return lightning_cli(RFTModule, args)


def grpo(args: ArgsType = None) -> LightningCLI:
    """``rloop grpo {fit,...}``: plain GRPO/DAPO from a policy on a task's prompts."""
    return lightning_cli(GRPOModule, args)


def evaluate(policy: Policy, evaluators: list[Evaluator], engine: Optional[RolloutEngine] = None,
             output: Optional[str] = None, seed: int = 0) -> dict:
    """Evaluate a policy on task splits; print and optionally write the metrics as JSON.

    Args:
        policy: the policy to evaluate (hub id, local directory or built-in id).
        evaluators: one evaluator per (task, split).
        engine: rollout engine (default: Hugging Face ``generate``).
        output: optional path of a JSON file for the metrics.
        seed: seeds the sampling, so two policies evaluated with one seed see the same noise.
    """
    torch.manual_seed(seed)
    policy.load_model()
    engine = engine or HFGenerateEngine()
    report = {}
    for evaluator in evaluators:
        result = evaluator.evaluate(policy, engine)
        evaluator.close()
        report[f"{result.task}/{result.split}"] = result.metrics
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    return report


def eval_command(args: ArgsType = None) -> dict:
    return CLI(evaluate, args=args, as_positional=False)


def fit_parser():
    """The ``rloop fit`` parser: every ``RLoop`` argument, YAML configs and dotted overrides."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from rloop_lightning.loop import RLoop

    parser = ArgumentParser(prog="rloop fit", description=RLoop.__doc__.strip().splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (repeatable; later wins)")
    parser.add_class_arguments(RLoop, None, fail_untyped=True)
    return parser


def fit_command(args: ArgsType = None) -> dict:
    """``rloop fit``: run RLoop (or, with ``--vanilla true``, the plain-RL baseline)."""
    from rloop_lightning.loop import RLoop

    parser = fit_parser()
    config = parser.parse_args(args)
    snapshot = json.loads(parser.dump(config, format="json", skip_none=False))  # what resume compares
    for runtime_only in ("config", "__path__", "resume"):
        snapshot.pop(runtime_only, None)
    phase_files = [snapshot["base"].get("build_config"), snapshot["grpo"]["config"], snapshot["rft"]["config"]]
    snapshot["phase_file_sha256"] = {
        path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in phase_files if path}
    init = parser.instantiate_classes(config).as_dict()
    init.pop("config", None)
    init.pop("__path__", None)
    return RLoop(**init).run(snapshot)


def report_command(args: ArgsType = None):
    """``rloop report RUN_DIR [--baseline OTHER]``: write report.md and report.png into RUN_DIR."""
    from rloop_lightning.loop.report import write_report

    def report(run_dir: str, baseline: Optional[str] = None) -> str:
        """Write the report of run_dir, comparing with the baseline run if given.

        Args:
            run_dir: an RLoop run directory.
            baseline: another run directory (e.g. the vanilla-RL baseline) to plot alongside.
        """
        path = write_report(run_dir, baseline)
        print(path)
        return str(path)

    return CLI(report, args=args)


COMMANDS: dict[str, Callable] = {"fit": fit_command, "report": report_command, "rft": rft, "grpo": grpo,
                                 "eval": eval_command}


def configure_logging() -> None:
    logger = logging.getLogger("rloop_lightning")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[rloop %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def cli_main(args: ArgsType = None):
    configure_logging()
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: rloop {{{names}}} ...\n\n{__doc__}")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"rloop: unknown command {argv[0]!r}; choose from {names}")
        return None
    COMMANDS[argv[0]](argv[1:])  # nothing returned: console scripts print a non-int return value
