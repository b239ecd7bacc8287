"""The task interface: a source of verifiable problems plus the reward that checks them.

A *problem* is a plain dict with at least
    ``id``      str, unique within the task and split
    ``prompt``  str, the question shown to the model (no chat template applied)
    ``answer``  str, the gold answer
and any task-specific columns (``numbers``, ``target``...). Every column is passed to
reward functions as a keyword argument (TRL's convention), one list entry per completion.

A task is defined once, with its reward next to its data (nanochat's ``tasks/gsm8k.py`` shape).
"""

from __future__ import annotations

import copy
import random
from abc import ABC, abstractmethod
from typing import Callable, Literal, Optional

Split = Literal["train", "validation", "test", "ood"]
RewardFunction = Callable[..., list[Optional[float]]]


class Task(ABC):
    """A named set of problems in splits, plus the verifier that scores completions."""

    name: str = "task"

    @abstractmethod
    def load(self, split: Split) -> list[dict]:
        """Return the problems of ``split``. Raises ``ValueError`` naming the file/row on bad data."""

    @abstractmethod
    def reward(self, prompts: list[str], completions: list[str], **columns) -> list[Optional[float]]:
        """TRL-signature reward: 1.0 for a verified-correct completion, 0.0 otherwise."""

    def demonstration(self, problem: dict, draw: int = 0) -> str:
        """A correct completion written by a solver (synthetic tasks only).

        Tasks with several solutions per problem return a different one for different ``draw``.
        """
        raise NotImplementedError(f"task {self.name!r} has no solver to write demonstrations")

    def __getstate__(self) -> dict:
        """Pickle without the cached problems: reward workers need the verifier, not the data."""
        state = dict(self.__dict__)
        state.pop("_problems", None)
        state.pop("_keys", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_problems", {})
        self.__dict__.setdefault("_keys", {})

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "test", "ood")


class GeneratedTask(Task):
    """A synthetic task whose splits are drawn from a seed.

    Held-out splits are drawn first (each without repeats) and train excludes their keys, so no
    test or OOD problem is ever trained on. The validation split (for choosing settings without
    reading test) is drawn last, on its own random stream, from the training distribution without
    repeats and excluding every train, test and OOD key: adding it left the other splits byte for
    byte as they were, and it is drawn only when asked for. Subclasses draw problems; this class
    caches and copies.
    """

    def __init__(self, seed: int, sizes: dict[str, int]):
        self.seed = seed
        self.sizes = sizes
        self._problems: dict[str, list[dict]] = {}
        self._keys: dict[str, set] = {}  # split -> the keys drawn for it

    @abstractmethod
    def draw(self, split: str, rng: random.Random, count: int, exclude: set) -> list[tuple[object, dict]]:
        """``count`` (key, problem without id) pairs of ``split``, none with a key in ``exclude``."""

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "validation", "test", "ood")

    def load(self, split: Split) -> list[dict]:
        if split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; choose from {self.splits}")
        order = ("test", "ood", "train", "validation")  # validation last: the others never depend on it
        for name in order[: order.index(split) + 1]:
            if name not in self._problems:
                self._problems[name] = self._draw_split(name, {key for done in order[: order.index(name)]
                                                                for key in self._keys[done]})
        return copy.deepcopy(self._problems[split])

    def _draw_split(self, name: str, excluded: set) -> list[dict]:
        try:
            drawn = self.draw(name, random.Random(f"{self.name}:{self.seed}:{name}"), self.sizes[name], excluded)
        except ValueError as error:
            if name != "validation":
                raise
            raise ValueError(f"{error}. The validation split excludes every train key: the train split "
                             f"(num_train={self.sizes['train']}) leaves too few problems for "
                             f"num_validation={self.sizes['validation']}; lower num_validation or num_train "
                             "(the first N train problems are the same for every num_train >= N)") from None
        self._keys[name] = {key for key, _ in drawn}
        return [{"id": f"{self.name}-{name}-{index}", **problem} for index, (_, problem) in enumerate(drawn)]
