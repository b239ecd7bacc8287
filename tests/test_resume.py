"""Mid-phase resume: a GRPO or RFT phase stopped at any point and resumed from its last checkpoint
(``PhaseCheckpoint``) writes what an uninterrupted phase writes, byte for byte on CPU.

The phase tests stop a phase in-process (an exception at the start of a step) and resume it in a
fresh Trainer; the loop test SIGKILLs ``rloop fit`` mid-GRPO, mid-RFT and mid-evaluation and reruns the same
command. Phases use the micro model and the shrunken YAMLs of ``test_loop.py``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from rloop_lightning.callbacks import MetricsRecorder, PhaseCheckpoint
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.loop.phases import PhaseSettings, build_phase
from rloop_lightning.rft import RFTModule
from test_loop import expert_files, grpo_yaml, kill_when, manifest, rft_yaml, start_loop, write_loop_config

VOLATILE = ("perf/", "time")  # wall-clock metrics differ between any two runs


class StopAt(L.Callback):
    """Raise at the start of training batch ``batch`` (counted over the whole fit): a crash."""

    def __init__(self, batch: int):
        self.batch, self.seen = batch, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            raise RuntimeError("crash")
        self.seen += 1


def run_phase(module: type, config: Path, directory: Path, every_n_steps: int | None,
              stop_at: int | None = None) -> None:
    """Fit one phase as the loop does (metrics file, checkpoints, resume from the latest)."""
    cli = build_phase(module, PhaseSettings(str(config)), {"trainer.default_root_dir": str(directory)})
    trainer = cli.trainer
    trainer.callbacks.append(MetricsRecorder(str(directory / "metrics.jsonl")))
    if stop_at is not None:
        trainer.callbacks.append(StopAt(stop_at))
    checkpoints = directory / "checkpoints"
    trainer.callbacks.append(PhaseCheckpoint(str(checkpoints), every_n_steps=every_n_steps, keep_last=False))
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=PhaseCheckpoint.latest(checkpoints),
                weights_only=False)


def phase_outputs(directory: Path) -> dict[str, bytes]:
    """Every file a phase wrote but checkpoints and its config (which names the directory); metrics
    rows without the wall-clock ones, and with sorted keys (a resumed phase logs them in another order)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and "checkpoints" not in path.parts and path.name != "config.yaml":
            files[str(path.relative_to(directory))] = path.read_bytes()
    rows = [json.loads(line) for line in files.pop("metrics.jsonl").splitlines()]
    files["metrics.jsonl"] = json.dumps([{k: v for k, v in row.items() if not k.startswith(VOLATILE)}
                                         for row in rows], sort_keys=True).encode()
    return files


def grpo_config(tmp_path: Path, kl_coef: float = 0.0) -> Path:
    config = grpo_yaml(digit_reward=True)
    if kl_coef:  # full fine-tuning with KL: the frozen reference must be theta_k after a resume too
        config["model"]["loss"] = {"kl_coef": kl_coef}
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]  # the harvester only
    # 2 optimizer steps per rollout batch, 5 batches; 16 prompts, 4 a batch: a new pass over them at batch 4
    config["trainer"]["max_steps"] = 10
    config["model"].update(dynamic_sampling=True, num_mini_batches=2)  # dynamic sampling: refill draws
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("stop_at, kl_coef", [(2, 0.0), (4, 0.0), (2, 0.5)],
                         ids=["mid-pass", "end-of-pass", "with-kl"])  # end-of-pass: the last checkpoint ended a pass
def test_grpo_phase_resumes_to_the_uninterrupted_outputs(tmp_path, stop_at, kl_coef):
    config = grpo_config(tmp_path, kl_coef)
    run_phase(GRPOModule, config, tmp_path / "reference", every_n_steps=None)  # checkpoints change nothing
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="crash"):
        run_phase(GRPOModule, config, resumed, every_n_steps=2, stop_at=stop_at)
    assert PhaseCheckpoint.latest(resumed / "checkpoints") is not None
    # what a SIGKILL inside an atomic write leaves: the resumed phase removes it
    for leftover in ("rank00/.step0000009.jsonl.tmp-1", ".prompt_stats.rank00.json.tmp-1"):
        (resumed / "experts" / leftover).write_text('{"half a record')
    run_phase(GRPOModule, config, resumed, every_n_steps=2)
    reference = phase_outputs(tmp_path / "reference")
    assert any(name.startswith("experts/rank00/step") for name in reference)
    assert phase_outputs(resumed) == reference
    assert not (resumed / "checkpoints").exists()  # cleaned up once the phase completed


def rft_config(tmp_path: Path) -> Path:
    records = tmp_path / "experts.jsonl"
    rng = random.Random(0)
    records.write_text("".join(json.dumps({"prompt": f"{i} {i + 1} -> {2 * i + 1}\n",
                                           "completion": f"{i}+{i + 1}" + "".join(rng.choices("0123456789+", k=4))})
                               + "\n" for i in range(20)))
    config = rft_yaml()
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]  # ExportPolicy only
    config["trainer"]["max_epochs"] = 2  # 20 records, 8 a batch: 3 batches an epoch, a new shuffle in the second
    config["data"]["init_args"]["paths"] = [str(records)]
    path = tmp_path / "rft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("stop_at", [2, 3])  # 3: the last checkpoint ended the first epoch
