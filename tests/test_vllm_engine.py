"""VLLMEngine against tests/fake_vllm.py: a CPU fake of vLLM's API that samples from the real tiny model.

The real vLLM path (CUDA, vllm>=0.8.5,<0.12) is not exercised here; see docs/scale_out.md.
"""

from __future__ import annotations

import sys

import pytest
import torch

import fake_vllm
from rloop_lightning.algorithms.importance import pad_logprobs, truncated_importance_weights
from rloop_lightning.policy import LoraSettings, Policy
from rloop_lightning.rollout import vllm as vllm_engine
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.rollout.vllm import VLLMEngine

PROMPTS = ["12 3 -> 9\n", "1 2 -> 3\n", "4 4 -> 16\n"]


@pytest.fixture
def vllm(monkeypatch):
    """The fake vLLM, with the engine's CUDA check passed (the fake itself runs on CPU)."""
    monkeypatch.setattr(vllm_engine, "require_cuda", lambda: None)
    return fake_vllm.install(monkeypatch)


def sampled_logprobs_match_policy(policy: Policy, rollouts) -> None:
    batch = policy.make_batch(rollouts.prompt_ids, rollouts.completion_ids)
    with torch.no_grad():
        trainer = policy.completion_logprobs(batch)[0]
    sampler = pad_logprobs(rollouts.sampler_logprobs, trainer.shape[1])
    mask = batch.completion_mask.float()
    torch.testing.assert_close(trainer * mask, sampler * mask, atol=1e-4, rtol=1e-4)
    _, stats = truncated_importance_weights(trainer, sampler, mask)
    assert stats["logprob_diff_max"] < 1e-4


def perturb(parameter: torch.Tensor, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_generate_groups_shapes_and_sampler_logprobs(micro_policy, vllm):
    engine = VLLMEngine(enable_sleep_mode=False, seed=3)
    rollouts = engine.generate(micro_policy, PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=6))
    assert len(rollouts) == 12 and rollouts.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    prompt_ids = micro_policy.encode_prompts(PROMPTS)
    assert rollouts.prompt_ids == [prompt_ids[i] for i in rollouts.prompt_index]
    eos = micro_policy.tokenizer.eos_token_id
    for ids, logprobs, text, truncated in zip(rollouts.completion_ids, rollouts.sampler_logprobs,
                                              rollouts.completions, rollouts.truncated):
        assert 1 <= len(ids) <= 6 and len(logprobs) == len(ids)
        assert truncated == (ids[-1] != eos) and (not truncated or len(ids) == 6)
        assert text == micro_policy.decode(ids)
    sampled_logprobs_match_policy(micro_policy, rollouts)
    llm = fake_vllm.LLM.instances[0]
    params = llm.generate_calls[0]["params"]
    assert (params.n, params.max_tokens, params.logprobs, params.top_k) == (4, 6, 0, -1)
    assert params.stop_token_ids == [eos]
    assert llm.kwargs["enable_lora"] is False and llm.kwargs["seed"] == 3
    assert llm.kwargs["model"] == micro_policy.source and llm.kwargs["dtype"] == "float32"


def test_truncation_flag_follows_finish_reason(micro_policy, vllm):
    engine = VLLMEngine(enable_sleep_mode=False)
    eos = micro_policy.tokenizer.eos_token_id
    stopped = fake_vllm.CompletionOutput(0, "", [7, eos], [{7: fake_vllm.Logprob(-1.0)},
                                                           {eos: fake_vllm.Logprob(-2.0)}], "stop")
    cut = fake_vllm.CompletionOutput(1, "", [7, 8], [{7: fake_vllm.Logprob(-0.5)},
                                                     {8: fake_vllm.Logprob(-0.25)}], "length")
    rollouts = engine.to_rollouts(micro_policy, [[5, 6]], [fake_vllm.RequestOutput([5, 6], [stopped, cut])], 2)
    assert rollouts.truncated == [False, True]
    assert rollouts.sampler_logprobs == [[-1.0, -2.0], [-0.5, -0.25]]
    with pytest.raises(RuntimeError, match="expected 3"):
        engine.to_rollouts(micro_policy, [[5, 6]], [fake_vllm.RequestOutput([5, 6], [stopped, cut])], 3)


