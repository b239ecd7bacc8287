"""Rollouts with Hugging Face ``generate``: the default engine, on CPU or GPU, with or without LoRA."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rloop_lightning.agreement import values_of_ranks
from rloop_lightning.forwards import cache_argument, pad, shared_prefix_cache
from rloop_lightning.policy import Policy
from rloop_lightning.rollout.base import RolloutEngine, Rollouts, SamplingParams
from rloop_lightning.strategies import forwards_in_lockstep


@contextmanager
def inference_mode(model: torch.nn.Module):
    """Eval mode with the KV cache on, restoring the training state afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextmanager
def without_generation_config(model: torch.nn.Module):
    """Hide the model's ``generation_config`` from ``generate`` (a blank one stands in), restoring it after.

    ``generate`` fills every setting it is not given from the model's ``generation_config``:
    Qwen2.5-Instruct's adds a repetition penalty (and top-k 20, top-p 0.8, temperature 0.7), so
    samples would come from another distribution than the one the trainer scores. With a blank
    config only what the engine passes applies: ``SamplingParams``, nothing else.
    """
    holders = [module for module in model.modules() if isinstance(module.__dict__.get("generation_config"),
                                                                   GenerationConfig)]
    saved = [module.generation_config for module in holders]
    for module in holders:
        module.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for module, config in zip(holders, saved):
            module.generation_config = config


@contextmanager
def seeded_sampling(model: torch.nn.Module, seed: Optional[int]):
    """``generate`` draws tokens from the global RNG of the model's device (``torch.multinomial``
    takes no generator there): with a ``seed``, draw them from a fork of it seeded with ``seed``, and
    give the trainer its own stream back afterwards, untouched. ``None``: the global stream, as is."""
    if seed is None:
        yield
        return
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        torch.manual_seed(seed)
        yield


class ChosenTokenLogprobs(LogitsProcessor):
    """A logits processor that records the sampled token's log-prob at each decoding step.

    ``generate`` calls it with the scores of step t (after the sampling warpers, which come before
    it in the list) and, one call later, with ``input_ids`` ending in the token drawn from them; so
    it holds one step's scores [B, V] until the next call and keeps a [B] vector per step. Memory
    is B x V for the pending step plus B x T floats, not the B x T x V of ``output_scores``.
    """

    def __init__(self):
        self._pending: Optional[torch.Tensor] = None  # [B, V] scores of the last step, token not seen yet
        self._steps: list[torch.Tensor] = []  # T x [B]

    def _settle(self, tokens: torch.Tensor) -> None:  # tokens [B]: drawn from the pending scores
        scores = self._pending
        self._steps.append(scores.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(scores, -1))
        self._pending = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self._settle(input_ids[:, -1])
        self._pending = scores.float()
        return scores

    def logprobs(self, generated: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T]
        """Log-probs of ``generated`` (the new tokens ``generate`` returned), step by step.

        ``generate`` may run and then undo steps past the end (deferred stop checks): those records
        come after the T kept ones and are dropped.
        """
        if self._pending is not None and len(self._steps) < generated.shape[1]:
            self._settle(generated[:, len(self._steps)])
        if len(self._steps) < generated.shape[1]:
            raise RuntimeError(f"recorded {len(self._steps)} steps for {generated.shape[1]} generated tokens")
        return torch.stack(self._steps[: generated.shape[1]], dim=1)


def sampling_processors(sampling: SamplingParams) -> list:
    """Temperature, top-k, top-p warpers in ``generate``'s own order (it is told to add none itself)."""
    warpers = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
    return warpers


