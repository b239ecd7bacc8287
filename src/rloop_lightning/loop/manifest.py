"""The run directory's manifest: which phases are complete, and with which configuration.

A phase is marked complete only after all its outputs are in place, so after a crash the loop
redoes at most the phase that was running. Writes are atomic (temporary file + rename).

Resume continues a run directory only under the configuration that computed its finished phases.
A few keys change nothing those phases computed and may change on resume (``MAY_CHANGE_ON_RESUME``):
where the run directory is (a copied or moved one resumes), where and how the run is logged, how
many processes verify held-out answers, how often phases checkpoint, how long ranks wait for each
other, the number of iterations (not below an iteration that has a finished phase), and which policy
the loop hands over (``output``). Every other key is refused: the phase YAMLs' contents and paths, the
overrides, ``seed``, ``base``, ``expert_set``, ``evaluators`` (but their ``reward_workers``),
``eval_engine`` (another engine samples other completions under one seed), ``trainer``, ``vanilla``,
``rft_from``, ``evaluate_rl_end``, ``curve_every_n_steps``. The manifest then records the configuration in use.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from rloop_lightning.loop.layout import RunLayout
from rloop_lightning.records import write_json_atomic

_LOGGING = ("logger", "logger.*", "enable_progress_bar", "enable_model_summary")
MAY_CHANGE_ON_RESUME: dict[str, str] = {
    "run_dir": "where the run directory is: a copied or moved run directory resumes",
    "wandb_project": "where the loop logs its held-out metrics",
    "evaluators.*.init_args.reward_workers": "processes that verify held-out answers (the scores do not depend on them)",
    "iterations": "how many iterations to run, not below an iteration that has a finished phase",
    "distributed_timeout": "how long a rank waits for the others (several processes)",
    "output": "which policy the loop hands over (final.json): chosen from finished phases, none depends on it",
    **{key: "how often phases save a mid-phase checkpoint, and whether the last is kept (a resumed phase "
            "computes what an uninterrupted one does)"
       for key in ("checkpoint_every_n_steps", "checkpoint_every_seconds", "keep_checkpoints")},
    **{f"{where}trainer.{key}": "logging and console output of the phases"
       for where in ("", "grpo.overrides.", "rft.overrides.") for key in _LOGGING},
}
"""Dotted keys (``*`` matches any part) that may differ from the manifest's configuration on resume, and why."""


class ManifestError(ValueError):
    """``manifest.json`` cannot be read; the message names it and says what to do."""


def dotted_items(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; a list of dicts by index (``evaluators.0.split``), other
    lists are leaves."""
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        data = {str(index): item for index, item in enumerate(data)}
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(dotted_items(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted fields whose values differ between two configs, as readable lines; fields matching a
    pattern of ``ignore`` are left out.

    A field absent on one side and null on the other is no difference: a field added to the code
    later, with a null (off) default, does not change what an older run directory did.
    """
    old_flat, new_flat = dotted_items(old), dotted_items(new)
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if any(fnmatchcase(key, pattern) for pattern in ignore):
            continue
        before, after = old_flat.get(key), new_flat.get(key)
        if before != after:
            lines.append(f"{key}: {old_flat.get(key, '<absent>')!r} -> {new_flat.get(key, '<absent>')!r}")
    return lines


def read_manifest(path: Path) -> dict:
    """The manifest at ``path``; ``ManifestError`` naming it when it is not a manifest."""
    try:
        data = json.loads(path.read_bytes())
        problem = None if isinstance(data, dict) and isinstance(data.get("completed"), dict) and "config" in data \
            else "not a manifest: no 'config' and 'completed'"
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        problem = f"not valid JSON: {error}"
    if problem:
        raise ManifestError(
            f"{path} is corrupt ({problem}). It holds this run's configuration and finished phases, and the loop "
            "writes it atomically, so something else cut or changed it (an interrupted copy, a full disk, an "
            f"editor). Restore it from where the run directory was copied from, or move {path.parent} aside "
            "and start the run again.")
    return data


class Manifest:
    """A run's ``manifest.json`` (``RunLayout.manifest``): the config the run was started with and its
    completed phases."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict = read_manifest(self.path) if self.path.exists() else {"config": None, "completed": {}}

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def check_config(self, config: dict) -> None:
        """Refuse to continue a run started with a configuration that differs in a key that is not in
        ``MAY_CHANGE_ON_RESUME``; record ``config`` otherwise."""
        stored = self.data["config"]
        if stored is not None:
            differences = config_differences(stored, config, ignore=tuple(MAY_CHANGE_ON_RESUME))
            if differences:
                raise ValueError(
                    f"{self.path.parent} was created by a different configuration; refusing to resume. "
                    "Differing fields:\n  " + "\n  ".join(differences)
                    + "\nUse another run_dir, or restore the original configuration (the keys that may change on "
                    "resume: docs/rloop.md, Resume).")
            self.check_iterations(config.get("iterations"))
        if config != stored:
            self.data["config"] = config
            self.save()

    def check_iterations(self, iterations) -> None:
        started = [k for k in map(RunLayout.iteration_of, self.data["completed"]) if k is not None]
        if iterations is not None and started and iterations <= max(started):
            raise ValueError(
                f"{self.path.parent} has finished phases of iteration {max(started)}; iterations: "
                f"{self.data['config'].get('iterations')} -> {iterations} would leave them out of the run. "
                f"Resume with iterations >= {max(started) + 1}, or use another run_dir.")

    def done(self, phase: str) -> bool:
        return phase in self.data["completed"]

    def mark_done(self, phase: str, info: dict) -> None:
        self.data["completed"][phase] = info
        self.save()

    def info(self, phase: str) -> dict:
        return self.data["completed"][phase]

    def reload(self) -> None:
        """Re-read the file: on ranks > 0, after the main process marked a phase done."""
        if self.path.exists():
            self.data = read_manifest(self.path)

    def save(self) -> None:
        write_json_atomic(self.path, self.data)
