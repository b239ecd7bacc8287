"""The loop's phases: a fresh Lightning Trainer, module and data module per phase, built from a YAML.

A phase is the file that drives ``rloop grpo fit`` / ``rloop rft fit`` (``PhaseSettings.config``),
its dotted ``overrides``, then the loop's own overrides on top (policy path, run directory, seed):

    build_phase(GRPOModule, settings, {"model.policy.model_name_or_path": theta})   # ready to fit
    parse_phase(GRPOModule, settings, overrides)                                     # validated, nothing built
    phase_policy(settings, theta)                                                    # the phase's policy, unloaded

``PhaseCLI`` is the LightningCLI of both the ``rloop grpo`` / ``rloop rft`` commands and the loop's
phases; it refuses strategies this machine cannot run before anything is built.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import lightning as L
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from lightning.pytorch.cli import ArgsType, LightningCLI

from rloop_lightning.grpo import GRPOModule
from rloop_lightning.policy import Policy
from rloop_lightning.strategies import check_devices, check_strategy, check_trainer_values


# Plain data: a class_path dict (``trainer.strategy: {class_path: ...}``) stays a dict, handed to the
# phase's own parser as written; typed ``Any`` it would be parsed (and instantiated) by the loop's parser.
OverrideValue = Union[bool, int, float, str, list, dict, None]


@dataclass
class PhaseSettings:
    """A phase's YAML (as for ``rloop grpo fit`` / ``rloop rft fit``) and dotted overrides on top."""

    config: str
    """Path of the phase's YAML."""
    overrides: dict[str, OverrideValue] = field(default_factory=dict)
    """Dotted keys of that YAML and their values, e.g. ``{"trainer.max_steps": 40}``."""
    extra_configs: list[str] = field(default_factory=list)
    """YAML fragments applied after ``config`` and before ``overrides`` (e.g. ``configs/engines/vllm_cpu.yaml``).
    A loop file setting only this field adds them without restating the phase's config and overrides."""


