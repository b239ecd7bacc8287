"""The rollout engine interface: sample completions for prompts from the current policy.

An engine returns token ids, text and the *sampler's* per-token log-probs, so a phase can correct
for any mismatch between the sampler and the trainer (vLLM) without knowing which engine ran.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

from rloop_lightning.algorithms.truncation import TopKTies
from rloop_lightning.policy import Policy


@dataclass
class SamplingParams:
    """How completions are sampled. ``temperature=0`` is greedy decoding."""

    temperature: float = 1.0
    """Softmax temperature; 0 decodes greedily."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches ``top_p``."""
    top_k: int = 0
    """Sample from the ``top_k`` most likely tokens; 0 disables top-k."""
    max_new_tokens: int = 32
    """Completion length limit in tokens; a completion stopped here is *truncated* (no EOS)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables top-k), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def sampling_seed(seed: int, rollout_step: int, rank: int = 0, sampling_round: int = 0) -> int:
    """The seed of one rollout request: a function of (seed, rollout step, rank, dynamic-sampling round)
    alone, so the same batch is sampled the same way whichever process samples it, whenever (the
    synchronous phase, the asynchronous sampler, a resumed run), independently of the trainer's RNG
    stream. 63 bits of SHA-256 of the four numbers."""
    digest = hashlib.sha256(f"{seed}/{rollout_step}/{rank}/{sampling_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Rollouts:
    """Completions for ``num_samples`` samples of each prompt, grouped prompt by prompt."""

    prompt_index: list[int]  # [N] index of each completion's prompt in the request
    prompt_ids: list[list[int]]  # [N][P_i]
    completion_ids: list[list[int]]  # [N][C_i], ends with EOS unless truncated
    completions: list[str]  # [N] decoded text, special tokens removed
    sampler_logprobs: list[list[float]]  # [N][C_i] log-prob of each token under the sampler
    truncated: list[bool] = field(default_factory=list)  # [N] stopped by max_new_tokens, no EOS

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)


class RolloutEngine(ABC):
    """Samples completions from a policy. Implementations: ``HFGenerateEngine`` (default), ``VLLMEngine``."""

    # True when the sampler's log-probs can differ from the trainer's (another kernel, another copy
    # of the weights): GRPO then reweights tokens by truncated importance sampling by default.
    needs_importance_correction: bool = False

    @abstractmethod
    def generate(self, policy: Policy, prompts: list[str], num_samples: int,
                 sampling: SamplingParams, seed: Optional[int] = None) -> Rollouts:
        """Sample ``num_samples`` completions for each of ``prompts`` (raw prompts, no template).

        With ``seed`` (``sampling_seed``), the samples are a function of the weights, the prompts and
        the seed alone: the engine draws from its own seeded generator, not the process's RNG stream."""

    def top_k_ties(self) -> TopKTies:
        """How this engine's top-k treats tokens tied with the k-th largest logit, so that the trainer scores
        the same distribution (``algorithms.truncation``): ``keep`` all of them (transformers'
        ``TopKLogitsWarper``, the default) or keep ``exact`` ly k."""
        return "keep"

    def sync_weights(self, policy: Policy) -> None:
        """Called after each optimizer step; engines holding their own weights copy them here."""

    def load_policy(self, policy: Policy) -> None:
        """A new policy is about to be sampled from (e.g. another theta_k in held-out evaluation):
        engines holding their own weights load all of them here (or the policy's adapter)."""

    def close(self) -> None:
        """Free what the engine holds (an engine with its own copy of the model frees it); a later
        ``generate`` starts it again."""

    def release(self) -> None:
        """Between two uses far apart (held-out evaluations, with training in between): give back the
        memory the engine holds. Default: ``close``; an engine that can sleep sleeps instead."""
        self.close()

    def check_prompt_lengths(self, policy: Policy, prompt_ids: list[list[int]], sampling: SamplingParams,
                             max_context: Optional[int], names: Optional[list[str]] = None) -> None:
        """Refuse prompts that leave no room for ``max_new_tokens`` in the context; ``names`` (problem ids)
        name them in the error, else their index."""
        if max_context is None:
            return
        for index, ids in enumerate(prompt_ids):
            if len(ids) + sampling.max_new_tokens > max_context:
                longest = max(len(row) for row in prompt_ids)
                name = f"{names[index]!r}" if names else str(index)
                # no max_new_tokens >= 1 fits a prompt that fills the context on its own
                advice = (f"lower max_new_tokens to {max_context - longest} or less, or drop the longest prompts"
                          if longest < max_context else
                          f"the longest prompt fills the context on its own, so no max_new_tokens fits: shorten "
                          f"or drop the prompts of {max_context} tokens or more")
                raise ValueError(
                    f"prompt {name} has {len(ids)} tokens; with max_new_tokens={sampling.max_new_tokens} it exceeds "
                    f"the model context of {max_context} tokens ({policy.model_name_or_path}; the longest prompt "
                    f"has {longest}): {advice}"
                )
