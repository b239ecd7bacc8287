"""What theta_0 is, recorded in the manifest, so that resume refuses a base that changed under the run.

The configuration names theta_0 (``base.policy``), but a name is not a model: a base directory rebuilt
by ``base.build_config`` (a build cut short by ``trainer.max_time`` gives other weights), a local
directory overwritten, or a hub id whose ``main`` moved to a new commit all change iteration 0 and
the meaning of every LoRA adapter trained on top of it. So the first run records, under the manifest's
``base`` key:

- ``sha256``: for a local directory or a built-in model (``rloop/...``, materialised in the cache),
  the sha256 of every file in it (weights, config, tokenizer; hidden files such as a download's
  ``.cache/`` left out), by relative path;
- ``revision``: for a hub id, the commit the local Hugging Face cache resolves the phases' revision
  (``model.policy.revision``; default ``main``) to, from ``refs/<revision>`` in the cache, as
  ``transformers`` does offline. A hub base not yet downloaded is recorded once the held-out
  evaluation of theta_0 has loaded it;
- ``adapter_base``: for a LoRA adapter directory, the same record of the model it adapts.

On resume, before anything runs, the base is identified again and any difference is refused with an
error naming the base and what changed. A recorded hub commit that the cache no longer resolves (a run
directory copied to a machine without that cache) cannot be checked: it is logged, not refused.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

from rloop_lightning import tiny
from rloop_lightning.loop.verify import file_sha256

log = logging.getLogger(__name__)
BASE = "base"
"""The manifest's key of theta_0's identity."""
_COMMIT = re.compile(r"[0-9a-f]{40}")


class ChangedBaseError(RuntimeError):
    """theta_0 is not the model the run's finished phases were computed from; the message names it."""


def hub_cache() -> Path:
    """The Hugging Face hub cache ``transformers`` loads from (``HF_HUB_CACHE``, ``HF_HOME``/hub, ...)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_revision(repo_id: str, revision: Optional[str], cache: Path) -> Optional[str]:
    """The commit ``revision`` (a branch, tag or commit; None: ``main``) of the model ``repo_id`` resolves to
    in the hub cache at ``cache`` (``models--org--name/refs/<revision>``); None when it is not cached."""
    revision = revision or "main"
    if _COMMIT.fullmatch(revision):
        return revision
    ref = cache / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def directory_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` but hidden ones, by relative POSIX path."""
    directory = Path(directory)
    files = (path for path in sorted(directory.rglob("*")) if path.is_file())
    relative = {path.relative_to(directory).as_posix(): path for path in files}
    return {name: file_sha256(path) for name, path in relative.items()
            if not any(part.startswith(".") for part in name.split("/"))}


def base_identity(policy: str, revision: Optional[str] = None, cache: Optional[Path] = None) -> dict:
    """What ``policy`` (a local directory, built-in id or hub id) is now: ``{"policy", "sha256"}`` for a
    directory (``"adapter_base"`` added for a LoRA adapter), ``{"policy", "revision"}`` for a hub id."""
    directory = tiny.materialize(policy) if tiny.is_builtin(policy) else Path(policy)
    if not directory.is_dir():
        return {"policy": policy, "revision": hub_revision(policy, revision, cache or hub_cache())}
    identity: dict = {"policy": policy, "sha256": directory_digests(directory)}
    adapter = directory / "adapter_config.json"
    if adapter.is_file():
        adapted = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if adapted:
            identity["adapter_base"] = base_identity(adapted, revision, cache)
    return identity


def base_changes(recorded: dict, current: dict) -> list[str]:
    """How ``current`` differs from the ``recorded`` identity, as readable lines (empty: the same base, or
    nothing to compare). A hub commit the cache does not resolve now is no difference (it is unknown)."""
    name = recorded.get("policy")
    lines = []
    if "sha256" in recorded:
        before, after = recorded["sha256"], current.get("sha256", {})
        lines += [f"{name}: {path} {'is missing' if path not in after else 'changed'} (sha256 {before[path][:12]} "
                  "when the run started)" for path in sorted(before) if after.get(path) != before[path]]
        lines += [f"{name}: {path} is new" for path in sorted(set(after) - set(before))]
    elif recorded.get("revision") and current.get("revision") and recorded["revision"] != current["revision"]:
        lines.append(f"{name}: the hub cache resolves it to commit {current['revision']}, but the run started "
                     f"from commit {recorded['revision']}")
    if "adapter_base" in recorded:
        lines += base_changes(recorded["adapter_base"], current.get("adapter_base", {}))
    return lines


def merged(recorded: Optional[dict], current: dict) -> dict:
    """``current``, keeping each hub commit of ``recorded`` that the cache does not resolve now."""
    if not recorded:
        return current
    identity = dict(current)
    if identity.get("revision", "") is None:
        identity["revision"] = recorded.get("revision")
    if "adapter_base" in identity:
        identity["adapter_base"] = merged(recorded.get("adapter_base"), identity["adapter_base"])
    return identity


def unresolved(identity: Optional[dict]) -> bool:
    """Whether ``identity`` lacks a hub commit (a hub base not downloaded yet when it was recorded)."""
    return bool(identity) and ((identity.get("revision", "") is None) or unresolved(identity.get("adapter_base")))


def check_base(manifest, policy: str, revision: Optional[str] = None, cache: Optional[Path] = None) -> None:
    """Refuse a base that differs from the identity ``manifest`` (``loop.manifest.Manifest``) recorded
    (``ChangedBaseError``); record the identity otherwise (a first run, or a manifest that had none)."""
    recorded = manifest.data.get(BASE)
    current = base_identity(policy, revision, cache)
    if recorded:
        changes = base_changes(recorded, current)
        if changes:
            raise ChangedBaseError(
                f"{manifest.path.parent}: theta_0 is not the base its finished phases were computed from:\n  "
                + "\n  ".join(changes) + "\nEvery later policy was trained from it: restore the base (or, for a hub "
                "id, pin the recorded commit as model.policy.revision in a new run), or start a new run directory.")
        if unresolved(current) and not unresolved(recorded):
            log.warning("%s: the run started from commit %s of %s, which the hub cache at %s does not resolve; the "
                        "base cannot be checked", manifest.path.parent, recorded.get("revision"), policy,
                        cache or hub_cache())
    identity = merged(recorded, current)
    if identity != recorded:
        manifest.data[BASE] = identity
        manifest.save()
