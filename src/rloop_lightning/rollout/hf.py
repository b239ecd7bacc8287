"""Rollouts with Hugging Face ``generate``: the default engine, on CPU or GPU, with or without LoRA."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from rloop_lightning.policy import Policy, cache_argument, pad, shared_prefix_cache
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


class HFGenerateEngine(RolloutEngine):
    """Batched sampling through ``model.generate``.

    ``generate`` keeps every step's processed logits to report sampler log-probs, B x T x V floats
    per call: ``batch_size`` bounds that; for long completions with a large vocabulary on a GPU, the
    vLLM engine is the better choice.

    With ``share_prompts`` (default) the prompts of a call are pre-filled once per distinct prompt
    and the KV cache is copied to their samples: the same tokens and log-probs as a pre-fill of
    every row, at 1/n of the pre-fill cost for n samples per prompt.

    Args:
        batch_size: completions generated per ``generate`` call (memory knob).
        share_prompts: pre-fill each distinct prompt once per call.
    """

    def __init__(self, batch_size: int = 256, share_prompts: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.share_prompts = share_prompts

    def generate(self, policy: Policy, prompts: list[str], num_samples: int,
                 sampling: SamplingParams) -> Rollouts:
        model = policy.require_model()
        prompt_ids = policy.encode_prompts(prompts)
        self.check_prompt_lengths(policy, prompt_ids, sampling, policy.context_length)
        requests = [(index, prompt_ids[index]) for index in range(len(prompts)) for _ in range(num_samples)]
        result = Rollouts([], [], [], [], [], [])
        with inference_mode(model):
            for start in range(0, len(requests), self.batch_size):
                self._generate_chunk(policy, requests[start: start + self.batch_size], sampling, result)
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
        output = policy.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **cache,
            max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None if greedy else sampling.top_k,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            output_scores=True, return_dict_in_generate=True, use_cache=True, synced_gpus=synced,
        )
        generated = output.sequences[:, input_ids.shape[1]:]  # [B, T]
        # output.scores: T tensors [B, V] of processed (sampling) logits; gather step by step rather
        # than stacking a [B, T, V] copy
        logprobs = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, generated[:, t, None]).squeeze(-1)
                                for t, step in enumerate(output.scores)], dim=1)  # [B, T]
        eos = generated == tokenizer.eos_token_id
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
