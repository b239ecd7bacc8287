"""The run directory's manifest: which phases are complete, and with which configuration.

A phase is marked complete only after all its outputs are in place, so after a crash the loop
redoes at most the phase that was running. Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rloop_lightning.records import write_json_atomic


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted fields whose values differ between two configs, as readable lines.

    A field absent on one side and null on the other is no difference: a field added to the code
    later, with a null (off) default, does not change what an older run directory did.
    """
    old_flat, new_flat = flatten(old), flatten(new)
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key), new_flat.get(key)
        if before != after:
            lines.append(f"{key}: {old_flat.get(key, '<absent>')!r} -> {new_flat.get(key, '<absent>')!r}")
    return lines


class Manifest:
    """A run's ``manifest.json`` (``RunLayout.manifest``): the config the run was started with and its
    completed phases."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict = read_json(self.path) if self.path.exists() else {"config": None, "completed": {}}

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def check_config(self, config: dict) -> None:
        """Refuse to continue a run started with a different configuration."""
        if self.data["config"] is None:
            self.data["config"] = config
            self.save()
            return
        differences = config_differences(self.data["config"], config)
        if differences:
            raise ValueError(
                f"{self.path.parent} was created by a different configuration; refusing to resume. "
                "Differing fields:\n  " + "\n  ".join(differences)
                + "\nUse another run_dir, or restore the original configuration."
            )

    def done(self, phase: str) -> bool:
        return phase in self.data["completed"]

    def mark_done(self, phase: str, info: dict) -> None:
        self.data["completed"][phase] = info
        self.save()

    def info(self, phase: str) -> dict:
        return self.data["completed"][phase]

    def save(self) -> None:
        write_json_atomic(self.path, self.data)
