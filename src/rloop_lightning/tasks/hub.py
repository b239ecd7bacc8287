"""Real math datasets as tasks: GSM8K, MATH and DAPO-Math-17k.

Each adapter maps one source record to a problem ``{id, prompt, answer, ...}``; the reward is
``rloop_lightning.rewards.math_accuracy`` (imported when first called). A *source* is one of
    a hub dataset id      ``openai/gsm8k`` (loaded with ``datasets.load_dataset``); a ``:split``
                          suffix picks the hub split, e.g. ``HuggingFaceH4/aime_2024:train``
                          (default: the split's own name, ``test`` for ood)
    a local file or glob  ``data/test.jsonl``, ``data/*.parquet`` (read with ``data.records``)
    a local directory     given as ``path``: the files named ``<split>*.jsonl|parquet`` inside;
                          given as ``<split>_path``: every jsonl/parquet file inside
A source that does not exist locally goes to the Hub only when it has a hub id's form (``name`` or
``org/name``) and ``org`` is not a local directory: ``data/gsm8k`` next to a ``data/`` directory, or
``data/gsm8k/test``, is refused at once as a missing file, naming the task and field, not tried on the Hub.
Malformed data fails at ``load`` with the file and line (jsonl) or row (parquet, hub) in the message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from rloop_lightning.records import RecordError, expand_paths, iter_records
from rloop_lightning.rewards.answers import after_marker, last_boxed
from rloop_lightning.tasks.base import Split, Task

DEFAULT_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
_DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
_DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


class _BadRecord(ValueError):
    """A record lacks what the adapter needs; the loader adds the file and line."""


def _require(record: dict, field: str):
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _BadRecord(f"missing field {field!r}; present: {sorted(record)}")
    return value


def _text(record: dict, field: str, numbers: bool = False) -> str:
    """``record[field]`` as non-empty text; with ``numbers``, an int or float (a numeric answer) too."""
    value = _require(record, field)
    if isinstance(value, str):
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _BadRecord(f"field {field!r} is {type(value).__name__} ({str(value)[:60]!r}), expected text")


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+)?")  # name or org/name, with an optional :split


def _is_local(source: str) -> bool:
    """A local path, not a hub id: it exists, is a glob or a data file name, starts like a path, is not of the
    hub's ``name``/``org/name`` form (``data/gsm8k/test``), or starts with a local directory (``data/gsm8k``
    where ``./data`` exists: a missing local path, never sent to the Hub)."""
    return (
        os.path.exists(source)
        or any(char in source for char in "*?[")
        or Path(source).suffix in (".jsonl", ".json", ".parquet")
        or source.startswith((".", "/", "~"))
        or not _HUB_ID.fullmatch(source)
        or ("/" in source and os.path.isdir(source.split("/")[0]))
    )


def _jsonl_line(path: Path, record_index: int) -> int:
    """The 1-based line of the ``record_index``-th record of a jsonl file (blank lines are skipped)."""
    with open(path, "rb") as handle:  # bytes: a bad byte further down is reported when it is read, not here
        lines = [number for number, line in enumerate(handle, start=1) if line.strip()]
    return lines[record_index]


def local_records(source) -> Iterator[tuple[Callable[[], str], dict]]:
    """Yield ``(where, record)`` from local files; ``where()`` names the file and line or row."""
    for path in expand_paths(source):
        is_jsonl = path.suffix in (".jsonl", ".json")
        for index, record in enumerate(iter_records(path)):
            if is_jsonl:
                yield (lambda path=path, index=index: f"{path}:{_jsonl_line(path, index)}"), record
            else:
                yield (lambda path=path, index=index: f"{path}: row {index + 1}"), record


def hub_records(source: str, split: str, config_name: str | None) -> Iterator[tuple[Callable[[], str], dict]]:
    """Yield ``(where, record)`` from a hub dataset ``id[:split]``; ``where()`` names the row."""
    import datasets

    hub_id, _, hub_split = source.partition(":")
    hub_split = hub_split or ("test" if split == "ood" else split)
    try:
        dataset = datasets.load_dataset(hub_id, config_name, split=hub_split)
    except (OSError, ValueError) as error:  # unreachable (ConnectionError is an OSError), unknown id, no such split
        kind = OSError if isinstance(error, OSError) else ValueError
        raise kind(f"{source!r} is no local path (relative to {os.getcwd()}) and could not be loaded from "
                   f"the Hugging Face Hub as dataset {hub_id!r}, split {hub_split!r}: {error}") from error
    for index, record in enumerate(dataset):
        yield (lambda index=index: f"{hub_id} [{hub_split}] row {index + 1}"), record


class MathDatasetTask(Task):
    """Shared loading for the real-data adapters; subclasses map one record in ``to_problem``."""

    name = "math_dataset"
    fallback_splits: tuple[str, ...] = ("train", "test")  # splits that read ``path`` without an override
    deduplicate = False  # drop repeated prompts (DAPO-Math-17k repeats each problem ~100 times)

    def __init__(
        self,
        path: str | None,
        train_path: str | None = None,
        test_path: str | None = None,
        ood_path: str | None = None,
        config_name: str | None = None,
        limit: int | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
    ):
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of problems or None, got {limit}")
        self.path = path
        self.split_paths = {"train": train_path, "test": test_path, "ood": ood_path}
        self.config_name = config_name
        self.limit = limit
        self.instruction = instruction

    def to_problem(self, record: dict) -> tuple[str, str, dict]:
        """``(question, gold answer, extra columns)`` for one record; raises ``_BadRecord``."""
        raise NotImplementedError

    def source(self, split: Split) -> str | list[Path]:
        """Where ``split`` is read from; ``ValueError`` if the task has no source for it."""
        if split not in self.split_paths:
            raise ValueError(f"{self.name} has no split {split!r}; choose from {self.splits}")
        if self.split_paths[split]:
            return self._checked(self.split_paths[split], f"{split}_path")
        if split not in self.fallback_splits or not self.path:
            raise ValueError(f"{self.name} has no source for split {split!r}; set {split}_path")
        if not _is_local(self._checked(self.path, "path")):
            return self.path
        if not os.path.isdir(self.path):
            raise ValueError(
                f"{self.name}: path {self.path!r} is a single file and would serve every split; "
                f"set {split}_path (or point path at a directory of <split>.jsonl files)"
            )
        files = sorted(
            file
            for suffix in (".jsonl", ".parquet")
            for file in Path(self.path).rglob(f"{split}*{suffix}")
            if file.is_file()
        )
        if not files:
            raise ValueError(f"{self.name}: no {split}*.jsonl or {split}*.parquet file under {self.path}")
        return files

    def _checked(self, source: str, field: str) -> str:
        """``source``, refused with the task and field named when it is a local path (not a glob) that does
        not exist."""
        if _is_local(source) and not any(char in source for char in "*?[") and not os.path.exists(source):
            raise FileNotFoundError(f"{self.name}: {field} {source!r} does not exist (no such file or directory, "
                                    f"relative to {os.getcwd()}); it is a local path, not a hub dataset id")
        return source

    def load(self, split: Split) -> list[dict]:
        source = self.source(split)
        if isinstance(source, str) and not _is_local(source):
            records = hub_records(source, split, self.config_name)
        else:
            records = local_records(source)
        problems, seen = [], set()
        for where, record in records:
            try:
                question, answer, extra = self.to_problem(record)
            except _BadRecord as error:
                raise RecordError(f"{where()}: {error}") from None
            if self.deduplicate and question in seen:
                continue
            seen.add(question)
            problem_id = f"{self.name}-{split}-{len(problems)}"
            problems.append(
                {"id": problem_id, "prompt": question + self.instruction, "answer": answer, **extra}
            )
            if self.limit is not None and len(problems) >= self.limit:
                break
        if not problems:
            raise ValueError(f"{self.name}: split {split!r} is empty (source: {source})")
        return problems

    def reward(self, prompts, completions, **columns) -> list[float | None]:
        from rloop_lightning.rewards import math_accuracy

        return math_accuracy(prompts, completions, **columns)


class GSM8K(MathDatasetTask):
    """Grade-school maths word problems (fields ``question`` and ``answer``, ending ``#### N``).

    The gold answer is the text after ``####`` with thousands commas removed; the full reference
    solution is kept in the ``solution`` column.

    Args:
        path: Hub id or local directory serving train and test (``<split>*.jsonl`` inside).
        train_path: Source of the train split, overriding ``path``.
        test_path: Source of the test split, overriding ``path``.
        ood_path: Source of the OOD split (none by default).
        config_name: Hub dataset configuration.
        limit: Keep only the first ``limit`` problems of each split.
        instruction: Appended to every question.
    """

    name = "gsm8k"

    def __init__(
        self,
        path: str | None = "openai/gsm8k",
        train_path: str | None = None,
        test_path: str | None = None,
        ood_path: str | None = None,
        config_name: str | None = "main",
        limit: int | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
    ):
        super().__init__(path, train_path, test_path, ood_path, config_name, limit, instruction)

    def to_problem(self, record: dict) -> tuple[str, str, dict]:
        question, solution = _text(record, "question"), _text(record, "answer")
        gold = after_marker(solution)
        if not gold:
            raise _BadRecord("field 'answer' has no '#### <final answer>' line")
        return question, gold.replace(",", ""), {"solution": solution}


class MATH(MathDatasetTask):
    """Competition maths (fields ``problem``, ``solution`` and optionally ``answer``).

    The gold answer is the ``answer`` field when present, else the last ``\\boxed{}`` of
    ``solution``. By default train is the 7,500 MATH train problems and test is MATH-500.

    Args:
        path: Hub id or local directory serving the test split (and train without ``train_path``).
        train_path: Source of the train split, overriding ``path``.
        test_path: Source of the test split, overriding ``path``.
        ood_path: Source of the OOD split (none by default).
        config_name: Hub dataset configuration (applies to every hub source).
        limit: Keep only the first ``limit`` problems of each split.
        instruction: Appended to every problem.
    """

    name = "math"

    def __init__(
        self,
        path: str | None = "HuggingFaceH4/MATH-500",
        train_path: str | None = "DigitalLearningGmbH/MATH-lighteval",
        test_path: str | None = None,
        ood_path: str | None = None,
        config_name: str | None = None,
        limit: int | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
    ):
        super().__init__(path, train_path, test_path, ood_path, config_name, limit, instruction)

    def to_problem(self, record: dict) -> tuple[str, str, dict]:
        problem = _text(record, "problem")
        solution = "" if record.get("solution") in (None, "") else _text(record, "solution")
        answer = _text(record, "answer", numbers=True) if record.get("answer") not in (None, "") else None
        if answer is None or not answer.strip():
            answer = last_boxed(solution)
        if not answer:
            raise _BadRecord(
                f"missing field 'answer' and no \\boxed{{}} in field 'solution'; present: {sorted(record)}"
            )
        return problem, str(answer).strip(), {"solution": solution}


class DAPOMath(MathDatasetTask):
    """DAPO-Math-17k: ``prompt`` is a list of chat messages, the gold is ``reward_model.ground_truth``.

    The question is the user message with DAPO's own "Answer: $Answer" wrapper removed, so that,
    like the other math tasks, the prompt ends with ``instruction`` (``\\boxed{}`` by default).
    Repeated problems are dropped (the hub copy holds each one many times). The hub dataset has
    only a train split: test and OOD need ``test_path``/``ood_path``.

    Args:
        path: Hub id or local directory serving the train split.
        train_path: Source of the train split, overriding ``path``.
        test_path: Source of the test split (none by default).
        ood_path: Source of the OOD split (none by default).
        config_name: Hub dataset configuration.
        limit: Keep only the first ``limit`` distinct problems of each split.
        instruction: Appended to every question.
    """

    name = "dapo_math"
    fallback_splits = ("train",)
    deduplicate = True

    def __init__(
        self,
        path: str | None = "BytedTsinghua-SIA/DAPO-Math-17k",
        train_path: str | None = None,
        test_path: str | None = None,
        ood_path: str | None = None,
        config_name: str | None = None,
        limit: int | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
    ):
        super().__init__(path, train_path, test_path, ood_path, config_name, limit, instruction)

    def to_problem(self, record: dict) -> tuple[str, str, dict]:
        messages = _require(record, "prompt")
        if isinstance(messages, str):
            content = messages
        elif isinstance(messages, list):
            user = [
                m for m in messages if isinstance(m, dict) and m.get("role") == "user" and m.get("content")
            ]
            if not user:
                raise _BadRecord("field 'prompt' has no user message with content")
            content = _text(user[-1], "content")
        else:
            raise _BadRecord(f"field 'prompt' is {type(messages).__name__}, expected text or a list of messages")
        reward_model = _require(record, "reward_model")
        if not isinstance(reward_model, dict):
            raise _BadRecord(f"field 'reward_model' is {type(reward_model).__name__}, expected an object")
        if reward_model.get("ground_truth") in (None, ""):
            raise _BadRecord("missing field 'reward_model.ground_truth'")
        truth = _text(reward_model, "ground_truth", numbers=True)
        return strip_dapo_wrapper(content), truth.strip(), {}


def strip_dapo_wrapper(content: str) -> str:
    """The bare problem of a DAPO-Math-17k user message (unchanged if it lacks the wrapper)."""
    content = content.removeprefix(_DAPO_PREFIX)
    content = content.removesuffix(_DAPO_SUFFIX)
    return content.strip()
