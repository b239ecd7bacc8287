"""What resume trusts: a finished phase's outputs, checked against the sha256 digests the manifest recorded.

When a phase finishes, the manifest records the sha256 of every file of it that later phases read
(``RunLayout.read_later``): a training phase's ``policy/`` (and a GRPO phase's harvest, ``experts/``), an
expert set's files, ``eval.json``. Logs are not digested and may change or go: ``metrics.jsonl``,
``config.yaml``, ``lightning_logs/``, a logger's files, and mid-phase checkpoints. On resume, before
anything runs, every finished phase is checked, and a file that is missing or changed is

- **redone** when the phase is cheap and deterministic and what it was made from is intact: an expert
  set (rebuilt from its GRPO phase's harvest, which must then give the recorded digests again) and
  held-out evaluations (nothing is computed from them);
- **refused** otherwise, with an error naming the file: GRPO and RFT policies feed every later phase, and
  training is not bit-reproducible on a GPU, so a retrained theta_k would silently differ from the one
  the later phases were computed from.

Phases recorded before digests existed are not checked; digests recorded of logs (by earlier versions)
are ignored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

DIGESTS = "outputs_sha256"
"""The key of a finished phase's digests in the manifest: ``{path relative to the phase directory: sha256}``."""
REDONE_KINDS = ("expert_set", "eval", "eval_rl_end", "theta_0")
"""Phases (the last part of their name) that are redone when an output is missing or changed."""
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_read_later(relative: str, read_later: Optional[tuple[str, ...]]) -> bool:
    """Whether the file at POSIX path ``relative`` in a phase's directory is read by later phases, given
    the phase's ``RunLayout.read_later`` (None: everything but ``checkpoints/``)."""
    parts = relative.split("/")
    return parts[0] in read_later if read_later is not None else "checkpoints" not in parts


def output_digests(directory: Path, read_later: Optional[tuple[str, ...]] = None) -> dict[str, str]:
    """sha256 of every file under ``directory`` that later phases read (``is_read_later``), by relative
    POSIX path."""
    directory = Path(directory)
    return {relative: file_sha256(path) for path in sorted(directory.rglob("*"))
            if path.is_file() and is_read_later(relative := path.relative_to(directory).as_posix(), read_later)}


def changed_outputs(directory: Path, recorded: dict[str, str], read_later: Optional[tuple[str, ...]] = None) -> list[str]:
    """Recorded files under ``directory`` that later phases read and that are missing or whose sha256
    differs, as readable lines."""
    problems = []
    for relative, expected in sorted(recorded.items()):
        if not is_read_later(relative, read_later):
            continue
        path = Path(directory) / relative
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif file_sha256(path) != expected:
            problems.append(f"{path} changed (sha256 {expected[:12]} when the phase finished)")
    return problems


def is_redone(phase: str) -> bool:
    return phase.rsplit("/", 1)[-1] in REDONE_KINDS


class ChangedOutputError(RuntimeError):
    """A finished phase's output that later phases were computed from is missing or changed."""