def test_rft_phase_resumes_to_the_uninterrupted_outputs(tmp_path, stop_at):
    config = rft_config(tmp_path)
    run_phase(RFTModule, config, tmp_path / "reference", every_n_steps=None)  # checkpoints change nothing
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="crash"):
        run_phase(RFTModule, config, resumed, every_n_steps=1, stop_at=stop_at)
    assert PhaseCheckpoint.latest(resumed / "checkpoints").name == f"step{stop_at:07d}.ckpt"
    run_phase(RFTModule, config, resumed, every_n_steps=1)
    reference = phase_outputs(tmp_path / "reference")
    assert "policy/model.safetensors" in reference and len(json.loads(reference["metrics.jsonl"])) == 6
    assert phase_outputs(resumed) == reference


# ---------------------------------------------------------------------------- the loop, killed


def checkpoint_of(phase_dir: Path):
    return lambda: PhaseCheckpoint.latest(phase_dir / "checkpoints") is not None


def harvest(run_dir: Path, k: int) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes())
            for p in (run_dir / f"iter_{k:02d}" / "grpo" / "experts").glob("rank*/*.jsonl")}


def evaluations(run_dir: Path) -> dict[str, dict]:
    return {str(p.relative_to(run_dir)): json.loads(p.read_text())["metrics"] for p in run_dir.rglob("eval.json")}


def policies(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.glob("iter_*/*/policy/*.safetensors")}


def lora_checkpoint_holds_the_adapter_only(checkpoint: dict) -> None:
    """A LoRA phase's checkpoint: the trained adapter's tensors (micro-llama, r = 4 on every linear layer:
    28 tensors, 4,096 numbers) and Adam's two moments of each of them, nothing of the base."""
    from rloop_lightning.policy import LoraSettings, Policy

    policy = Policy("rloop/micro-llama", lora=LoraSettings(r=4, alpha=8))
    adapter = {f"policy.model.{name}": p for name, p in policy.load_model().named_parameters() if p.requires_grad}
    saved = checkpoint["state_dict"]
    assert set(saved) == set(adapter) and len(saved) == 28 and all(".lora_" in name for name in saved)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in adapter.values()) == 4096
    moments = checkpoint["optimizer_states"][0]["state"].values()
    assert len(moments) == len(adapter)
    assert sum(m["exp_avg"].numel() + m["exp_avg_sq"].numel() for m in moments) == 2 * 4096


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["1-process", "2-processes-kl-lora"])
def test_sigkilled_loop_resumes_mid_phase_to_the_uninterrupted_run(tmp_path, devices, monkeypatch):
    """SIGKILL ``rloop fit`` at a random moment after a GRPO checkpoint, then after an RFT checkpoint, then
    during the held-out evaluation of theta_1; each rerun resumes that phase from its checkpoint (harvest
    shards before it kept as they are) or redoes the evaluation, and the final expert sets, shards,
    evaluations and policies equal an uninterrupted run's.

    ``devices``: processes per phase (the loop's ``trainer`` setting); more than one needs a strategy. The
    2-process run also trains GRPO with a KL penalty (``kl_coef`` 0.5: full fine-tuning in iteration 0, whose
    frozen reference must be theta_0 after the resume, not the checkpoint's weights) and RFT with LoRA (its
    checkpoint holds the adapter and its optimizer state; theta_1 is an adapter, so iteration 1's GRPO is a
    LoRA phase with KL to theta_1's frozen adapter)."""
    from loop_helpers import EVAL_DELAY_ENV

    monkeypatch.setenv(EVAL_DELAY_ENV, "0.4")  # a kill window of >= 0.4 s in every held-out scoring
    trainer = {"devices": devices} if devices == 1 else {"devices": devices, "strategy": "ddp"}
    runs = {}
    for name in ("reference", "run"):
        config = write_loop_config(tmp_path / name, tmp_path / name / "run")
        loop = yaml.safe_load(config.read_text())
        loop.update(trainer=trainer, checkpoint_every_n_steps=1)
        if devices == 2:
            loop["grpo"]["overrides"]["model.loss.kl_coef"] = 0.5
            loop["rft"]["overrides"]["model.policy.lora"] = {"r": 4, "alpha": 8}
        config.write_text(yaml.safe_dump(loop))
        runs[name] = (config, tmp_path / name / "run")
    log_path = tmp_path / "loop.log"
    reference = start_loop(runs["reference"][0], tmp_path / "reference.log")  # uninterrupted, meanwhile
    config, run_dir = runs["run"]
    grpo, rft, evaluation = (run_dir / "iter_00" / phase for phase in ("grpo", "rft", "eval"))
    delay = random.Random(os.getpid()).uniform(0.0, 0.3)
    rerun = None
    try:
        kill_when(start_loop(config, log_path), checkpoint_of(grpo), log_path, extra_delay=delay)
        assert "iter_00/grpo" not in manifest(run_dir)["completed"], f"killed {delay:.3f} s after a checkpoint"
        checkpoint = PhaseCheckpoint.latest(grpo / "checkpoints")
        resumed_at = torch.load(checkpoint, weights_only=False)["rloop_grpo"]["rollout_step"]
        kept = {p: v for p, v in harvest(run_dir, 0).items() if int(p.stem[len("step"):]) < resumed_at}
        kill_when(start_loop(config, log_path), checkpoint_of(rft), log_path, extra_delay=delay)
        assert "iter_00/rft" not in manifest(run_dir)["completed"]
        assert f"Restoring states from the checkpoint path at {checkpoint}" in log_path.read_text()
        assert {p: v for p, v in harvest(run_dir, 0).items() if p in kept} == kept  # kept, not rewritten
        if devices == 2:
            lora_checkpoint_holds_the_adapter_only(
                torch.load(PhaseCheckpoint.latest(rft / "checkpoints"), weights_only=False))
        kill_when(start_loop(config, log_path), evaluation.is_dir, log_path, extra_delay=delay)  # theta_1's
        assert "iter_00/rft" in manifest(run_dir)["completed"]
        assert "iter_00/eval" not in manifest(run_dir)["completed"], f"killed {delay:.3f} s into the evaluation"
        rerun = start_loop(config, log_path)
        assert rerun.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        assert f"Restoring states from the checkpoint path at {rft / 'checkpoints'}" in log_path.read_text()
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        for process in (reference, rerun):  # a run past its time limit fails the test and is ended
            if process is not None and process.poll() is None:
                process.kill()
    reference_dir = runs["reference"][1]
    assert manifest(run_dir)["completed"].keys() == manifest(reference_dir)["completed"].keys()
    assert expert_files(run_dir) == expert_files(reference_dir) and len(expert_files(reference_dir)) >= 10
    assert evaluations(run_dir) == evaluations(reference_dir) and len(evaluations(reference_dir)) == 3
    assert policies(run_dir) == policies(reference_dir) and len(policies(reference_dir)) == 4
    if devices == 2:  # adapters: theta_1, theta_2 and iteration 1's GRPO end point (trained on from theta_1's)
        assert sorted(name for name in policies(reference_dir) if name.endswith("adapter_model.safetensors")) == [
            "iter_00/rft/policy/adapter_model.safetensors", "iter_01/grpo/policy/adapter_model.safetensors",
            "iter_01/rft/policy/adapter_model.safetensors"]
    assert not list(run_dir.rglob("checkpoints")) and not list(run_dir.rglob("*.tmp-*"))