class HFGenerateEngine(RolloutEngine):
    """Batched sampling through ``model.generate``.

    Sampler log-probs are those of the distribution the tokens were drawn from (temperature, top-k,
    top-p applied), recorded step by step by ``ChosenTokenLogprobs``: a call holds one step's
    [B, V] scores, not all T of them, plus the KV cache (``batch_size`` bounds both).

    Samples come from ``SamplingParams`` alone: the model's ``generation_config`` sampling settings
    and processors (Qwen2.5-Instruct's repetition penalty) are not applied, because the trainer
    scores ``softmax(logits / T)`` truncated by top-k/top-p and nothing else; a completion ends at
    any of ``Policy.end_token_ids`` (the generation_config's end tokens among them).

    With ``share_prompts`` (default) the prompts of a call are pre-filled once per distinct prompt
    and the KV cache is copied to their samples: the same tokens and log-probs as a pre-fill of
    every row, at 1/n of the pre-fill cost for n samples per prompt.

    Args:
        batch_size: completions generated per ``generate`` call (memory knob).
        share_prompts: pre-fill each distinct prompt once per call.
        max_batch_tokens: at most this many KV-cache token slots per ``generate`` call, each
            completion taking (the call's widest prompt + ``max_new_tokens``): the cache is then at
            most this x the model's KV bytes per token (Qwen2.5-1.5B: 28.7 KB in bf16, 57.5 KB under
            QLoRA, whose cache is float32), whatever the prompt lengths. Calls hold
            ``min(batch_size, max_batch_tokens // that)`` completions; ``None`` (default) splits by
            ``batch_size`` alone.
    """

    def __init__(self, batch_size: int = 256, share_prompts: bool = True, max_batch_tokens: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 (or null), got {max_batch_tokens}")
        self.batch_size = batch_size
        self.share_prompts = share_prompts
        self.max_batch_tokens = max_batch_tokens

    def completions_per_call(self, policy: Policy, prompt_ids: list[list[int]], sampling: SamplingParams) -> int:
        """``batch_size``, lowered so that a call's completions x (widest prompt + ``max_new_tokens``) fit
        ``max_batch_tokens``; the widest prompt of all ranks when their forwards run in lockstep (FSDP2),
        so that every rank's calls hold as many completions (``generate`` also agrees on the number of calls)."""
        if self.max_batch_tokens is None:
            return self.batch_size
        widest = max((len(ids) for ids in prompt_ids), default=0)
        if forwards_in_lockstep(policy.model):
            widest_everywhere = torch.tensor(widest, device=next(policy.model.parameters()).device)
            torch.distributed.all_reduce(widest_everywhere, op=torch.distributed.ReduceOp.MAX)
            widest = int(widest_everywhere)
        slots = widest + sampling.max_new_tokens
        if slots > self.max_batch_tokens:
            raise ValueError(f"HFGenerateEngine max_batch_tokens={self.max_batch_tokens} cannot hold even one "
                             f"completion: the widest prompt has {widest} tokens and max_new_tokens="
                             f"{sampling.max_new_tokens}, so one needs {slots}; raise max_batch_tokens to at least "
                             f"{slots} or shorten the prompts or max_new_tokens")
        return min(self.batch_size, self.max_batch_tokens // slots)

    def generate(self, policy: Policy, prompts: list[str], num_samples: int,
                 sampling: SamplingParams, seed: Optional[int] = None) -> Rollouts:
        model = policy.require_model()
        prompt_ids = policy.encode_prompts(prompts)
        self.check_prompt_lengths(policy, prompt_ids, sampling, policy.context_length)
        requests = [(index, prompt_ids[index]) for index in range(len(prompts)) for _ in range(num_samples)]
        per_call = self.completions_per_call(policy, prompt_ids, sampling)
        starts = range(0, len(requests), per_call)
        # FSDP2: every call all-gathers the shards, so every rank makes as many calls as the busiest one
        # (ranks sample different numbers of prompts: dynamic sampling's refills, evaluation's shares)
        calls = int(max(values_of_ranks(len(starts)))) if forwards_in_lockstep(policy.model) else len(starts)
        result = Rollouts([], [], [], [], [], [])
        with inference_mode(model), seeded_sampling(model, seed):
            for start in starts:
                self._generate_chunk(policy, requests[start: start + per_call], sampling, result)
            for _ in range(calls - len(starts)):  # after this rank's own calls: its samples stay as they were
                self._generate_chunk(policy, requests[:1] or [(0, [policy.tokenizer.pad_token_id] * 2)], sampling,
                                     Rollouts([], [], [], [], [], []))  # a call for the others' gathers, discarded
        return result

    def _generate_chunk(self, policy: Policy, requests, sampling: SamplingParams, result: Rollouts) -> None:
        tokenizer = policy.tokenizer
        device = next(policy.model.parameters()).device
        input_ids, attention_mask = pad([ids for _, ids in requests], tokenizer.pad_token_id, side="left")
        greedy = sampling.temperature == 0
        # FSDP2 shards all-gather in every forward: ranks must run the same number of decoding
        # steps, so generate keeps stepping until every rank is done (HF's synced_gpus), and every
        # rank pre-fills, repeated prompts or not
        synced = forwards_in_lockstep(policy.model)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        cache = {}
        if self.share_prompts and input_ids.shape[1] > 1:
            # all prompt tokens but the last go into the cache; generate runs the last one and samples
            shared = shared_prefix_cache(policy.model, input_ids[:, :-1], attention_mask[:, :-1], force=synced)
            if shared is not None:
                cache = {cache_argument(policy.model): shared[1]}
        # the warpers run in our processor list, right before the recorder, so it sees the scores
        # that are sampled from; generate adds none of its own (temperature 1, top-k 0, top-p 1, and
        # the model's generation_config hidden: no repetition penalty or other processor from it)
        recorder = ChosenTokenLogprobs()
        processors = LogitsProcessorList([*([] if greedy else sampling_processors(sampling)), recorder])
        end_ids = policy.end_token_ids  # every end token: the chat turn's, the EOS, the generation_config's
        with without_generation_config(policy.model):
            output = policy.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **cache,
                max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else 1.0, top_p=None if greedy else 1.0, top_k=None if greedy else 0,
                logits_processor=processors,
                eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True, use_cache=True, synced_gpus=synced,
            )
        generated = output.sequences[:, input_ids.shape[1]:]  # [B, T]
        logprobs = recorder.logprobs(generated)  # [B, T]
        eos = torch.isin(generated, torch.tensor(end_ids, device=generated.device))
        has_eos = eos.any(1)
        lengths = torch.where(has_eos, eos.int().argmax(1) + 1, torch.full_like(has_eos, generated.shape[1], dtype=torch.long))
        for row, (index, ids) in enumerate(requests):
            length = int(lengths[row])
            completion = generated[row, :length].tolist()
            result.prompt_index.append(index)
            result.prompt_ids.append(list(ids))
            result.completion_ids.append(completion)
            result.completions.append(policy.decode(completion))
            result.sampler_logprobs.append(logprobs[row, :length].tolist())
            result.truncated.append(not bool(has_eos[row]))
