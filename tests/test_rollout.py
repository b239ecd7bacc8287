"""Rollout engines: the SamplingParams contract and the Hugging Face ``generate`` engine."""

from __future__ import annotations

import math

import pytest
import torch

from rloop_lightning.forwards import pad
from rloop_lightning.rollout.base import Rollouts, SamplingParams
from rloop_lightning.rollout.hf import ChosenTokenLogprobs, HFGenerateEngine, inference_mode

PROMPTS = ["3 5 7 -> 22\n", "1 2 -> 3\n"]  # different lengths: the batch is left-padded


def check_grouping(rollouts: Rollouts, policy, num_samples: int) -> None:
    prompt_ids = policy.encode_prompts(PROMPTS)
    assert rollouts.prompt_index == [i for i in range(len(PROMPTS)) for _ in range(num_samples)]
    assert rollouts.prompt_ids == [prompt_ids[i] for i in rollouts.prompt_index]
    assert len(rollouts) == len(rollouts.completion_ids) == len(rollouts.sampler_logprobs) == len(
        rollouts.truncated) == len(PROMPTS) * num_samples
    assert rollouts.completions == [policy.decode(ids) for ids in rollouts.completion_ids]
    assert rollouts.num_completion_tokens == sum(len(ids) for ids in rollouts.completion_ids)


def test_generate_groups_samples_prompt_by_prompt(micro_policy):
    torch.manual_seed(0)
    rollouts = HFGenerateEngine().generate(micro_policy, PROMPTS, 3, SamplingParams(max_new_tokens=8))
    check_grouping(rollouts, micro_policy, 3)
    assert rollouts.prompt_index == [0, 0, 0, 1, 1, 1]


def test_completions_end_with_eos_unless_truncated(micro_policy):
    torch.manual_seed(0)
    sampling = SamplingParams(max_new_tokens=16)
    rollouts = HFGenerateEngine().generate(micro_policy, PROMPTS, 8, sampling)
    eos = micro_policy.tokenizer.eos_token_id
    for ids, truncated in zip(rollouts.completion_ids, rollouts.truncated):
        assert eos not in ids[:-1]  # nothing is kept after the first EOS
        if truncated:
            assert len(ids) == sampling.max_new_tokens and ids[-1] != eos
        else:
            assert ids[-1] == eos and 1 <= len(ids) <= sampling.max_new_tokens
    assert any(rollouts.truncated) and not all(rollouts.truncated)  # both branches were exercised