def test_a_lora_phase_checkpoint_holds_the_adapter_and_resumes_to_the_uninterrupted_outputs(tmp_path):
    """A LoRA GRPO phase's checkpoint keeps the trained adapter's weights (and its optimizer state) only;
    the base and the frozen reference adapter load from their files, and the resume equals the
    uninterrupted phase."""
    from rloop_lightning.policy import LoraSettings, Policy

    config = yaml.safe_load(grpo_config(tmp_path).read_text())
    config["model"]["policy"]["lora"] = {"r": 4, "alpha": 8}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    run_phase(GRPOModule, path, tmp_path / "reference", every_n_steps=None)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="crash"):
        run_phase(GRPOModule, path, resumed, every_n_steps=2, stop_at=3)
    checkpoint = torch.load(PhaseCheckpoint.latest(resumed / "checkpoints"), weights_only=False)
    policy = Policy(config["model"]["policy"]["model_name_or_path"], lora=LoraSettings(r=4, alpha=8))
    adapter = {name for name, p in policy.load_model().named_parameters() if p.requires_grad}
    saved = checkpoint["state_dict"]
    assert len(saved) == len(adapter) and all(".lora_" in name for name in saved)  # no base weight
    assert sum(t.numel() for t in saved.values()) == sum(
        p.numel() for p in policy.load_model().parameters() if p.requires_grad)
    moments = checkpoint["optimizer_states"][0]["state"]
    assert len(moments) == len(adapter)  # Adam's moments of the adapter's tensors, nothing else
    run_phase(GRPOModule, path, resumed, every_n_steps=2)
    assert phase_outputs(resumed) == phase_outputs(tmp_path / "reference")


def test_generator_states_load_with_weights_only_and_restore_every_stream():
    """``ModelParallelStrategy`` (FSDP2) loads checkpoints with ``torch.load(weights_only=True)``, which refuses
    pickled numpy arrays: the saved states are tensors, tuples and numbers, and restoring them replays the
    torch, Python and numpy streams (numpy's cached Gaussian included)."""
    import io
    import random

    import numpy as np

    from rloop_lightning.callbacks.checkpoint import rng_states, set_rng_states

    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    buffer = io.BytesIO()
    torch.save(rng_states(), buffer)
    draws = torch.rand(2).tolist(), random.random(), np.random.normal(), np.random.rand(2).tolist()
    buffer.seek(0)
    set_rng_states(torch.load(buffer, weights_only=True))
    assert (torch.rand(2).tolist(), random.random(), np.random.normal(), np.random.rand(2).tolist()) == draws
