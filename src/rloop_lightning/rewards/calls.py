"""Calling reward functions on a chunk of completions under a time limit (worker side of ``RewardRunner``).

Each function is called once on the whole chunk, TRL-style. A call that raises or runs out of time
is retried one completion at a time within one more ``timeout``, each completion getting an equal
share of what is left, so one pathological completion costs itself, not its chunk, and a function
that stalls on everything costs two timeouts per chunk. Async functions of a chunk are awaited
together (``asyncio.gather``), each under the same limit, and are not retried (they are usually
remote judges, slow for every completion or none).

The limit is a watchdog thread that, once the time is up, keeps signalling the main thread
(``TIMEOUT_SIGNAL``) until the call returns; the handler raises ``RewardTimeout``. Not SIGALRM:
math-verify (inside TRL's ``accuracy_reward``) re-arms and then cancels that process-wide timer.
Only the main thread can take signals, so elsewhere calls run without a limit; code that never
returns to the interpreter (a C loop holding the GIL) cannot be interrupted at all, and is the
parent's hard deadline's job (``RewardRunner`` with workers).

Isolation: every call gets its own deep copy of the prompts, completions and problem columns, so a
function that appends to a problem's ``numbers`` or rewrites ``completions`` in place changes neither
the cached problems nor what the next function scores. A function that raises ``SystemExit`` or
``KeyboardInterrupt`` is not scored as a failure: the run stops with ``RewardFunctionExit`` naming it
(a function that exits is broken, not the completion it was given); so does one that closes
``sys.stdout`` or ``sys.stderr``. A real Ctrl-C that lands during a call stays a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

from rloop_lightning.rewards.inputs import RewardBatch, TrainerState

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
Score = tuple[Optional[float], str, Optional[str]]  # (value, status, failure text); value None = not applicable

TIMEOUT_SIGNAL = signal.SIGUSR2
_RESIGNAL_S = 0.05  # the watchdog repeats its signal until the call returns (code may swallow one)
_MAX_ERROR_CHARS = 300  # failure text sent back for the log; messages may quote a whole completion


class RewardTimeout(BaseException):
    """Raised inside a reward call whose time is up. A BaseException, so ``except Exception`` cannot eat it."""


class RewardFunctionExit(RuntimeError):
    """A reward function raised ``SystemExit`` or ``KeyboardInterrupt``: the run stops, naming it.

    An ``Exception``, so that a worker process sends it back to the parent (a pool worker dies on a
    ``BaseException``)."""


def function_name(function: Callable) -> str:
    """``__name__`` of a function (or of a callable object that sets one), else its class name."""
    return getattr(function, "__name__", type(function).__name__)


def is_async(function: Callable) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(getattr(function, "__call__", None))


def check_reward_output(function: Callable, output: Any, expected_len: int) -> list[float | None]:
    """Return ``output`` as a list of float/None, or raise ``ValueError`` naming ``function``."""
    name = function_name(function)
    if isinstance(output, (str, bytes, Mapping, Set)) or not (isinstance(output, Sequence) or hasattr(output, "__array__")):
        why = ("; a set has no order, so its values cannot be matched to completions" if isinstance(output, Set)
               else "; return a list, not an iterator or generator" if isinstance(output, Iterator) else "")
        raise ValueError(f"reward function {name!r} returned {type(output).__name__}, expected a list of numbers "
                         f"or None, one per completion{why}")
    if len(output) != expected_len:
        raise ValueError(f"reward function {name!r} returned {len(output)} values for {expected_len} completions")
    values: list[float | None] = []
    for value in output:
        if value is not None and (isinstance(value, (str, bytes)) or not _is_number(value)):
            raise ValueError(f"reward function {name!r} returned {value!r}, expected a float or None")
        values.append(None if value is None else float(value))
    return values


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``RewardTimeout`` in the body once ``seconds`` have passed (main thread only; else no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    expired, done = threading.Event(), threading.Event()

    def on_signal(signum, frame):
        if expired.is_set() and not done.is_set():
            raise RewardTimeout()

    def watch(main_thread: int) -> None:
        if done.wait(seconds):
            return
        expired.set()
        while not done.is_set():
            signal.pthread_kill(main_thread, TIMEOUT_SIGNAL)
            done.wait(_RESIGNAL_S)

    previous = signal.signal(TIMEOUT_SIGNAL, on_signal)
    watchdog = threading.Thread(target=watch, args=(threading.get_ident(),), name="reward-time-limit", daemon=True)
    try:  # the watchdog starts inside: with a limit of a few microseconds it signals before the body begins
        watchdog.start()
        yield
    finally:
        while True:  # a signal landing on the way out must not skip the clean-up
            try:
                done.set()
                if watchdog.is_alive():
                    watchdog.join()
                signal.signal(TIMEOUT_SIGNAL, previous)
                break
            except RewardTimeout:
                continue


@dataclass
class CallLog:
    """``log_extra`` / ``log_metric`` of one call, as TRL's trainer collects them."""

    columns: dict[str, list] = field(default_factory=dict)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def log_extra(self, column: str, values: Sequence) -> None:
        self.columns.setdefault(column, []).extend(values)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(name, []).append(float(value))


