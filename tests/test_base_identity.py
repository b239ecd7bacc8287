"""theta_0's identity in the manifest (``loop.base_identity``): the sha256 of a local or built-in base's
files, the commit a hub id resolves to in the local Hugging Face cache (a fake one here, laid out as
``huggingface_hub`` lays it out), and the refusal of a base that changed under a run.

Each case passed silently before: a rebuilt or overwritten base directory, or a hub ``main`` that
moved, changed iteration 0 and every adapter's meaning with no error on resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rloop_lightning import tiny
from rloop_lightning.loop.base_identity import (
    BASE, ChangedBaseError, base_identity, check_base, hub_revision, unresolved,
)
from rloop_lightning.loop.manifest import Manifest
from rloop_lightning.loop.verify import file_sha256

OLD, NEW = "a" * 40, "b" * 40
REPO = "Qwen/Qwen2.5-Math-1.5B"


def fake_hub_cache(root: Path, commit: str, branch: str = "main") -> Path:
    """A hub cache holding ``REPO`` at ``commit`` with ``refs/<branch>`` pointing to it."""
    model = root / "models--Qwen--Qwen2.5-Math-1.5B"
    (model / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (model / "snapshots" / commit / "config.json").write_text("{}")
    (model / "refs").mkdir(exist_ok=True)
    (model / "refs" / branch).write_text(commit)  # huggingface_hub writes it without a newline
    return root


def base_directory(root: Path, weights: bytes = b"weights") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(weights)
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / ".cache").mkdir(exist_ok=True)  # huggingface-cli download --local-dir's metadata: not the model
    (root / ".cache" / "model.safetensors.metadata").write_text("etag, time")
    return root


def test_hub_revision_is_the_commit_the_cache_resolves_a_branch_to(tmp_path):
    cache = fake_hub_cache(tmp_path, OLD)
    assert hub_revision(REPO, None, cache) == OLD
    assert hub_revision(REPO, "main", cache) == OLD
    assert hub_revision(REPO, NEW, cache) == NEW  # a commit is its own revision
    assert hub_revision(REPO, "v2", cache) is None  # a branch the cache does not hold
    assert hub_revision("Qwen/other", None, cache) is None  # not downloaded yet


def test_a_directory_base_is_identified_by_the_sha256_of_its_files(tmp_path):
    directory = base_directory(tmp_path / "policy")
    identity = base_identity(str(directory))
    assert identity == {"policy": str(directory), "sha256": {
        "config.json": file_sha256(directory / "config.json"),
        "model.safetensors": file_sha256(directory / "model.safetensors")}}
    builtin = base_identity("rloop/micro-llama")
    assert builtin["sha256"]["model.safetensors"] == file_sha256(tiny.materialize("rloop/micro-llama") / "model.safetensors")


def test_an_adapter_base_records_the_model_it_adapts(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": REPO}))
    identity = base_identity(str(adapter), None, fake_hub_cache(tmp_path / "hub", OLD))
    assert identity["adapter_base"] == {"policy": REPO, "revision": OLD}


def test_a_changed_base_directory_refuses_to_resume_naming_the_file(tmp_path):
    manifest = Manifest(tmp_path / "run" / "manifest.json")
    directory = base_directory(tmp_path / "base" / "policy")
    check_base(manifest, str(directory))
    assert Manifest(manifest.path).data[BASE]["sha256"]["model.safetensors"] == file_sha256(directory / "model.safetensors")
    (directory / ".cache" / "model.safetensors.metadata").write_text("another time")  # hidden: no difference
    check_base(Manifest(manifest.path), str(directory))
    (directory / "model.safetensors").write_bytes(b"rebuilt")  # a base build cut short by max_time, say
    with pytest.raises(ChangedBaseError, match=rf"theta_0 is not the base .*\n  {directory}: model.safetensors "
                                               r"changed \(sha256 [0-9a-f]{12} when the run started\)"):
        check_base(Manifest(manifest.path), str(directory))
    (directory / "model.safetensors").unlink()
    with pytest.raises(ChangedBaseError, match=f"{directory}: model.safetensors is missing"):
        check_base(Manifest(manifest.path), str(directory))


def test_a_hub_base_whose_cache_moved_to_another_commit_refuses_to_resume_naming_both(tmp_path):
    manifest = Manifest(tmp_path / "run" / "manifest.json")
    cache = tmp_path / "hub"
    check_base(manifest, REPO, None, cache)  # not downloaded yet: recorded once the evaluation loaded it
    assert unresolved(Manifest(manifest.path).data[BASE])
    fake_hub_cache(cache, OLD)
    check_base(Manifest(manifest.path), REPO, None, cache)
    assert Manifest(manifest.path).data[BASE] == {"policy": REPO, "revision": OLD}
    fake_hub_cache(cache, NEW)  # main moved: a newer snapshot downloaded
    with pytest.raises(ChangedBaseError, match=f"{REPO}: the hub cache resolves it to commit {NEW}, but the run "
                                               f"started from commit {OLD}"):
        check_base(Manifest(manifest.path), REPO, None, cache)
    check_base(Manifest(manifest.path), REPO, OLD, cache)  # pinned to the recorded commit: the same base
    check_base(Manifest(manifest.path), REPO, None, tmp_path / "elsewhere")  # a cache without it: not checkable
    assert Manifest(manifest.path).data[BASE]["revision"] == OLD  # and the recorded commit is kept


def test_a_base_the_run_builds_is_recorded_once_built_and_a_deleted_one_refused_before_a_rebuild(tmp_path):
    manifest = Manifest(tmp_path / "run" / "manifest.json")
    policy = tmp_path / "base" / "policy"
    check_base(manifest, str(policy))  # the first run checks before base.build_config builds it
    assert unresolved(Manifest(manifest.path).data[BASE])
    base_directory(policy)
    check_base(Manifest(manifest.path), str(policy))  # after theta_0's evaluation: its files
    assert set(Manifest(manifest.path).data[BASE]["sha256"]) == {"config.json", "model.safetensors"}
    (policy / "config.json").unlink()
    (policy / "model.safetensors").unlink()
    with pytest.raises(ChangedBaseError, match=f"{policy}: config.json is missing"):
        check_base(Manifest(manifest.path), str(policy))