class PhaseCLI(LightningCLI):
    """LightningCLI that refuses strategies this machine cannot run before anything is built.

    ``instantiate=False`` parses and validates the configuration (``self.config``) and builds nothing.
    """

    def __init__(self, *args, instantiate: bool = True, **kwargs):
        self.instantiate = instantiate
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is not None:
            strategy = class_path_or_value(trainer.get("strategy", "auto"))
            check_strategy(trainer.get("accelerator", "auto"), strategy)
            check_devices(trainer.get("accelerator", "auto"), trainer.get("devices"), trainer.get("num_nodes"), strategy)
            check_trainer_values(trainer)
            if self.model_class is GRPOModule and "fsdp" in str(strategy).lower():
                raise NotImplementedError(
                    "GRPO under FSDPStrategy (FSDP1) is not supported: its manual backward runs inside FSDP1's root "
                    "forward, after which full weights cannot be gathered (vLLM sync, export). Use FSDP2 instead: "
                    "--config configs/strategies/fsdp2.yaml (ModelParallelStrategy), or DDP with LoRA/QLoRA.")

    def _set_seed(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        seed = config.get("seed_everything")
        if not isinstance(seed, bool) and isinstance(seed, int):
            check_seed(seed, "seed_everything")
        super()._set_seed()

    def instantiate_classes(self) -> None:
        if self.instantiate:
            super().instantiate_classes()

    def after_instantiate_classes(self) -> None:
        if self.instantiate:
            super().after_instantiate_classes()


MAX_SEED = 2**32 - 1  # NumPy's seeds are unsigned 32-bit integers (Lightning's seed_everything seeds NumPy)


def check_seed(seed: int, name: str, largest_offset: int = 0) -> None:
    """Refuse a seed NumPy cannot take, naming the setting: ``seed`` through ``seed + largest_offset`` (the
    seeds derived from it) must lie in [0, 2**32 - 1]."""
    if not 0 <= seed <= MAX_SEED - largest_offset:
        derived = f" (the phases are seeded up to {name} + {largest_offset})" if largest_offset else ""
        raise ValueError(f"{name} must be in [0, {MAX_SEED - largest_offset}]{derived}, as NumPy takes seeds in "
                         f"[0, 2**32 - 1]; got {seed}")


def class_path_or_value(value):
    return getattr(value, "class_path", value) if value is not None else "auto"


def phase_cli(module_class: type[L.LightningModule], args: ArgsType, run: bool = True,
              instantiate: bool = True, prog: Optional[str] = None, exit_on_error: bool = True) -> PhaseCLI:
    """The LightningCLI of a phase; ``run=False`` builds it without running a sub-command. ``prog`` is the
    command in usage and help tips (``rloop grpo``); options are never abbreviated (``--trainer.max_step``
    is an error, not ``--trainer.max_steps``); with ``exit_on_error=False`` a bad argument raises
    ``ArgumentError`` instead of printing the usage and exiting."""
    # ``rloop`` strips its own sub-command and passes the rest as ``args``; that is intended
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    parser_kwargs: dict[str, Any] = {"allow_abbrev": False, "exit_on_error": exit_on_error}
    if run:
        parser_kwargs.update({subcommand: {"allow_abbrev": False} for subcommand in LightningCLI.subcommands()})
    if prog:
        parser_kwargs["prog"] = prog
    return PhaseCLI(
        module_class, L.LightningDataModule, subclass_mode_data=True, args=args, run=run,
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, instantiate=instantiate,
        parser_kwargs=parser_kwargs,
    )


def override_keys(prefix: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``{"devices": 2}`` under ``trainer`` -> ``{"trainer.devices": 2}``."""
    return {f"{prefix}.{key}": value for key, value in settings.items()}


def override_args(overrides: dict[str, Any]) -> list[str]:
    """``--key=value`` arguments; values that are not strings as JSON, non-ASCII characters as they are (an
    escaped character outside the BMP, a surrogate pair, is not read back by the parser)."""
    return [f"--{key}={value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
            for key, value in overrides.items()]


def phase_args(settings: PhaseSettings, overrides: dict[str, Any]) -> list[str]:
    configs = [arg for path in [settings.config, *settings.extra_configs] for arg in ("--config", path)]
    return [*configs, *override_args(settings.overrides), *override_args(overrides)]


def build_phase(module_class: type[L.LightningModule], settings: PhaseSettings,
                overrides: dict[str, Any]) -> PhaseCLI:
    """Trainer, module and data module of one phase (not run): its YAML, its overrides, then ``overrides``."""
    return phase_cli(module_class, phase_args(settings, overrides), run=False)


def parse_phase(module_class: type[L.LightningModule], settings: PhaseSettings,
                overrides: dict[str, Any]) -> Namespace:
    """A phase's validated configuration, nothing instantiated: a typo or a bad value fails here, with a
    ``ValueError`` naming the phase's YAML."""
    try:
        return phase_cli(module_class, phase_args(settings, overrides), run=False, instantiate=False,
                         exit_on_error=False).config
    except (ArgumentError, ValueError) as error:  # ValueError: PhaseCLI's own checks (strategy, devices, steps)
        raise ValueError(f"phase config {settings.config} (with its overrides {settings.overrides} and the "
                         f"loop's): {error}") from None


def phase_policy(settings: PhaseSettings, model_name_or_path: str) -> Policy:
    """The GRPO phase's policy reading ``model_name_or_path``, unloaded: held-out evaluation loads theta_k
    with the settings it is trained with (dtype, quantisation, chat template)."""
    config = parse_phase(GRPOModule, settings, {"model.policy.model_name_or_path": model_name_or_path})
    parser = ArgumentParser()
    parser.add_argument("--policy", type=Policy)
    return parser.instantiate_classes(Namespace(policy=config.model.policy)).policy
