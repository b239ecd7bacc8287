"""Pulling the final answer out of a completion or a reference solution.

Pure string functions shared by the tasks:
    ``last_tagged``   content of the last ``<answer>...</answer>``
    ``last_boxed``    content of the last ``\\boxed{...}`` (balanced braces, LaTeX escapes respected)
    ``after_marker``  text after the last ``####`` (GSM8K's final-answer line)
    ``final_integer`` the integer after the last ``####``, else the last integer in the text
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"-?\d+")
_MAX_INTEGER_DIGITS = 30
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_tagged(text: str, tag: str = "answer") -> str | None:
    """Content of the last ``<tag>...</tag>`` in ``text``, or ``None`` if there is none."""
    matches = re.findall(f"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return matches[-1] if matches else None


def _braced_group(text: str, start: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]``; ``None`` if never closed.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` do not count as grouping braces.
    """
    depth = 0
    index = start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index]
        index += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, stripped.

    Handles nested braces (``\\boxed{\\frac{1}{2}}``), escaped braces (``\\boxed{\\{1,2\\}}``),
    whitespace before the brace and the brace-less form ``\\boxed 5``. Returns ``None`` when there is
    no box or the last one is never closed (a truncated completion).
    """
    position = max(text.rfind(command) for command in _BOX_COMMANDS)
    if position < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, position))
    rest_start = position + len(command)
    if rest_start < len(text) and text[rest_start].isalpha():
        return None  # a longer command such as \boxedfoo, not a box
    index = rest_start
    while index < len(text) and text[index] in " \t":
        index += 1
    if index < len(text) and text[index] == "{":
        content = _braced_group(text, index)
        return None if content is None else content.strip()
    if index > rest_start:  # "\boxed 5": the argument runs to the next space or "$"
        token = re.match(r"[^\s$]+", text[index:])
        return token.group(0) if token else None
    return None


def after_marker(text: str, marker: str = "####") -> str | None:
    """Text after the last ``marker``, stripped; ``None`` if ``marker`` does not occur."""
    position = text.rfind(marker)
    if position < 0:
        return None
    return text[position + len(marker) :].strip()


def final_integer(text: str) -> int | None:
    """The first integer after the last ``####``; without ``####``, the last integer in ``text``.

    Thousands separators after ``####`` are ignored; integers over 30 digits count as no answer.
    """
    tail = after_marker(text)
    if tail is not None:
        found = _INTEGER.search(tail.replace(",", ""))
        digits = found.group(0) if found else None
    else:
        found = _INTEGER.findall(text)
        digits = found[-1] if found else None
    if digits is None or len(digits.lstrip("-")) > _MAX_INTEGER_DIGITS:
        return None
    return int(digits)