@dataclass
class FunctionScores:
    """One function's scores on one chunk, with what it logged."""

    scores: list[Score]  # [n]
    columns: dict[str, list] = field(default_factory=dict)  # log_extra, [n] each
    metrics: dict[str, list[float]] = field(default_factory=dict)  # log_metric values


def score_chunk(functions: Sequence[Callable], batch: RewardBatch, state: TrainerState, timeout: float,
                on_function: Callable[[int], None] = lambda index: None) -> list[FunctionScores]:
    """Scores of every function on ``batch``, [function]; ``on_function(j)`` before each function runs."""
    results: list[Optional[FunctionScores]] = [None] * len(functions)
    for index, function in enumerate(functions):
        if not is_async(function):
            on_function(index)
            results[index] = _score_function(function, batch, state, timeout)
    concurrent = [index for index, function in enumerate(functions) if is_async(function)]
    if concurrent:
        on_function(concurrent[0])
        together = _score_together([functions[index] for index in concurrent], batch, state, timeout)
        for index, scores in zip(concurrent, together):
            results[index] = scores
    return results  # type: ignore[return-value]


def _keywords(batch: RewardBatch, state: TrainerState, log: CallLog) -> dict[str, Any]:
    """What one call gets: its own copy of the batch's inputs (functions may mutate what they are given)."""
    inputs = {name: [None if ids is None else list(ids) for ids in values] if name == "completion_ids"
              else _own_copy(values) for name, values in batch.keywords().items()}  # token ids: ints, a flat copy
    return {**inputs, "trainer_state": copy.copy(state), "log_extra": log.log_extra, "log_metric": log.log_metric}


def _own_copy(values: list) -> list:
    """A copy of one input a function may mutate: a list of strings copied flat (strings cannot change),
    anything else (chat messages, problem columns) deeply."""
    return list(values) if all(isinstance(value, str) for value in values) else copy.deepcopy(values)


def _call(function: Callable, keywords: dict, seconds: float) -> Any:
    with open_streams(repr(function_name(function))), user_interrupts() as interrupted, time_limit(seconds):
        try:
            output = function(**keywords)
            if inspect.isawaitable(output):
                output = asyncio.run(asyncio.wait_for(output, seconds))
        except (SystemExit, KeyboardInterrupt) as stop:
            if isinstance(stop, KeyboardInterrupt) and interrupted.is_set():
                raise  # Ctrl-C
            raise exit_error(function, stop) from None
    return output


def exit_error(function: Callable, stop: BaseException) -> RewardFunctionExit:
    what = f"SystemExit({stop.code!r})" if isinstance(stop, SystemExit) else f"{type(stop).__name__}({stop})"
    return RewardFunctionExit(
        f"reward function {function_name(function)!r} raised {what}: a reward function must return scores (or "
        "raise an Exception, counted as its failure), never exit or interrupt the run; fix the function")


@contextmanager
def open_streams(names: str) -> Iterator[None]:
    """Raise ``RewardFunctionExit`` naming the reward function(s) ``names`` when the body closes
    ``sys.stdout`` or ``sys.stderr`` (the next print or log line, anyone's, would fail with a bare "I/O
    operation on closed file"); the closed stream is first replaced, so the error can be read."""
    try:
        yield
    finally:
        closed = [name for name in ("stdout", "stderr") if getattr(getattr(sys, name), "closed", False)]
        for name in closed:
            setattr(sys, name, _reopened(name))
        if closed:
            raise RewardFunctionExit(
                f"reward function {names} closed sys.{closed[0]}: a reward function must "
                "leave the process's standard streams open (later output, its own and the trainer's, would fail "
                "with 'I/O operation on closed file'); fix the function")


