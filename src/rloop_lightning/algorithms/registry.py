"""Picking a variant from a registry of small functions by its ``Literal`` name."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


def pick(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``, or a ``ValueError`` that says ``unknown <what>`` and lists the choices."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(registry)}") from None
