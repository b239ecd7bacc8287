"""Format rewards: does a completion present its answer the way the prompt asked?

They check shape only, never correctness, and are meant to be added to an accuracy reward with a
small weight (``RewardRunner(weights=...)``). Completions are strings or chat messages.
"""

from __future__ import annotations

import re

from rloop_lightning.rewards.inputs import completion_text
from rloop_lightning.rewards.math import last_boxed

_BOXED_START = re.compile(r"\\boxed\s*\{")
_THINK_ANSWER = re.compile(
    r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL
)


def has_single_boxed_answer(completion: str) -> bool:
    """Exactly one ``\\boxed{`` whose braces balance and whose content is not blank."""
    if len(_BOXED_START.findall(completion)) != 1:
        return False
    content = last_boxed(completion)
    return content is not None and content.strip() != ""


def boxed_format(prompts: list, completions: list, **kwargs) -> list[float]:
    """TRL-signature reward: 1.0 when the completion has exactly one well-formed ``\\boxed{...}``."""
    return [1.0 if has_single_boxed_answer(completion_text(completion)) else 0.0 for completion in completions]


def has_think_answer_shape(completion: str) -> bool:
    """The whole completion is ``<think>...</think><answer>...</answer>``, each tag once, answer non-blank."""
    match = _THINK_ANSWER.match(completion)
    if match is None or match.group("answer").strip() == "":
        return False
    return all(completion.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))


def think_answer_format(prompts: list, completions: list, **kwargs) -> list[float]:
    """TRL-signature reward: 1.0 for ``<think>...</think>`` followed by ``<answer>...</answer>``, else 0.0."""
    return [1.0 if has_think_answer_shape(completion_text(completion)) else 0.0 for completion in completions]
