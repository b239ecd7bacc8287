"""What a reward function is called with: TRL's (1.16) keyword convention.

    function(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=...,
             log_metric=..., **columns) -> list[float | None]

``columns`` are every field of the completion's problem except ``prompt`` (as in TRL; the source dataset's own
fields included, e.g. MATH's ``solution``), aligned with the completions. Prompts and completions are
strings, or chat messages when the policy formats prompts with a chat template, as TRL passes them
for a conversational dataset: a prompt is the message list sent to the template, a completion is
``[{"role": "assistant", "content": text}]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

RESERVED_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
Messages = list[dict[str, str]]


@dataclass
class TrainerState:
    """Stand-in for the ``transformers.TrainerState`` that TRL passes as ``trainer_state``."""

    global_step: int = 0
    """Optimizer steps taken so far."""
    max_steps: int = -1
    """The trainer's ``max_steps`` (-1: bounded by epochs instead)."""
    epoch: float = 0.0
    """Current epoch."""


@dataclass(frozen=True)
class ChatFormat:
    """Conversational inputs, as the policy builds them for its chat template."""

    system_prompt: Optional[str] = None

    def prompt(self, text: str) -> Messages:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": text}]

    @staticmethod
    def completion(text: str) -> Messages:
        return [{"role": "assistant", "content": text}]


def chat_format(policy: Any) -> Optional[ChatFormat]:
    """The policy's conversational format, or None when it formats prompts as plain text."""
    return ChatFormat(policy.system_prompt) if getattr(policy, "use_chat_template", False) else None


def completion_text(completion: str | Messages) -> str:
    """A completion's text, whether plain or conversational (TRL reads ``completion[0]["content"]``)."""
    return completion if isinstance(completion, str) else completion[0]["content"]


@dataclass
class RewardBatch:
    """N completions with everything TRL passes a reward function about them, row-aligned."""

    prompts: list  # [N] str or messages
    completions: list  # [N] str or messages
    completion_ids: list  # [N] token ids of each completion (None where the caller has none)
    columns: dict[str, list]  # name -> [N]

    def __post_init__(self) -> None:
        reserved = sorted(set(self.columns) & set(RESERVED_KEYWORDS))
        if reserved:
            raise ValueError(f"problem fields {reserved} clash with the keywords reward functions are called with")
        for name, values in [("prompts", self.prompts), ("completion_ids", self.completion_ids),
                             *self.columns.items()]:
            if len(values) != len(self.completions):
                raise ValueError(f"{name!r} has {len(values)} entries for {len(self.completions)} completions")

    @classmethod
    def from_problems(cls, problems: Sequence[dict], prompt_index: Sequence[int], completions: Sequence[str],
                      completion_ids: Optional[Sequence[Sequence[int]]] = None,
                      chat: Optional[ChatFormat] = None) -> RewardBatch:
        """Completions of ``problems[prompt_index[i]]``; every problem field but ``prompt`` is a column."""
        keys = [key for key in (problems[0] if problems else {}) if key not in ("prompt", "completion", "completion_ids")]
        prompts = [problems[i]["prompt"] for i in prompt_index]
        texts = list(completions)
        return cls(
            prompts=[chat.prompt(p) for p in prompts] if chat else prompts,
            completions=[chat.completion(c) for c in texts] if chat else texts,
            completion_ids=[list(ids) for ids in completion_ids] if completion_ids is not None else [None] * len(texts),
            columns={key: [problems[i].get(key) for i in prompt_index] for key in keys},
        )

    def __len__(self) -> int:
        return len(self.completions)

    def rows(self, start: int, stop: int) -> RewardBatch:
        return RewardBatch(self.prompts[start:stop], self.completions[start:stop], self.completion_ids[start:stop],
                           {key: values[start:stop] for key, values in self.columns.items()})

    def keywords(self) -> dict[str, list]:
        return {"prompts": self.prompts, "completions": self.completions, "completion_ids": self.completion_ids,
                **self.columns}