def test_full_weight_sync_reaches_the_vllm_model(micro_policy, vllm):
    engine = VLLMEngine(enable_sleep_mode=False)
    engine.generate(micro_policy, PROMPTS[:1], 2, SamplingParams(max_new_tokens=4))
    llm = fake_vllm.LLM.instances[0]
    name = "model.layers.0.mlp.down_proj.weight"
    trained = dict(micro_policy.model.named_parameters())[name]
    perturb(trained)
    assert not torch.equal(dict(llm.hf_model.named_parameters())[name], trained)
    engine.sync_weights(micro_policy)
    for key, value in micro_policy.model.state_dict().items():
        torch.testing.assert_close(llm.hf_model.state_dict()[key], value, rtol=0, atol=0)
    assert llm.prefix_cache_resets == 1 and engine.num_syncs == 1
    sampled_logprobs_match_policy(
        micro_policy, engine.generate(micro_policy, PROMPTS, 3, SamplingParams(max_new_tokens=5)))


def test_full_weight_sync_on_vllm_without_apply_model(micro_policy, vllm, monkeypatch):
    monkeypatch.delattr(fake_vllm.LLM, "apply_model")  # vLLM 0.8.x: reach the model through the executor
    engine = VLLMEngine(enable_sleep_mode=False)
    engine.build(micro_policy)
    perturb(micro_policy.model.lm_head.weight)  # tied to the embeddings
    engine.sync_weights(micro_policy)
    llm = fake_vllm.LLM.instances[0]
    assert llm.worker_model.num_loads == 1
    torch.testing.assert_close(llm.hf_model.lm_head.weight, micro_policy.model.lm_head.weight)


def test_lora_sync_sends_a_new_request_each_time(vllm):
    policy = Policy("rloop/micro-llama", lora=LoraSettings(r=4, alpha=8))
    policy.load_model()
    engine = VLLMEngine(enable_sleep_mode=False)
    sampling = SamplingParams(max_new_tokens=4)
    engine.generate(policy, PROMPTS[:2], 2, sampling)
    llm = fake_vllm.LLM.instances[0]
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8  # r=4 rounded up
    first = llm.generate_calls[-1]["lora_request"]
    assert first is not None and first.lora_int_id == 1
    for name, parameter in policy.model.named_parameters():
        if "lora_B" in name:
            perturb(parameter)  # lora_B starts at zero: make the adapter matter
    engine.sync_weights(policy)
    rollouts = engine.generate(policy, PROMPTS, 3, sampling)
    second = llm.generate_calls[-1]["lora_request"]
    assert second.lora_int_id == 2 and second.lora_path != first.lora_path
    assert llm.removed_loras == [1]
    sampled_logprobs_match_policy(policy, rollouts)
    engine.close()


def test_sleep_around_rollouts_and_wake_for_sync(micro_policy, vllm):
    engine = VLLMEngine(enable_sleep_mode=True)
    engine.generate(micro_policy, PROMPTS[:1], 2, SamplingParams(max_new_tokens=3))
    llm = fake_vllm.LLM.instances[0]
    assert engine.asleep and llm.asleep and llm.sleep_levels == [1]
    engine.sync_weights(micro_policy)  # wakes first, stays awake for the next rollout
    assert not llm.asleep and llm.wake_calls == 1
    engine.generate(micro_policy, PROMPTS[:1], 2, SamplingParams(max_new_tokens=3))
    assert llm.sleep_levels == [1, 1] and llm.wake_calls == 1


def test_level_two_sleep_resyncs_before_sampling(micro_policy, vllm):
    engine = VLLMEngine(enable_sleep_mode=True, sleep_level=2)
    engine.generate(micro_policy, PROMPTS[:1], 2, SamplingParams(max_new_tokens=3))
    engine.generate(micro_policy, PROMPTS[:1], 2, SamplingParams(max_new_tokens=3))
    assert engine.num_syncs == 1  # the weights were dropped by the first sleep


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'rloop-lightning\[vllm\]'"):
        VLLMEngine()


def test_no_cuda_fails_before_any_model_loads(monkeypatch):
    fake_vllm.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        VLLMEngine()
    assert fake_vllm.LLM.instances == []


def test_rejects_bad_settings(vllm):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMEngine(sleep_level=3)
