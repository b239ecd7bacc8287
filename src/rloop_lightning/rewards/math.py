"""Math answer correctness reward: extract the final answer, compare it to the gold with math-verify.

The completion's final answer is, in order of preference:
    1. the content of the last balanced ``\\boxed{...}``,
    2. what follows the last GSM8K-style ``#### ``,
    3. whatever math-verify's own extraction finds (last LaTeX/number, "final answer is ...").
The gold is the text after ``####`` when it has one (GSM8K solutions), else the whole string;
thousands separators are dropped from plain numbers (``1,000`` -> ``1000``).

Model output is only ever parsed (latex2sympy / sympy's parser via math-verify), never ``eval``-ed.

Timeouts: math-verify guards each parse/compare with ``signal.alarm``, which works only in the main
thread and, worse, re-arms and then cancels the process-wide ``ITIMER_REAL`` timer. So we let it arm
its own alarm only in the main thread when no other timer is armed; under ``RewardRunner`` (which
arms a per-item timer in its workers) math-verify runs without one and the runner enforces the limit.
"""

from __future__ import annotations

import logging
import re
import signal
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rloop_lightning.rewards.inputs import completion_text
from rloop_lightning.rewards.answers import last_boxed

MATH_VERIFY_TIMEOUT_S = 5
"""Seconds math-verify may spend per parse/compare when it is allowed to arm its own alarm."""

_ANSWER_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_GSM8K_MARKER = "####"
_THOUSANDS_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that we disabled its timeout; we did so on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def after_gsm8k_marker(text: str) -> str | None:
    """The first line after the last ``####`` (GSM8K's answer line), stripped; None if absent/empty."""
    if _GSM8K_MARKER not in text:
        return None
    answer = text.rsplit(_GSM8K_MARKER, 1)[1].strip().splitlines()
    return answer[0].strip() if answer and answer[0].strip() else None


def normalize_answer(answer: str) -> str:
    """Drop ``$`` signs, a trailing full stop, and thousands separators of plain numbers."""
    answer = answer.strip().strip("$").strip()
    answer = answer.removesuffix(".").strip()
    return _THOUSANDS_NUMBER.sub(lambda match: match.group(0).replace(",", ""), answer)


def _math_verify_timeout() -> int | None:
    """math-verify's own alarm, only where it cannot break anything (see module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        return None
    return MATH_VERIFY_TIMEOUT_S


def parse_answer(answer: str, timeout: int | None) -> list:
    """Parse an already-extracted answer (``18``, ``\\frac{1}{2}``) into math-verify's form."""
    return parse(f"${normalize_answer(answer)}$", extraction_config=_ANSWER_CONFIG, parsing_timeout=timeout)


def parse_completion(completion: str, timeout: int | None) -> list:
    """Extract and parse a completion's final answer; [] when there is none."""
    answer = last_boxed(completion)
    if answer is None:
        answer = after_gsm8k_marker(completion)
    if answer is not None:
        return parse_answer(answer, timeout)
    return parse(completion, extraction_config=_ANSWER_CONFIG, parsing_timeout=timeout)


def parse_gold(gold: str, timeout: int | None) -> list:
    """Parse a gold answer: the ``####`` line of a GSM8K solution, else the whole string."""
    return parse_answer(after_gsm8k_marker(gold) or gold, timeout)


def is_correct(completion: str, gold: str) -> bool:
    """True when the completion's final answer equals the gold (math-verify's equivalence)."""
    timeout = _math_verify_timeout()
    gold_parsed = parse_gold(str(gold), timeout)
    predicted = parse_completion(completion, timeout)
    if not gold_parsed or not predicted:
        return False
    return verify(gold_parsed, predicted, timeout_seconds=timeout)


def math_accuracy(prompts: list, completions: list, answer: list[str], **kwargs) -> list[float]:
    """TRL-signature reward: 1.0 where the completion's final answer matches ``answer``, else 0.0.

    Completions are strings or chat messages. An unparsable gold scores 0.0 (not None), so a broken
    dataset shows up as zero accuracy.
    """
    return [1.0 if is_correct(completion_text(completion), gold) else 0.0
            for completion, gold in zip(completions, answer)]