def test_sampler_logprobs_match_policy_logprobs(micro_policy):
    torch.manual_seed(1)
    rollouts = HFGenerateEngine().generate(micro_policy, PROMPTS, 3, SamplingParams(temperature=1.0, max_new_tokens=12))
    batch = micro_policy.make_batch(rollouts.prompt_ids, rollouts.completion_ids)
    with torch.no_grad():
        logprobs, _ = micro_policy.completion_logprobs(batch)
    for row, sampler in enumerate(rollouts.sampler_logprobs):
        assert len(sampler) == len(rollouts.completion_ids[row])
        torch.testing.assert_close(logprobs[row, : len(sampler)], torch.tensor(sampler), atol=1e-4, rtol=0)


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_prefill_samples_the_same_rollouts(lora):
    """Pre-filling each distinct prompt once changes the cost, not the samples: same seed, same tokens."""
    from rloop_lightning.policy import LoraSettings, Policy

    torch.manual_seed(0)
    policy = Policy("rloop/micro-llama", lora=LoraSettings(r=4) if lora else None)
    policy.load_model()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12)
    runs = []
    for share in (False, True):
        torch.manual_seed(3)
        runs.append(HFGenerateEngine(batch_size=5, share_prompts=share).generate(policy, PROMPTS, 4, sampling))
    plain, shared = runs
    assert shared.completion_ids == plain.completion_ids and shared.prompt_ids == plain.prompt_ids
    assert len(set(map(tuple, plain.completion_ids))) > 2  # real sampling, not one repeated string
    for a, b in zip(shared.sampler_logprobs, plain.sampler_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_shared_prompt_prefill_runs_each_distinct_prompt_once(micro_policy):
    seen = []
    hook = micro_policy.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    torch.manual_seed(0)
    HFGenerateEngine().generate(micro_policy, PROMPTS, 4, SamplingParams(max_new_tokens=3))
    hook.remove()
    width = max(len(ids) for ids in micro_policy.encode_prompts(PROMPTS))
    # 2 distinct prompts pre-filled up to their last token, then generate feeds 8 rows one token at a time
    assert seen[0] == (2, width - 1) and seen[1:] == [(8, 1)] * 3


def test_greedy_is_deterministic_and_independent_of_chunking(micro_policy):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=10)
    torch.manual_seed(0)
    first = HFGenerateEngine().generate(micro_policy, PROMPTS, 2, sampling)
    torch.manual_seed(1)
    second = HFGenerateEngine().generate(micro_policy, PROMPTS, 2, sampling)
    assert first.completion_ids == second.completion_ids
    assert first.completion_ids[0] == first.completion_ids[1] and first.completion_ids[2] == first.completion_ids[3]
    for prompt_ids, completion_ids in zip(first.prompt_ids, first.completion_ids):  # each token is the argmax
        ids = torch.tensor(prompt_ids + completion_ids)
        with torch.no_grad():
            logits = micro_policy.model(input_ids=ids[None]).logits[0]
        assert logits[len(prompt_ids) - 1: -1].argmax(-1).tolist() == completion_ids
    chunked = HFGenerateEngine(batch_size=3).generate(micro_policy, PROMPTS, 2, sampling)
    assert chunked.completion_ids == first.completion_ids
    assert chunked.prompt_index == first.prompt_index == [0, 0, 1, 1]


def test_batch_size_chunking_keeps_every_request(micro_policy):
    torch.manual_seed(0)
    rollouts = HFGenerateEngine(batch_size=4).generate(micro_policy, PROMPTS, 3, SamplingParams(max_new_tokens=6))
    check_grouping(rollouts, micro_policy, 3)


def test_a_prompt_too_long_for_the_context_fails_before_generating(micro_policy, monkeypatch):
    engine = HFGenerateEngine()

    def must_not_generate(*args, **kwargs):
        raise AssertionError("generate ran for a prompt that cannot fit")

    monkeypatch.setattr(engine, "_generate_chunk", must_not_generate)
    too_long = "1" * 250  # micro-llama: max_position_embeddings = 256
    with pytest.raises(ValueError, match="prompt 1 has 250 tokens; with max_new_tokens=8 it exceeds the model "
                                         "context of 256 tokens"):
        engine.generate(micro_policy, ["1 -> 1\n", too_long], 2, SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="prompt 0 has 1000 tokens"):
        engine.generate(micro_policy, ["1" * 1000], 1, SamplingParams(max_new_tokens=1))


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
])
def test_sampling_params_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_engine_batch_size_validation():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        HFGenerateEngine(batch_size=0)


@pytest.mark.parametrize("training", [True, False])
def test_generation_restores_training_mode(micro_policy, training):
    micro_policy.model.train(training)
    HFGenerateEngine().generate(micro_policy, PROMPTS[:1], 1, SamplingParams(max_new_tokens=2))
    assert micro_policy.model.training is training
    assert all(module.training is training for module in micro_policy.model.modules())
    assert torch.is_grad_enabled()
    assert micro_policy.model.config.use_cache is False


def test_sampler_logprobs_match_the_policy_at_the_sampling_temperature(micro_policy):
    torch.manual_seed(0)
    sampling = SamplingParams(temperature=1.7, max_new_tokens=6)
    rollouts = HFGenerateEngine().generate(micro_policy, ["3 5 7 -> 22\n", "1 2 -> 3\n"], 3, sampling)
    batch = micro_policy.make_batch(rollouts.prompt_ids, rollouts.completion_ids)
    logprobs, _ = micro_policy.completion_logprobs(batch, temperature=1.7)
    untempered, _ = micro_policy.completion_logprobs(batch)
    mask = batch.completion_mask.bool()
    sampled = torch.tensor([lp for row in rollouts.sampler_logprobs for lp in row])
    assert torch.allclose(logprobs[mask], sampled, atol=1e-4)
    assert not torch.allclose(untempered[mask], sampled, atol=1e-2)


