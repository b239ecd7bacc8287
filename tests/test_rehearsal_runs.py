"""Every recipe end to end on this CPU under its rehearsal fragment (``pytest -m rehearsal``).

Each test runs the command a user runs, ``python -m rloop_lightning ... --config configs/recipes/X.yaml
--config configs/rehearsal/X.yaml``, from the repository root with the outputs redirected to a
temporary directory, on the Qwen2.5 stand-ins (random weights: the runs prove the plumbing, not
learning).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.rehearsal, pytest.mark.slow]


def rehearse(command: list[str], recipe: str, *overrides: str, timeout: int = 600) -> str:
    """Run ``rloop <command>`` on ``configs/recipes/<recipe>.yaml`` + its fragment; its output (stdout + stderr)."""
    args = [sys.executable, "-m", "rloop_lightning", *command, "--config", f"configs/recipes/{recipe}.yaml",
            "--config", f"configs/rehearsal/{recipe}.yaml", *overrides]
    result = subprocess.run(args, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def last_checkpoint(root: Path) -> dict:
    (path,) = root.rglob("last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_finite_state(checkpoint: dict) -> None:
    tensors = [value for value in checkpoint["state_dict"].values() if torch.is_tensor(value)]
    assert tensors and all(bool(torch.isfinite(value.float()).all()) for value in tensors if value.is_floating_point())


@pytest.mark.parametrize("recipe", ["qlora_gsm8k_grpo", "qlora_gsm8k_grpo_8gb"])
def test_qlora_gsm8k_grpo(tmp_path, recipe):
    output = rehearse(["grpo", "fit"], recipe, f"--trainer.default_root_dir={tmp_path}")
    assert "step 2 evaluation: test/avg@2=" in output  # the recipe's PassAtKEvaluation ran
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint["global_step"] == 2
    assert_finite_state(checkpoint)
    assert (tmp_path / "policy" / "adapter_model.safetensors").exists()  # ExportPolicy: the QLoRA adapter
    assert json.loads((tmp_path / "policy" / "adapter_config.json").read_text())["r"] == 32  # the recipe's LoRA
    assert (tmp_path / "experts").is_dir()  # ExpertHarvester


@pytest.mark.parametrize("recipe", ["qlora_gsm8k_rft", "qlora_gsm8k_rft_8gb"])
def test_qlora_gsm8k_rft(tmp_path, recipe):
    output = rehearse(["rft", "fit"], recipe, f"--trainer.default_root_dir={tmp_path}")
    assert "step 2 evaluation: test/avg@2=" in output
    assert (tmp_path / "policy" / "adapter_model.safetensors").exists()


@pytest.mark.vllm
def test_dapo_qwen2_5_math_7b_eval(tmp_path):
    output = rehearse(["eval"], "dapo_qwen2.5_math_7b_eval", f"--output={tmp_path / 'metrics.json'}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["math/test"]) == {"avg@2", "pass@1", "pass@2", "greedy_accuracy"}
    assert '"math/test"' in output  # the table is printed


def assert_rloop_rehearsal_completed(run_dir: Path) -> None:
    completed = json.loads((run_dir / "manifest.json").read_text())["completed"]
    assert {"eval/theta_0", "iter_00/grpo", "iter_00/expert_set", "iter_01/grpo", "iter_01/expert_set"} <= set(completed)
    assert (run_dir / "report.md").exists()


def test_qlora_gsm8k_rloop_8gb(tmp_path):
    """(``qlora_gsm8k_rloop`` itself runs end to end as the reference of its SIGKILL test below.)"""
    rehearse(["fit"], "qlora_gsm8k_rloop_8gb", f"--run_dir={tmp_path}", timeout=900)
    assert_rloop_rehearsal_completed(tmp_path)


@pytest.mark.vllm
def test_dapo_qwen2_5_math_7b_lora_grpo(tmp_path):
    """2 CPU processes (DDP over gloo), one vLLM CPU engine per rank fed LoRA adapters."""
    output = rehearse(["grpo", "fit"], "dapo_qwen2.5_math_7b_lora_grpo", f"--trainer.default_root_dir={tmp_path}")
    assert "Starting with 2 processes" in output
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint["global_step"] == 2  # one rollout step, the recipe's mini-batches (2 in the rehearsal)
    assert_finite_state(checkpoint)
    for rank in ("00", "01"):  # each rank harvests its own prompts
        assert (tmp_path / "experts" / f"rank{rank}").is_dir()


@pytest.mark.vllm
def test_dapo_qwen2_5_math_7b_grpo(tmp_path):
    """2 CPU processes sharded with FSDP2 (the recipe's ModelParallelStrategy), full-weight vLLM sync per rank."""
    output = rehearse(["grpo", "fit"], "dapo_qwen2.5_math_7b_grpo", f"--trainer.default_root_dir={tmp_path}")
    assert "Starting with 2 processes" in output
    assert "max_steps=2` reached" in output
    for rank in ("00", "01"):
        assert (tmp_path / "experts" / f"rank{rank}").is_dir()


def test_dapo_qwen2_5_math_7b_rft(tmp_path):
    output = rehearse(["rft", "fit"], "dapo_qwen2.5_math_7b_rft", f"--trainer.default_root_dir={tmp_path}")
    assert "Starting with 2 processes" in output
    assert "max_epochs=1` reached" in output  # 8 records over 2 ranks, batch 2, 2 accumulated: 1 optimizer step
    assert list(tmp_path.rglob("last.ckpt"))


def qlora_checkpoint_holds_the_adapter_and_its_moments(path: Path) -> None:
    """The QLoRA GRPO phase's checkpoint (tiny-qwen2.5 in 4 bits, the recipe's LoRA: r = 32 on every linear
    layer of 4 layers, hidden 128, MLP 384, key/value 64): the adapter's 56 float32 tensors, 4 x 32 x
    (2 x 256 + 3 x 512 + 2 x 192) = 311,296 numbers, and AdamW's two moments of each; nothing of the 4-bit
    base (its weights and quantisation state load from the base: 1.1 MB more here). On disk: three copies of
    the adapter (4 bytes a number) and under 192 KiB of the rest (tensor names and headers, generator
    states, loop and data states: 96 KiB here)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    adapter = checkpoint["state_dict"]
    assert len(adapter) == 56 and all(".lora_A." in name or ".lora_B." in name for name in adapter)
    assert sum(t.numel() for t in adapter.values()) == 311_296
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    moments = list(checkpoint["optimizer_states"][0]["state"].values())
    assert len(moments) == 56
    assert sum(m["exp_avg"].numel() + m["exp_avg_sq"].numel() for m in moments) == 2 * 311_296
    assert 3 * 4 * 311_296 < path.stat().st_size < 3 * 4 * 311_296 + 192 * 1024, path.stat().st_size


@pytest.mark.parametrize("recipe", [
    "qlora_gsm8k_rloop",
    pytest.param("dapo_qwen2.5_math_7b_rloop", marks=pytest.mark.vllm),  # 2 FSDP2 processes, vLLM rollouts
])
def test_rloop_recipe_resumes_after_sigkill_to_the_uninterrupted_outputs(tmp_path, recipe):
    """SIGKILL the loop mid-GRPO (after its first checkpoint) and rerun it: the phase resumes from the
    checkpoint and the run ends with the evaluations and policies of an uninterrupted run (which is
    the recipe's rehearsal end to end: K = 2, every phase completed, and a report)."""
    import signal

    from rloop_lightning.callbacks import PhaseCheckpoint

    every_step = "--checkpoint_every_n_steps=1"
    output = rehearse(["fit"], recipe, f"--run_dir={tmp_path / 'reference'}", every_step, timeout=900)
    assert_rloop_rehearsal_completed(tmp_path / "reference")
    if recipe == "dapo_qwen2.5_math_7b_rloop":  # FSDP2 + vLLM on 2 processes, K = 2: every engine in the one group
        # per rank: the evaluation engine of theta_0, then each GRPO phase's (no RFT: the expert sets are empty)
        assert "(rank 0 of 1)" not in output and output.count("(rank 0 of 2)") == output.count("(rank 1 of 2)") >= 3
    run_dir, log_path = tmp_path / "run", tmp_path / "run.log"
    args = [sys.executable, "-m", "rloop_lightning", "fit", "--config", f"configs/recipes/{recipe}.yaml",
            "--config", f"configs/rehearsal/{recipe}.yaml", f"--run_dir={run_dir}", every_step]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    checkpoints = run_dir / "iter_00" / "grpo" / "checkpoints"
    try:
        while PhaseCheckpoint.latest(checkpoints) is None:
            assert process.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "iter_00/grpo" not in manifest["completed"]  # killed mid-phase
    if recipe == "qlora_gsm8k_rloop":
        qlora_checkpoint_holds_the_adapter_and_its_moments(PhaseCheckpoint.latest(checkpoints))
    output = rehearse(["fit"], recipe, f"--run_dir={run_dir}", every_step, timeout=900)
    assert "Restoring states from the checkpoint path" in output

    def outcome(directory: Path) -> tuple[dict, dict]:
        evaluations = {str(p.relative_to(directory)): json.loads(p.read_text())["metrics"]
                       for p in directory.rglob("eval.json")}
        policies = {str(p.relative_to(directory)): p.read_bytes()
                    for p in directory.glob("iter_*/*/policy/*.safetensors")}
        return evaluations, policies

    reference, resumed = outcome(tmp_path / "reference"), outcome(run_dir)
    assert len(reference[1]) == 2 and resumed == reference  # the two GRPO policies, byte for byte
