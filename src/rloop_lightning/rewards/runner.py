"""Score a batch of completions with several reward functions, in worker processes, with timeouts.

    reward[i] = nansum_j( weight_j * function_j(prompt_i, completion_i, columns_i) )

as TRL's GRPOTrainer does: a function returning None ("not applicable") drops out of the sum, so
an item on which every function returns None scores 0.

Every (item, function) pair is one call with single-element lists, so one pathological completion
cannot spoil the batch. Two layers of timeout:
    * in the worker, ``signal.setitimer`` raises ``RewardTimeout`` after ``timeout`` seconds
      (works for Python code, e.g. sympy simplification); the call scores 0 and counts as a timeout;
    * in the parent, a hard deadline for the whole batch (the worst case if every call hit its
      timeout, plus slack) catches a worker stuck where signals cannot reach it (C code, signals
      blocked, a crashed worker). The pool is then terminated and recreated on the next call;
      every item without a result scores 0 and counts as a timeout.
A function that raises scores 0 and counts as an error (logged, never re-raised). A function that
returns the wrong number of values is a programming bug and raises ``ValueError``.

Workers are started with ``spawn`` by default (safe next to CUDA and threads), so reward functions
must be picklable by reference: module-level functions or instances of module-level classes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., list[float | None]]
Score = tuple[float | None, str, str | None]  # (value, status, error text)

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
_CHUNKS_PER_WORKER = 4  # chunks submitted per worker and batch: fewer IPC round trips, still balanced
_DEADLINE_SLACK_S = 3.0  # parent deadline on top of the every-call-times-out worst case
_STARTUP_TIMEOUT_S = 60.0
_MAX_ERROR_CHARS = 300  # error text sent back for the log; messages may quote a whole completion  # spawned workers import torch/sympy; a fresh pool may take a while


class RewardTimeout(BaseException):
    """Raised by SIGALRM inside a reward call. A BaseException, so ``except Exception`` cannot eat it."""


@dataclass
class RewardResult:
    """Scores of one batch of N completions."""

    rewards: torch.Tensor  # [N] float32, weighted nansum over functions
    per_function: dict[str, list[float | None]]  # name -> [N]; None = not applicable
    num_timeouts: int  # (item, function) calls scored 0 because they ran out of time
    num_errors: int  # (item, function) calls scored 0 because the function raised


def function_name(function: Callable) -> str:
    """``__name__`` of a function, class name of a callable object."""
    return getattr(function, "__name__", type(function).__name__)


def check_reward_output(function: Callable, output: Any, expected_len: int) -> list[float | None]:
    """Return ``output`` as a list of float/None, or raise ``ValueError`` naming ``function``."""
    name = function_name(function)
    if isinstance(output, (str, bytes, dict)) or not hasattr(output, "__len__"):
        raise ValueError(f"reward function {name!r} returned {type(output).__name__}, expected a list")
    if len(output) != expected_len:
        raise ValueError(
            f"reward function {name!r} returned {len(output)} values for {expected_len} completions"
        )
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


def _raise_timeout(signum, frame):
    raise RewardTimeout()


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise ``RewardTimeout`` in the body after ``seconds`` (main thread only; else no limit).

    An ITIMER_REAL timer armed by someone else (pytest-timeout, an outer alarm) is honoured: ours is
    capped by it, and it is re-armed with its remaining time on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    outer_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_delay) if outer_delay > 0 else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler if outer_handler is not None else signal.SIG_DFL)
        if outer_delay > 0:
            left = max(outer_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def _score_one(function: Callable, prompt: str, completion: str, row: dict, timeout: float) -> Score:
    try:
        with _alarm(timeout):
            output = function([prompt], [completion], **{key: [value] for key, value in row.items()})
    except RewardTimeout:
        return 0.0, TIMEOUT, None
    except Exception as error:  # noqa: BLE001 -- bad model output must never stop training
        return 0.0, ERROR, f"{type(error).__name__}: {error}"[:_MAX_ERROR_CHARS]
    return check_reward_output(function, output, 1)[0], OK, None


def score_items(functions: Sequence[Callable], items: Sequence[tuple], timeout: float) -> list[list[Score]]:
    """Score (prompt, completion, row) items one call at a time: [item][function] -> Score."""
    return [[_score_one(function, *item, timeout) for function in functions] for item in items]


# ---- worker process side --------------------------------------------------------------------------

_worker_functions: list[Callable] = []
_worker_timeout: float = 0.0


def _init_worker(functions: list[Callable], timeout: float, ready) -> None:
    global _worker_functions, _worker_timeout
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker_functions, _worker_timeout = functions, timeout
    ready.release()


def _score_chunk(items: list[tuple]) -> list[list[Score]]:
    return score_items(_worker_functions, items, _worker_timeout)


# ---- parent side ----------------------------------------------------------------------------------


class RewardRunner:
    """Weighted sum of reward functions over a batch, scored in a pool of worker processes.

    Args:
        functions: TRL-signature reward functions ``fn(prompts, completions, **columns)``.
        weights: one per function (default 1.0 each).
        num_workers: worker processes; 0 scores in-process (debugging, non-picklable functions),
            still with the per-call timeout when called from the main thread.
        timeout: seconds allowed per (item, function) call.
        start_method: ``multiprocessing`` start method of the workers.
    """

    def __init__(
        self,
        functions: list[RewardFunction],
        weights: list[float] | None = None,
        num_workers: int = 2,
        timeout: float = 5.0,
        start_method: str = "spawn",
    ):
        if not functions:
            raise ValueError("RewardRunner needs at least one reward function")
        if weights is not None and len(weights) != len(functions):
            raise ValueError(f"got {len(weights)} weights for {len(functions)} reward functions")
        if num_workers < 0 or timeout <= 0:
            raise ValueError(f"need num_workers >= 0 and timeout > 0, got {num_workers}, {timeout}")
        self.functions = list(functions)
        self.weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]
        self.names = _unique_names(self.functions)
        self.num_workers = num_workers
        self.timeout = timeout
        self.start_method = start_method
        self._pool = None
        self._warned: set[tuple[str, str]] = set()
        if num_workers > 0:
            for function in self.functions:
                try:
                    pickle.dumps(function)
                except Exception as error:
                    raise ValueError(
                        f"reward function {function_name(function)!r} cannot be sent to worker processes "
                        f"({error}); define it at module level or use num_workers=0"
                    ) from error

    def score_problems(self, problems: Sequence[dict], prompt_index: Sequence[int],
                       completions: list[str]) -> RewardResult:
        """Score completions of ``problems[prompt_index[i]]``: every problem field but ``prompt`` goes to
        the reward functions as a column (TRL's convention), aligned with the completions."""
        prompts = [problems[i]["prompt"] for i in prompt_index]
        columns = {key: [problems[i][key] for i in prompt_index] for key in problems[0] if key != "prompt"}
        return self(prompts, completions, columns)

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None
    ) -> RewardResult:
        columns = columns or {}
        for name, values in [("prompts", prompts), *columns.items()]:
            if len(values) != len(completions):
                raise ValueError(f"{name!r} has {len(values)} entries for {len(completions)} completions")
        rows = [{key: values[i] for key, values in columns.items()} for i in range(len(completions))]
        items = list(zip(prompts, completions, rows))
        if self.num_workers == 0 or not items:
            scores: list[list[Score] | None] = score_items(self.functions, items, self.timeout)
        else:
            scores = self._score_in_pool(items)
        return self._collect(scores)

    def _score_in_pool(self, items: list[tuple]) -> list[list[Score] | None]:
        """Scores per item; None for items the hard deadline cut off (the pool is then terminated)."""
        pool = self._ensure_pool()
        chunk_size = math.ceil(len(items) / (self.num_workers * _CHUNKS_PER_WORKER))
        starts = range(0, len(items), chunk_size)
        pending = [
            (start, pool.apply_async(_score_chunk, (items[start : start + chunk_size],))) for start in starts
        ]
        worst_case_calls = len(self.functions) * (math.ceil(len(items) / self.num_workers) + chunk_size)
        deadline = time.monotonic() + self.timeout * worst_case_calls + _DEADLINE_SLACK_S
        scores: list[list[Score] | None] = [None] * len(items)
        for start, result in pending:
            result.wait(max(deadline - time.monotonic(), 0.0))
            if result.ready():
                chunk_scores = result.get()  # re-raises a worker's ValueError (bad output length)
                scores[start : start + len(chunk_scores)] = chunk_scores
        if any(score is None for score in scores):
            logger.warning("reward workers missed the batch deadline; restarting the pool")
            self.close()
        return scores

    def _ensure_pool(self):
        if self._pool is None:
            context = multiprocessing.get_context(self.start_method)
            ready = context.Semaphore(0)
            self._pool = context.Pool(
                self.num_workers, initializer=_init_worker, initargs=(self.functions, self.timeout, ready)
            )
            for _ in range(self.num_workers):
                if not ready.acquire(timeout=_STARTUP_TIMEOUT_S):
                    self.close()
                    raise RuntimeError(
                        f"reward workers did not start within {_STARTUP_TIMEOUT_S:.0f} s; can the reward "
                        "functions be imported in a fresh process (module-level, not from __main__)?"
                    )
        return self._pool

    def _collect(self, scores: list[list[Score] | None]) -> RewardResult:
        import torch  # here, not at module level: keeps worker processes free of torch

        lost = [(0.0, TIMEOUT, None)] * len(self.functions)
        table = [item_scores if item_scores is not None else lost for item_scores in scores]
        per_function = {name: [item[j][0] for item in table] for j, name in enumerate(self.names)}
        num_timeouts = num_errors = 0
        for j, name in enumerate(self.names):
            statuses = [item[j][1] for item in table]
            errors = [item[j][2] for item in table if item[j][1] == ERROR]
            num_timeouts += statuses.count(TIMEOUT)
            num_errors += len(errors)
            self._warn_once(name, TIMEOUT, statuses.count(TIMEOUT), len(table), "timed out")
            self._warn_once(
                name, ERROR, len(errors), len(table), f"raised (first: {errors[0] if errors else ''})"
            )
        values = torch.tensor(
            [[math.nan if value is None else value for value in row] for row in zip(*per_function.values())],
            dtype=torch.float32,
        ).reshape(len(table), len(self.functions))
        rewards = (values * torch.tensor(self.weights, dtype=torch.float32)).nansum(dim=1)
        return RewardResult(rewards, per_function, num_timeouts, num_errors)

    def _warn_once(self, name: str, kind: str, count: int, total: int, what: str) -> None:
        if count == 0:
            return
        level = logging.DEBUG if (name, kind) in self._warned else logging.WARNING
        self._warned.add((name, kind))
        logger.log(level, "reward function %r %s on %d/%d items, scored 0", name, what, count, total)

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            pool.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):  # interpreter shutdown may have torn down multiprocessing already
            self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}


def _unique_names(functions: Sequence[Callable]) -> list[str]:
    names: list[str] = []
    for function in functions:
        name = function_name(function)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names