def test_recorder_keeps_the_chosen_tokens_log_probs_step_by_step():
    """Hand case: 2 rows, 3 steps over a 3-token vocabulary; one extra (undone) step is dropped."""
    recorder = ChosenTokenLogprobs()
    steps = [torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]),
             torch.tensor([[3.0, 0.0, 0.0], [0.0, -math.inf, 0.0]]),  # -inf: a token top-p removed
             torch.tensor([[0.0, 0.0, 5.0], [2.0, 0.0, 0.0]]),
             torch.tensor([[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]])]  # a step generate later undoes
    chosen = torch.tensor([[2, 0, 1, 0], [1, 2, 0, 0]])
    prompt = torch.tensor([[7], [7]])
    for t, scores in enumerate(steps):
        assert recorder(torch.cat([prompt, chosen[:, :t]], 1), scores) is scores  # scores pass through
    logprobs = recorder.logprobs(chosen[:, :3])
    expected = torch.stack([torch.log_softmax(steps[t], -1).gather(-1, chosen[:, t, None]).squeeze(-1)
                            for t in range(3)], 1)
    torch.testing.assert_close(logprobs, expected)
    # by hand: row 1 at step 1 picks token 2 of [0, -inf, 0]: log 1/2
    assert logprobs[1, 1].item() == pytest.approx(math.log(0.5))
    assert logprobs[0, 0].item() == pytest.approx(2 - math.log(1 + math.e + math.e ** 2))


def test_recorder_reads_the_last_token_from_the_output():
    recorder = ChosenTokenLogprobs()
    recorder(torch.tensor([[1]]), torch.tensor([[0.0, 0.0]]))
    recorder(torch.tensor([[1, 0]]), torch.tensor([[0.0, math.log(3.0)]]))
    torch.testing.assert_close(recorder.logprobs(torch.tensor([[0, 1]])),
                               torch.tensor([[math.log(0.5), math.log(0.75)]]))
    with pytest.raises(RuntimeError, match="recorded 2 steps for 3 generated tokens"):
        recorder.logprobs(torch.tensor([[0, 1, 1]]))


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 5, 1.0), (0.0, 0, 1.0)])
def test_same_tokens_and_log_probs_as_generate_with_output_scores(micro_policy, temperature, top_k, top_p):
    """The engine's recorded log-probs equal those computed from ``generate``'s own warpers and
    ``output_scores`` (what the engine did before), with the same seed giving the same tokens."""
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10)
    torch.manual_seed(5)
    ours = HFGenerateEngine(share_prompts=False).generate(micro_policy, PROMPTS, 3, sampling)
    model, tokenizer = micro_policy.model, micro_policy.tokenizer
    input_ids, attention_mask = pad([ids for ids in ours.prompt_ids], tokenizer.pad_token_id, side="left")
    greedy = temperature == 0
    torch.manual_seed(5)
    with inference_mode(model):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10,
                                do_sample=not greedy, temperature=None if greedy else temperature,
                                top_p=None if greedy else top_p, top_k=None if greedy else top_k,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                output_scores=True, return_dict_in_generate=True)
    generated = output.sequences[:, input_ids.shape[1]:]
    for row, ids in enumerate(ours.completion_ids):
        assert generated[row, : len(ids)].tolist() == ids
        reference = [torch.log_softmax(output.scores[t][row], -1)[token].item() for t, token in enumerate(ids)]
        torch.testing.assert_close(torch.tensor(ours.sampler_logprobs[row]), torch.tensor(reference),
                                   atol=1e-6, rtol=0)