def _reopened(name: str) -> TextIO:
    """A writable stream for ``sys.<name>`` after it was closed: the interpreter's own one when that is still
    open, else a new one on file descriptor 1 or 2 (closing ``sys.stdout`` leaves the descriptor open)."""
    original = getattr(sys, f"__{name}__")
    if original is not None and not original.closed:
        return original
    return open({"stdout": 1, "stderr": 2}[name], "w", buffering=1, closefd=False, errors="backslashreplace")


@contextmanager
def user_interrupts() -> Iterator[threading.Event]:
    """An event set when SIGINT reaches this process in the body (main thread only); the signal still goes
    to the handler in place, so a ``KeyboardInterrupt`` from a real Ctrl-C can be told from one a
    function raises itself."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        interrupted.set()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _score_function(function: Callable, batch: RewardBatch, state: TrainerState, timeout: float) -> FunctionScores:
    log = CallLog()
    try:
        output = _call(function, _keywords(batch, state, log), timeout)
    except RewardFunctionExit:
        raise
    except (RewardTimeout, Exception) as failure:  # noqa: BLE001 -- bad model output must never stop training
        if len(batch) == 1:
            return FunctionScores([_failed(failure, timeout)])
        return _score_one_by_one(function, batch, state, timeout)
    return _finished(function, output, log, len(batch))


def _score_together(functions: list[Callable], batch: RewardBatch, state: TrainerState,
                    timeout: float) -> list[FunctionScores]:
    logs = [CallLog() for _ in functions]

    async def call(function: Callable, log: CallLog) -> Any:
        try:
            return await asyncio.wait_for(function(**_keywords(batch, state, log)), timeout)
        except (SystemExit, KeyboardInterrupt) as stop:
            raise exit_error(function, stop) from None

    async def gather() -> list:
        return await asyncio.gather(*(call(f, log) for f, log in zip(functions, logs)), return_exceptions=True)

    try:
        with open_streams(" or ".join(repr(function_name(f)) for f in functions)), \
                time_limit(timeout * 1.1 + 0.1):  # a backstop for a coroutine that blocks the event loop
            outputs = asyncio.run(gather())
    except RewardTimeout as failure:
        outputs = [failure] * len(functions)
    for output in outputs:
        if isinstance(output, RewardFunctionExit):
            raise output
    return [FunctionScores([_failed(output, timeout)] * len(batch)) if isinstance(output, BaseException)
            else _finished(function, output, log, len(batch))
            for function, log, output in zip(functions, logs, outputs)]


def _score_one_by_one(function: Callable, batch: RewardBatch, state: TrainerState, timeout: float) -> FunctionScores:
    """Retry a failed chunk call per completion, all of them within one more ``timeout``."""
    deadline = time.monotonic() + timeout
    scores: list[Score] = []
    columns: dict[str, list] = {}
    metrics: dict[str, list[float]] = {}
    for row in range(len(batch)):
        share = (deadline - time.monotonic()) / (len(batch) - row)
        log = CallLog()
        try:
            if share <= 0:
                raise RewardTimeout()
            output = _call(function, _keywords(batch.rows(row, row + 1), state, log), share)
        except RewardFunctionExit:
            raise
        except (RewardTimeout, Exception) as failure:  # noqa: BLE001
            scores.append(_failed(failure, timeout))
            continue
        item = _finished(function, output, log, 1)
        scores.extend(item.scores)
        for column, values in item.columns.items():
            aligned = columns.setdefault(column, [])
            aligned.extend([None] * (row - len(aligned)) + values)
        for name, values in item.metrics.items():
            metrics.setdefault(name, []).extend(values)
    for aligned in columns.values():
        aligned.extend([None] * (len(batch) - len(aligned)))
    return FunctionScores(scores, columns, metrics)


def _finished(function: Callable, output: Any, log: CallLog, size: int) -> FunctionScores:
    values = check_reward_output(function, output, size)  # a wrong shape is a bug: raise, do not score
    scores: list[Score] = [
        (value, OK, None) if value is None or math.isfinite(value) else (0.0, ERROR, f"returned {value}")
        for value in values
    ]
    columns = {column: list(values) for column, values in log.columns.items() if len(values) == size}
    return FunctionScores(scores, columns, log.metrics)


def _failed(failure: BaseException, timeout: float) -> Score:
    if isinstance(failure, (RewardTimeout, TimeoutError, asyncio.TimeoutError)):
        return 0.0, TIMEOUT, f"timed out (limit {timeout:g} s per call)"
    return 0.0, ERROR, f"raised {type(failure).__name__}: {failure}"[:_MAX_ERROR_CHARS]
