"""The ``rloop`` command line, on LightningCLI and jsonargparse.

    rloop rft  fit --config configs/base/tiny_countdown.yaml     # RFT / SFT phase
    rloop grpo fit --config configs/grpo/tiny_countdown.yaml     # GRPO / DAPO exploration phase
    rloop eval --config configs/eval/tiny_countdown.yaml         # avg@n, pass@k, greedy accuracy

Every command accepts ``--config`` (repeatable, later files override), dotted overrides
(``--trainer.max_steps 10``) and ``--print_config``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import lightning as L
from jsonargparse import CLI
from lightning.pytorch.cli import ArgsType, LightningCLI

from rloop_lightning.evaluation import Evaluator
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.policy import Policy
from rloop_lightning.rollout.base import RolloutEngine
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.rft import RFTModule


def lightning_cli(module_class: type[L.LightningModule], args: ArgsType, run: bool = True) -> LightningCLI:
    # ``rloop`` strips its own sub-command and passes the rest as ``args``; that is intended
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return LightningCLI(
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
             output: Optional[str] = None) -> dict:
    """Evaluate a policy on task splits; print and optionally write the metrics as JSON.

    Args:
        policy: the policy to evaluate (hub id, local directory or built-in id).
        evaluators: one evaluator per (task, split).
        engine: rollout engine (default: Hugging Face ``generate``).
        output: optional path of a JSON file for the metrics.
    """
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


COMMANDS: dict[str, Callable] = {"rft": rft, "grpo": grpo, "eval": eval_command}


def cli_main(args: ArgsType = None):
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: rloop {{{names}}} ...\n\n{__doc__}")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"rloop: unknown command {argv[0]!r}; choose from {names}")
        return None
    return COMMANDS[argv[0]](argv[1:])
