"""Resume checks what it trusts: the manifest records the sha256 of every finished phase's files, and a
rerun checks them before anything runs (``loop.verify``).

Each case failed before: a deleted expert set was replayed as a smaller set (``size_with_replay`` 65
instead of 134), flipped bits in theta_k's weights trained the next iteration from a corrupt policy
with exit 0, a truncated or deleted theta_k gave a raw ``SafetensorError`` or a hub error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rloop_lightning.cli import cli_main
from rloop_lightning.loop import BasePolicySettings, PhaseSettings, RLoop
from rloop_lightning.loop.expert_set import ExpertSetSettings
from rloop_lightning.loop.base_identity import BASE, ChangedBaseError, base_identity
from rloop_lightning.loop.layout import RunLayout
from rloop_lightning.loop.verify import DIGESTS, ChangedOutputError, file_sha256, is_read_later
from test_loop import manifest, read_jsonl, write_loop_config

FIRST = ("eval/theta_0", "iter_00/grpo", "iter_00/expert_set", "iter_00/rft", "iter_00/eval")
LOGS = ("metrics.jsonl", "config.yaml")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """One finished 1-iteration run with replay on: (loop YAML, run directory)."""
    root = tmp_path_factory.mktemp("verify")
    config = write_loop_config(root / "configs", root / "run")
    loop = yaml.safe_load(config.read_text())
    loop["expert_set"]["replay"] = True
    config.write_text(yaml.safe_dump({**loop, "iterations": 1}))
    cli_main(["fit", "--config", str(config)])
    return config, root / "run"


def copy_run(finished, tmp_path: Path) -> tuple[Path, Path]:
    config, run_dir = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    moved = tmp_path / "loop.yaml"
    moved.write_text(config.read_text().replace(str(run_dir), str(copy)))
    return moved, copy


def test_every_finished_phase_records_the_sha256_of_its_files(finished):
    _, run_dir = finished
    completed = manifest(run_dir)["completed"]
    assert set(completed) == set(FIRST)
    for name, info in completed.items():
        files = sorted(p for p in (run_dir / name).rglob("*") if p.is_file() and p.name not in LOGS)
        assert info[DIGESTS] == {p.relative_to(run_dir / name).as_posix(): file_sha256(p) for p in files}
    assert set(completed["iter_00/expert_set"][DIGESTS]) == {"experts.jsonl", "summary.json"}
    assert "policy/model.safetensors" in completed["iter_00/rft"][DIGESTS]
    assert {"experts/prompt_stats.rank00.json", "policy/model.safetensors"} <= set(completed["iter_00/grpo"][DIGESTS])
    assert (run_dir / "iter_00/grpo/metrics.jsonl").exists() and (run_dir / "iter_00/rft/config.yaml").exists()
    assert manifest(run_dir)[BASE] == base_identity("rloop/micro-llama")  # theta_0's files, by sha256


def test_a_changed_base_refuses_to_resume_naming_it_before_anything_runs(finished, tmp_path):
    config, run_dir = copy_run(finished, tmp_path)
    recorded = manifest(run_dir)
    recorded[BASE]["sha256"]["model.safetensors"] = "0" * 64  # the run started from other weights
    (run_dir / "manifest.json").write_text(json.dumps(recorded))
    with pytest.raises(ChangedBaseError, match="theta_0 is not the base .*\n  rloop/micro-llama: model.safetensors "
                                               "changed \\(sha256 000000000000 when the run started\\)"):
        cli_main(["fit", "--config", str(config), "--iterations", "2"])
    assert manifest(run_dir)["completed"] == recorded["completed"] and not (run_dir / "iter_01").exists()
    assert manifest(run_dir)[BASE] == recorded[BASE]  # the record is not overwritten


def test_only_what_later_phases_read_is_digested():
    assert [is_read_later(path, RunLayout.read_later("iter_03/grpo")) for path in (
        "policy/model.safetensors", "experts/rank01/step0000002.jsonl", "experts/prompt_stats.rank00.json",
        "metrics.jsonl", "config.yaml", "lightning_logs/version_0/metrics.csv", "checkpoints/step=2.ckpt",
        "wandb/run-1/files/output.log")] == [True, True, True, False, False, False, False, False]
    assert RunLayout.read_later("iter_00/rft") == ("policy",)
    assert [is_read_later(path, RunLayout.read_later("iter_00/expert_set")) for path in (
        "experts.jsonl", "summary.json", "checkpoints/x")] == [True, True, False]


def test_changed_or_deleted_logs_do_not_block_resume(finished, tmp_path, monkeypatch):
    config, run_dir = copy_run(finished, tmp_path)
    with open(run_dir / "iter_00/grpo/metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 99, "loss": 0.0}\n')
    (run_dir / "iter_00/rft/metrics.jsonl").unlink()
    (run_dir / "iter_00/rft/config.yaml").unlink()
    recorded = manifest(run_dir)  # digests of logs recorded by earlier versions are ignored as well
    recorded["completed"]["iter_00/grpo"][DIGESTS]["lightning_logs/version_0/metrics.csv"] = "0" * 64
    recorded["completed"]["iter_00/rft"][DIGESTS]["metrics.jsonl"] = "0" * 64
    (run_dir / "manifest.json").write_text(json.dumps(recorded))
    for work in ("run_grpo", "build_experts", "run_rft", "evaluate_held_out"):
        monkeypatch.setattr(RLoop, work, lambda *args, **kwargs: pytest.fail("a completed phase was re-run"))
    cli_main(["fit", "--config", str(config)])
    assert manifest(run_dir)["completed"] == recorded["completed"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_changed_or_missing_policy_is_refused_naming_the_file_before_anything_runs(finished, tmp_path, damage):
    config, run_dir = copy_run(finished, tmp_path)
    weights = run_dir / "iter_00/rft/policy/model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 3]))
    else:
        weights.unlink()
    before = manifest(run_dir)
    what = "is missing" if damage == "delete" else "changed"
    with pytest.raises(ChangedOutputError, match=f"phase iter_00/rft finished, but {weights} {what}.*restore the file"):
        cli_main(["fit", "--config", str(config), "--iterations", "2"])
    assert manifest(run_dir)["completed"] == before["completed"] and not (run_dir / "iter_01").exists()


def test_a_deleted_expert_set_is_rebuilt_identically_and_replay_uses_all_of_it(finished, tmp_path, caplog):
    config, run_dir = copy_run(finished, tmp_path)
    experts = run_dir / "iter_00/expert_set/experts.jsonl"
    original = experts.read_bytes()
    experts.unlink()
    cli_main(["fit", "--config", str(config), "--iterations", "2"])
    assert experts.read_bytes() == original
    assert f"iter_00/expert_set: {experts} is missing; the phase is redone" in caplog.text
    summary = json.loads((run_dir / "iter_01/expert_set/summary.json").read_text())
    assert summary["size_with_replay"] == summary["size"] + len(read_jsonl(experts)) > summary["size"]
    assert manifest(run_dir)["completed"]["iter_00/rft"] == manifest(finished[1])["completed"]["iter_00/rft"]


def test_an_expert_set_whose_harvest_changed_is_refused(finished, tmp_path):
    config, run_dir = copy_run(finished, tmp_path)
    (run_dir / "iter_00/expert_set/experts.jsonl").unlink()
    shard = sorted((run_dir / "iter_00/grpo/experts").glob("rank00/*.jsonl"))[0]
    shard.write_text("")
    with pytest.raises(ChangedOutputError, match=f"phase iter_00/grpo finished, but {shard} changed"):
        cli_main(["fit", "--config", str(config)])


def test_a_deleted_evaluation_is_redone_to_the_same_numbers(finished, tmp_path):
    config, run_dir = copy_run(finished, tmp_path)
    evaluation = run_dir / "iter_00/eval/eval.json"
    original = json.loads(evaluation.read_text())
    evaluation.unlink()
    cli_main(["fit", "--config", str(config)])
    redone = json.loads(evaluation.read_text())
    assert redone["metrics"] == original["metrics"] and redone["policy"] == str(run_dir / "iter_00/rft/policy")


def test_replay_of_a_missing_earlier_expert_set_is_an_error_never_a_smaller_set(tmp_path):
    loop = RLoop(str(tmp_path / "run"), BasePolicySettings("rloop/micro-llama"), PhaseSettings("unused.yaml"),
                 PhaseSettings("unused.yaml"), evaluators=[], expert_set=ExpertSetSettings(replay=True))
    with pytest.raises(FileNotFoundError, match=r"replay: the expert set of iteration 0, .*iter_00/expert_set/"
                                                r"experts.jsonl, is missing"):
        loop.build_experts(1)
