"""Sampling means what it says, on the Qwen2.5 stand-in, with both engines (HF generate and real vLLM).

The stand-in's ``generation_config`` carries Qwen2.5-Instruct's repetition penalty (1.1), top-k 20,
top-p 0.8 and temperature 0.7, and two end tokens (``<|im_end|>``, ``<|endoftext|>``). The engines
sample from ``SamplingParams`` alone, so their log-probs equal the trainer's
(``Policy.completion_logprobs`` with the same temperature / top-k / top-p), and they stop at every
end token.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from rloop_lightning.algorithms.importance import pad_logprobs
from rloop_lightning.policy import Policy
from rloop_lightning.rollout import hf
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.rollout.hf import HFGenerateEngine

PROMPTS = ["Natalia sold 48 clips in April and half as many in May. How many clips in all?",
           "Weng earns $12 an hour. How much for 50 minutes?"]
SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=16)
TOLERANCE = 1e-4
IM_END, ENDOFTEXT = 1026, 1024


def stand_in(chat: bool, name: str = "rloop/tiny-qwen2.5") -> Policy:
    policy = Policy(name, use_chat_template=chat)
    policy.load_model()
    return policy


def sampler_gap(policy: Policy, rollouts, sampling: SamplingParams, **scoring) -> float:
    batch = policy.make_batch(rollouts.prompt_ids, rollouts.completion_ids)
    scoring = scoring or dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    with torch.no_grad():
        trainer = policy.completion_logprobs(batch, **scoring)[0] * batch.completion_mask
    sampler = pad_logprobs(rollouts.sampler_logprobs, trainer.shape[1]) * batch.completion_mask
    return float((trainer - sampler).abs().max())


def likely_end_tokens(policy: Policy) -> Policy:
    """Make both end tokens likely at every step: add the mean final hidden state to their (tied) embedding rows."""
    model = policy.require_model()
    ids = torch.tensor(policy.encode_prompts(PROMPTS[:1]))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state.mean((0, 1))
        embeddings = model.get_output_embeddings().weight
        for token in (IM_END, ENDOFTEXT):
            embeddings[token] += 0.5 * hidden / hidden.norm()
    return policy


def assert_stops_at_every_end_token(policy: Policy, rollouts) -> None:
    ends = [ids[-1] for ids, truncated in zip(rollouts.completion_ids, rollouts.truncated) if not truncated]
    assert IM_END in ends and ENDOFTEXT in ends  # both end tokens were drawn and ended a completion
    for ids, truncated in zip(rollouts.completion_ids, rollouts.truncated):
        assert not any(token in (IM_END, ENDOFTEXT) for token in ids[:-1])  # nothing runs past an end token
        assert truncated == (ids[-1] not in (IM_END, ENDOFTEXT))


def test_end_tokens_of_the_stand_ins():
    assert stand_in(True).end_token_ids == [IM_END, ENDOFTEXT]
    assert stand_in(False).end_token_ids == [IM_END, ENDOFTEXT]  # the tokenizer's EOS is <|im_end|>
    math_chat = Policy("rloop/tiny-qwen2.5-math", use_chat_template=True)
    assert math_chat.end_token_ids == [IM_END, ENDOFTEXT]  # the template's turn end, then EOS
    assert Policy("rloop/tiny-qwen2.5-math", use_chat_template=False).end_token_ids == [ENDOFTEXT]
    assert Policy("rloop/micro-llama").end_token_ids == [2]  # no template, generation_config's EOS is the tokenizer's


def test_completions_are_closed_with_the_turn_end():
    assert stand_in(True).encode_completions(["5"])[0][-1] == IM_END
    math_chat = Policy("rloop/tiny-qwen2.5-math", use_chat_template=True)
    assert math_chat.encode_completions(["5"])[0][-1] == IM_END
    assert Policy("rloop/tiny-qwen2.5-math", use_chat_template=False).encode_completions(["5"])[0][-1] == ENDOFTEXT


@pytest.mark.parametrize("chat", [True, False])
def test_hf_sampler_logprobs_equal_the_trainers(chat):
    policy = stand_in(chat)
    assert policy.require_model().generation_config.repetition_penalty == 1.1  # present, and ignored
    torch.manual_seed(0)
    rollouts = HFGenerateEngine().generate(policy, PROMPTS, 8, SAMPLING)
    assert len(rollouts) == 16
    assert sampler_gap(policy, rollouts, SAMPLING) < TOLERANCE
    # the comparison has teeth: the untruncated distribution is far off
    assert sampler_gap(policy, rollouts, SAMPLING, temperature=0.7) > 0.01


def test_hf_engine_would_apply_the_repetition_penalty_if_the_generation_config_were_left_on(monkeypatch):
    policy = stand_in(True)
    monkeypatch.setattr(hf, "without_generation_config", lambda model: contextlib.nullcontext())
    torch.manual_seed(0)
    rollouts = HFGenerateEngine().generate(policy, PROMPTS, 8, SamplingParams(temperature=1.0, max_new_tokens=16))
    assert sampler_gap(policy, rollouts, SamplingParams(temperature=1.0)) > 0.01


def test_hf_engine_stops_at_the_second_end_token():
    policy = likely_end_tokens(stand_in(True))
    torch.manual_seed(0)
    rollouts = HFGenerateEngine().generate(policy, PROMPTS, 16, SamplingParams(temperature=1.0, max_new_tokens=16))
    assert_stops_at_every_end_token(policy, rollouts)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_sampler_logprobs_and_end_tokens():
    from rloop_lightning.rollout.vllm import VLLMEngine

    engine = VLLMEngine(enforce_eager=True, seed=0)
    try:
        for chat in (True, False):
            policy = stand_in(chat)
            engine.load_policy(policy)
            rollouts = engine.generate(policy, PROMPTS, 8, SAMPLING)
            assert len(rollouts) == 16
            assert sampler_gap(policy, rollouts, SAMPLING) < TOLERANCE
            assert sampler_gap(policy, rollouts, SAMPLING, temperature=0.7) > 0.01
        policy = likely_end_tokens(stand_in(True))
        engine.load_policy(policy)
        rollouts = engine.generate(policy, PROMPTS, 16, SamplingParams(temperature=1.0, max_new_tokens=16))
        assert_stops_at_every_end_token(policy, rollouts)
    finally:
        engine.close()


def test_truncated_scoring_stays_finite_for_a_token_outside_the_kept_set():
    """After an update (or by kernel rounding) a sampled token can fall outside the trainer's top-p set: it is
    kept (``algorithms.truncation``), so log-probs, entropy and gradients stay finite."""
    policy = stand_in(True)
    prompt_ids = policy.encode_prompts(PROMPTS[:1])
    batch = policy.make_batch(prompt_ids, [[7, 300, IM_END]])
    with torch.no_grad():
        full = policy.completion_logprobs(batch)[0]
    logprobs, entropy = policy.completion_logprobs(batch, with_entropy=True, top_p=0.05)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    assert (logprobs >= full - 1e-6).all()  # renormalised over fewer tokens: never less likely
    logprobs.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.require_model().parameters() if p.grad is not None)
