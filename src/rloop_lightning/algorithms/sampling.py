"""DAPO's batch shaping: dynamic sampling of informative groups, and overlong handling (Yu et al. 2025).

Dynamic sampling keeps only prompts whose ``G`` completions do not all get the same reward
(``0 < #correct < G`` for binary rewards): a zero-variance group has all advantages 0 and adds
nothing but dilution to the loss. DAPO re-samples until the batch holds ``target_groups``
informative groups; ``DynamicSamplingBuffer`` does the bookkeeping for that loop::

    buffer = DynamicSamplingBuffer(target_groups=batch_size, max_rounds=3)
    while buffer.needs_more:
        groups, rewards = generate_and_score(next_prompts())  # len(groups) == B, rewards [B, G]
        buffer.add(groups, rewards)
    sample = buffer.take()  # sample.groups (<= target_groups), sample.rewards [K, G]

What "the same reward" means is ``DynamicSamplingSignal``: ``accuracy`` (default, as DAPO) compares
the verifier's verdicts, so a group that is all correct (or all wrong) is dropped even when format
rewards or the soft overlong penalty make its total rewards differ; ``reward`` compares the total
reward, shaping terms included.

Departures from DAPO: after ``max_rounds`` rounds the step goes on with the informative groups
found so far (fewer than ``target_groups``, possibly none: the caller should then skip the step)
instead of raising; surplus groups beyond ``target_groups`` are dropped, not carried to the next
step (they would be off-policy there), as in verl.

Overlong handling: ``overlong_mask`` drops truncated completions from the loss (overlong
filtering); ``soft_overlong_penalty`` is DAPO's eq. 13, added to the task reward::

    R(L) = 0                              if L <= L_max - L_cache
         = (L_max - L_cache - L) / L_cache if L_max - L_cache < L <= L_max   (linear 0 -> -1)
         = -1                             if L > L_max
    (each times penalty_factor)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Generic, Literal, TypeVar

import torch
from torch import Tensor

from rloop_lightning.algorithms.registry import pick

GroupT = TypeVar("GroupT")
DynamicSamplingSignal = Literal["accuracy", "reward"]

_SIGNALS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "accuracy": lambda rewards, correct: correct.float(),
    "reward": lambda rewards, correct: rewards.float(),
}


def dynamic_sampling_signal(rewards: Tensor, correct: Tensor,  # [B, G] float, [B, G] bool
                            signal: DynamicSamplingSignal = "accuracy") -> Tensor:  # [B, G] float
    """The per-completion values whose spread makes a group informative: the verdicts (1.0 correct,
    0.0 not) for ``accuracy``, the total rewards for ``reward``."""
    if rewards.shape != correct.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and correct {tuple(correct.shape)} differ in shape")
    return pick(_SIGNALS, signal, "dynamic sampling signal")(rewards, correct)


def zero_variance_groups(rewards: Tensor, atol: float = 1e-6) -> Tensor:  # [B, G] -> bool [B]
    """True for groups whose rewards are all equal (max - min <= atol)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, G], got {tuple(rewards.shape)}")
    return (rewards.amax(dim=-1) - rewards.amin(dim=-1)) <= atol


def select_informative_groups(rewards: Tensor, atol: float = 1e-6) -> Tensor:  # [B, G] -> long [K]
    """Indices (ascending) of the groups with nonzero reward spread."""
    return torch.nonzero(~zero_variance_groups(rewards, atol)).flatten()


@dataclass
class DynamicSample(Generic[GroupT]):
    """What one training step gets from dynamic sampling."""

    groups: list[GroupT]  # K <= target_groups informative groups, in sampling order
    rewards: Tensor  # [K, G]
    rounds: int  # sampling rounds used
    groups_seen: int  # groups generated over all rounds
    groups_informative: int  # of those, with nonzero reward spread (may exceed K)

    @property
    def informative_fraction(self) -> float:
        return self.groups_informative / self.groups_seen if self.groups_seen else 0.0


@dataclass
class DynamicSamplingBuffer(Generic[GroupT]):
    """Accumulates informative groups over sampling rounds until full or out of rounds."""

    target_groups: int
    max_rounds: int = 3
    atol: float = 1e-6
    _groups: list[GroupT] = field(default_factory=list, init=False, repr=False)
    _rewards: list[Tensor] = field(default_factory=list, init=False, repr=False)  # each [k, G]
    _rounds: int = field(default=0, init=False)
    _seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.target_groups < 1 or self.max_rounds < 1:
            raise ValueError(
                f"need target_groups >= 1 and max_rounds >= 1, got {self.target_groups}, {self.max_rounds}"
            )

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    @property
    def is_full(self) -> bool:
        return self.num_groups >= self.target_groups

    @property
    def needs_more(self) -> bool:
        """True while neither full nor out of rounds: sample another round."""
        return not self.is_full and self._rounds < self.max_rounds

    def add(self, groups: Sequence[GroupT], rewards: Tensor) -> int:  # rewards [B, G]
        """Count one sampling round; keep its informative groups; return how many were kept."""
        if len(groups) != rewards.shape[0]:
            raise ValueError(f"{len(groups)} groups but rewards for {rewards.shape[0]}")
        keep = select_informative_groups(rewards, self.atol)  # [k]
        self._groups.extend(groups[i] for i in keep.tolist())
        self._rewards.append(rewards[keep])
        self._rounds += 1
        self._seen += len(groups)
        return len(keep)

    def take(self) -> DynamicSample[GroupT]:
        """The first ``target_groups`` informative groups (or all there are); empties the buffer."""
        if not self._rewards:
            raise RuntimeError("take() before any add(): no sampling round was recorded")
        rewards = torch.cat(self._rewards)[: self.target_groups]  # [K, G]
        sample = DynamicSample(
            groups=self._groups[: self.target_groups],
            rewards=rewards,
            rounds=self._rounds,
            groups_seen=self._seen,
            groups_informative=self.num_groups,
        )
        self._groups, self._rewards, self._rounds, self._seen = [], [], 0, 0
        return sample


def overlong_mask(truncated: Tensor) -> Tensor:  # bool [N] -> float [N]
    """1.0 for completions that ended on their own, 0.0 for truncated ones (multiply into the loss mask)."""
    return (~truncated.bool()).float()


def soft_overlong_penalty(
    lengths: Tensor,  # [N] completion lengths in tokens
    max_completion_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> Tensor:  # [N] float, in [-penalty_factor, 0]
    """DAPO's soft overlong punishment; see the module docstring."""
    if not 0 < buffer_length <= max_completion_length:
        raise ValueError(
            f"need 0 < buffer_length <= max_completion_length, got {buffer_length}, {max_completion_length}"
        )
    lengths = lengths.float()
    safe_length = max_completion_length - buffer_length
    in_buffer = (safe_length - lengths) / buffer_length * penalty_factor  # [N]
    penalty = torch.where(
        lengths <= max_completion_length, in_buffer, torch.full_like(lengths, -penalty_factor)
    )
    return torch.where(lengths <= safe_length, torch.zeros_like(lengths), penalty)
