"""Score a batch of completions with several reward functions, in worker processes, with timeouts.

    reward[i] = nansum_j( weight_j * function_j(prompts=..., completions=..., completion_ids=..., **columns)[i] )

Functions are called as TRL's GRPOTrainer calls them (``rewards.inputs``), on chunks of the batch:
one chunk per worker, the whole batch in-process. ``None`` means "does not apply to this completion"
and drops out of the sum, as in TRL; a completion no function applies to scores 0 and is warned
about. A function that raises, runs out of time or returns NaN/inf has failed: the completion scores
0 for it, and the failure is counted, warned about with the function's name, and, at the set-up
check (``check``), an error. A function returning the wrong number of values or non-numbers is a bug
and raises ``ValueError``.

Time: each call has ``timeout`` seconds, and a failed chunk one more ``timeout`` to be retried per
completion (``rewards.calls``). So one batch takes at most ``2 * timeout`` per reward function (async
functions together count as one), whatever its size. The parent waits that long plus a grace
period; a worker still busy then is stuck where signals cannot reach it (C code, a crashed worker):
its chunk scores 0 as timeouts, the function it was running is named, and the workers are restarted.

Workers are started with ``spawn`` by default (safe next to CUDA and threads), so reward functions
must be picklable by reference: module-level functions or instances of module-level classes. Each
worker has a pipe of its own to the parent and shares no lock with anything: a worker that dies
(OOM-killed, a job-wide SIGTERM) is noticed at once and cannot leave a lock held, which would hang
the next batch or the interpreter's exit as ``multiprocessing.Pool`` does. Workers ignore SIGTERM and
SIGINT, so the batch in flight is scored while the trainer finishes it on a preemption signal, and
die with the trainer (``child_processes``).
"""

from __future__ import annotations

import logging
import atexit
import math
import multiprocessing
import os
import pickle
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from rloop_lightning.child_processes import end_with_parent, leave_stop_signals_to_parent
from rloop_lightning.rewards.calls import (
    ERROR, OK, TIMEOUT, RewardTimeout, Score, check_reward_output, function_name, is_async,
    score_chunk,
)
from rloop_lightning.rewards.inputs import ChatFormat, RewardBatch, TrainerState

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., list[float | None]]
__all__ = ["RewardFunction", "RewardFunctionError", "RewardResult", "RewardRunner", "RewardTimeout",
           "check_reward_output", "function_name"]

_STARTUP_TIMEOUT_S = 60.0  # spawned workers import the reward functions' modules (torch, sympy...)
_GRACE_S = 1.0  # on top of the batch's time budget, for IPC and a loaded machine
_EXIT_S = 1.0  # what an idle worker gets to exit on its own when the runner closes, before SIGKILL


class RewardFunctionError(ValueError):
    """A reward function failed the set-up check."""


@dataclass
class RewardResult:
    """Scores of one batch of N completions."""

    rewards: torch.Tensor  # [N] float32, weighted nansum over functions
    per_function: dict[str, list[float | None]]  # name -> [N]; None = not applicable, 0.0 where it failed
    num_timeouts: int  # (completion, function) scores lost to the time limit
    num_errors: int  # (completion, function) calls that raised or returned NaN/inf
    num_not_applicable: int = 0  # (completion, function) pairs the function declined with None
    num_unscored: int = 0  # completions that no function applies to (they score 0)
    failures: dict[str, str] = field(default_factory=dict)  # name -> its first failure, for messages
    num_failed: dict[str, int] = field(default_factory=dict)  # name -> completions it failed on
    columns: dict[str, list] = field(default_factory=dict)  # log_extra columns, [N] each (None where absent)
    metrics: dict[str, float] = field(default_factory=dict)  # log_metric values, averaged over the batch

    @property
    def all_failed(self) -> bool:
        """Every (completion, function) call failed: the batch carries no reward signal at all."""
        calls = len(self.rewards) * len(self.per_function)
        return calls > 0 and self.num_timeouts + self.num_errors == calls


# ---- worker process side --------------------------------------------------------------------------


def _worker_main(parent: int, connection, functions: list[Callable], timeout: float, progress, slot: int) -> None:
    """One reward worker: score each chunk the parent sends on ``connection`` until ``None`` or the pipe closes.
    ``progress[slot]`` is the index of the function running (for the parent's message about a stuck chunk)."""
    end_with_parent(parent)
    leave_stop_signals_to_parent()

    def running(index: int) -> None:
        progress[slot] = index

    connection.send("ready")
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        batch, state = message
        try:
            answer = ("ok", score_chunk(functions, batch, state, timeout, running))
        except Exception as error:  # noqa: BLE001 - a bad output shape, a RewardFunctionExit: the parent raises it
            answer = ("error", error)
        try:
            connection.send(answer)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            connection.send(("error", RuntimeError(f"a reward worker could not send its answer back: {error}")))


# ---- parent side ----------------------------------------------------------------------------------


class RewardRunner:
    """Weighted sum of reward functions over a batch, scored in a pool of worker processes.

    Args:
        functions: TRL-signature reward functions ``fn(prompts, completions, **columns)``, sync or async.
        weights: one per function (default 1.0 each).
        num_workers: worker processes; 0 scores in-process (debugging, non-picklable functions),
            still under the time limit when called from the main thread.
        timeout: seconds allowed for one call of a function on one chunk of completions.
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
        self._workers: Optional[list[tuple]] = None  # (process, connection) per worker while they run
        self._stop_workers: Optional[weakref.finalize] = None  # stops them: on close, collection or exit
        self._progress = None
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

    @property
    def batch_time_limit(self) -> float:
        """Longest the parent waits for one batch: two timeouts per sync function (async ones share two)."""
        call_rounds = sum(not is_async(f) for f in self.functions) + any(is_async(f) for f in self.functions)
        return 2 * self.timeout * call_rounds + _GRACE_S

    # ------------------------------------------------------------------ scoring
    def score_problems(self, problems: Sequence[dict], prompt_index: Sequence[int], completions: Sequence[str],
                       completion_ids: Optional[Sequence[Sequence[int]]] = None,
                       chat: Optional[ChatFormat] = None, state: Optional[TrainerState] = None) -> RewardResult:
        """Score completions of ``problems[prompt_index[i]]`` (every field but ``prompt`` is a column);
        ``chat`` passes prompts and completions as messages, as TRL does with a chat template."""
        return self.score(RewardBatch.from_problems(problems, prompt_index, completions, completion_ids, chat), state)

    def __call__(self, prompts: list, completions: list, columns: dict[str, list] | None = None,
                 completion_ids: Optional[list] = None, state: Optional[TrainerState] = None) -> RewardResult:
        ids = completion_ids if completion_ids is not None else [None] * len(completions)
        return self.score(RewardBatch(list(prompts), list(completions), list(ids), dict(columns or {})), state)

    def score(self, batch: RewardBatch, state: Optional[TrainerState] = None, warn: bool = True) -> RewardResult:
        state = state or TrainerState()
        if len(batch) == 0:
            chunks, lost = [], []
        elif self.num_workers == 0:
            chunks, lost = [(0, score_chunk(self.functions, batch, state, self.timeout))], []
        else:
            chunks, lost = self._score_in_pool(batch, state)
        result = self._collect(batch, chunks, lost)
        if warn:
            self._warn(result, batch)
        return result

    def check(self, batch: RewardBatch, state: Optional[TrainerState] = None) -> None:
        """The set-up check: raise ``RewardFunctionError`` naming a function that raises, runs out of
        time or returns NaN/inf on ``batch`` (``ValueError`` for a wrong number or type of values)."""
        result = self.score(batch, state, warn=False)
        for name, failure in result.failures.items():
            advice = (f"; if it is only slow, raise the reward timeout ({self.timeout:g} s)"
                      if failure.startswith(("timed out", "never returned")) else "")
            if failure.startswith("returned"):
                advice = "; a reward must be a finite number, or None where the function does not apply"
            if failure.startswith(("raised TypeError", "raised IndexError")) and all(
                    isinstance(c, str) for c in batch.completions):
                advice = ("; completions are plain strings because the policy has no chat template, and "
                          "functions that read completion[0]['content'] (TRL's accuracy_reward, "
                          "think_format_reward, ...) need chat messages: use a policy with a chat template")
            raise RewardFunctionError(
                f"reward function {name!r} failed the set-up check on {len(batch)} probe completions: "
                f"it {failure}{advice}")

    def check_problems(self, problems: Sequence[dict], chat: Optional[ChatFormat] = None,
                       state: Optional[TrainerState] = None) -> None:
        """``check`` on an empty completion for each of the first two problems."""
        probe = list(problems[:2])
        self.check(RewardBatch.from_problems(probe, range(len(probe)), [""] * len(probe), [[]] * len(probe), chat),
                   state)

    # ------------------------------------------------------------------ pool
    def _score_in_pool(self, batch: RewardBatch, state: TrainerState):
        """((start, scores) per chunk that answered, (start, stop, stuck function index) per chunk that did not)."""
        workers = self._ensure_workers()
        size = math.ceil(len(batch) / self.num_workers)
        starts = list(range(0, len(batch), size))
        sent = []
        for slot, start in enumerate(starts):
            self._progress[slot] = -1
            try:
                workers[slot][1].send((batch.rows(start, start + size), state))
                sent.append(True)
            except OSError:  # the worker is gone
                sent.append(False)
        deadline = time.monotonic() + self.batch_time_limit
        chunks, lost, error = [], [], None
        for slot, start in enumerate(starts):
            answer = _answer(workers[slot][1], deadline) if sent[slot] else None
            if answer is None:  # stuck where signals cannot reach, or dead
                lost.append((start, min(start + size, len(batch)), self._progress[slot]))
                workers[slot][0].kill()  # no use asking it to exit
            elif answer[0] == "error":
                error = error or answer[1]
            else:
                chunks.append((start, answer[1]))
        if error is not None:  # a worker's ValueError (bad output shape), a RewardFunctionExit
            self.close()
            raise error
        if lost:
            stuck = sorted({self.names[index] if index >= 0 else "?" for _, _, index in lost})
            logger.warning("reward function(s) %s did not return within the batch limit of %.1f s (stuck where "
                           "signals cannot reach, or the worker died): %d completions score 0 as timeouts; "
                           "restarting the reward workers", stuck, self.batch_time_limit,
                           sum(stop - start for start, stop, _ in lost))
            self.close()
        return chunks, lost

    def _ensure_workers(self) -> list[tuple]:
        if self._workers is None:
            context = multiprocessing.get_context(self.start_method)
            self._progress = context.RawArray("i", [-1] * self.num_workers)  # no lock a dying worker could hold
            self._workers = []
            for slot in range(self.num_workers):
                connection, child_end = context.Pipe()
                process = context.Process(target=_worker_main, name=f"rloop-reward-{slot}", daemon=True,
                                          args=(os.getpid(), child_end, self.functions, self.timeout, self._progress,
                                                slot))
                process.start()
                child_end.close()  # the worker's death then reads as the end of the pipe
                self._workers.append((process, connection))
            # at exit before multiprocessing's own handler (atexit runs the latest first), which would SIGTERM
            # these workers, which ignore it, and wait for them for ever
            self._stop_workers = weakref.finalize(self, _stop_workers, self._workers)
            atexit.register(self._stop_workers)
            deadline = time.monotonic() + _STARTUP_TIMEOUT_S
            if any(_answer(connection, deadline) != "ready" for _, connection in self._workers):
                self.close()
                raise RuntimeError(
                    f"reward workers did not start within {_STARTUP_TIMEOUT_S:.0f} s; can the reward "
                    "functions be imported in a fresh process (module-level, not from __main__)?"
                )
        return self._workers

    # ------------------------------------------------------------------ results
    def _collect(self, batch: RewardBatch, chunks: list, lost: list) -> RewardResult:
        import torch  # here, not at module level: keeps worker processes free of torch

        size = len(batch)
        table: list[list[Score]] = [[(0.0, TIMEOUT, None)] * size for _ in self.functions]  # [function][item]
        failures: dict[str, str] = {}
        for start, stop, index in lost:
            if index >= 0:
                failures.setdefault(self.names[index], f"never returned within the batch limit of "
                                                       f"{self.batch_time_limit:.1f} s")
        columns: dict[str, list] = {}
        owners: dict[str, int] = {}
        logged: dict[str, list[float]] = {}
        for start, function_scores in sorted(chunks, key=lambda chunk: chunk[0]):
            for j, scores in enumerate(function_scores):
                table[j][start : start + len(scores.scores)] = scores.scores
                for column, values in scores.columns.items():
                    key = column if owners.setdefault(column, j) == j else f"{self.names[j]}/{column}"
                    columns.setdefault(key, [None] * size)[start : start + len(values)] = values
                for name, values in scores.metrics.items():
                    logged.setdefault(name, []).extend(values)
        counts = {OK: 0, TIMEOUT: 0, ERROR: 0}
        num_failed: dict[str, int] = {}
        for j, name in enumerate(self.names):
            for value, status, failure in table[j]:
                counts[status] += 1
                if status != OK:
                    num_failed[name] = num_failed.get(name, 0) + 1
                if failure is not None:
                    failures.setdefault(name, failure)
        values = torch.tensor([[math.nan if s[0] is None else s[0] for s in scores] for scores in table],
                              dtype=torch.float32).reshape(len(self.functions), size).T  # [N, F]
        not_applicable = torch.tensor([[s[0] is None for s in scores] for scores in table],
                                      dtype=torch.bool).reshape(len(self.functions), size).T
        return RewardResult(
            rewards=(values * torch.tensor(self.weights, dtype=torch.float32)).nansum(dim=1),
            per_function={name: [s[0] for s in table[j]] for j, name in enumerate(self.names)},
            num_timeouts=counts[TIMEOUT], num_errors=counts[ERROR],
            num_not_applicable=int(not_applicable.sum()), num_unscored=int(not_applicable.all(dim=1).sum()),
            failures=failures, num_failed=num_failed, columns=columns,
            metrics={name: sum(values) / len(values) for name, values in logged.items() if values},
        )

    def _warn(self, result: RewardResult, batch: RewardBatch) -> None:
        size = len(batch)
        for name, failure in result.failures.items():
            self._warn_once((name, failure.split()[0]), "reward function %r %s on %d/%d completions; scored 0",
                            name, failure, result.num_failed.get(name, 0), size)
        if result.num_unscored:
            first = next(i for i in range(size) if all(result.per_function[n][i] is None for n in self.names))
            self._warn_once(("*", "unscored"), "every reward function returned None (not applicable) for %d/%d "
                            "completions; they score 0. First: prompt %.200r", result.num_unscored, size,
                            batch.prompts[first])

    def _warn_once(self, key: tuple[str, str], message: str, *args) -> None:
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        logger.log(level, message, *args)

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        stop, self._stop_workers, self._workers = self._stop_workers, None, None
        if stop is not None:
            stop()
            atexit.unregister(stop)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_workers": None, "_stop_workers": None, "_progress": None}


def _stop_workers(workers: list[tuple]) -> None:
    """Ask each worker to exit, then SIGKILL the ones that did not within ``_EXIT_S`` (busy or stuck; SIGTERM would
    not do, they ignore it); reap them."""
    for _, connection in workers:
        try:
            connection.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + _EXIT_S
    for process, connection in workers:
        process.join(max(deadline - time.monotonic(), 0.0))
        if process.is_alive():
            process.kill()
            process.join()
        connection.close()


def _answer(connection, deadline: float):
    """The worker's next message, or None when none came by ``deadline`` or the worker is gone."""
    try:
        if connection.poll(max(deadline - time.monotonic(), 0.0)):
            return connection.recv()
    except (EOFError, OSError):
        pass
    return None


def _unique_names(functions: Sequence[Callable]) -> list[str]:
    names: list[str] = []
    for function in functions:
        name = function_name(function)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names
