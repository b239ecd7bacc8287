"""Asynchronous rollouts: a sampler process with its own engine and weights, running ahead of the trainer.

The trainer (``GRPOModule`` with ``rollout.mode: async``) owns one ``AsyncSampler``, which starts
one sampler process (``torch.multiprocessing`` spawn) pinned to its own CPU cores, holding its own
``Policy`` and rollout engine (Hugging Face ``generate`` or vLLM). Between them:

- **weights by version, through shared memory**: the trainable parameters (all of them, or only
  the LoRA adapter) live in one set of shared-memory tensors; after each rollout batch's optimizer
  steps the trainer copies its parameters in, under a lock, and bumps the version. Before each
  batch the sampler copies the newest version into its own model (and ``sync_weights`` into vLLM),
  so no checkpoint is written to disk per step.
- **requests and results, through queues**: a request is one rollout batch (its step, prompts and
  seed ``sampling_seed(seed, step, rank, round)``); a result carries the version that sampled it.
- **prompts ahead**: the training dataloader (``ResumableDataLoader.lookahead``) draws
  ``max_staleness`` batches ahead of Lightning and announces them (``plan``); batch k is submitted
  once version ``k - max_staleness`` is pushed (``staleness.may_submit``), so the sampler works on
  the next batches while the trainer updates on the current one.

The sampler always samples with the newest version it finds when it starts a batch, never older
than the bound allows. With ``max_staleness: 0`` the trainer submits batch k after pushing version
k and waits: the synchronous phase, sample for sample (the same seeds, the same weights).

Failure and shutdown: a sampler that raises sends its traceback, a sampler that dies is noticed
within half a second (exit code in the error), a sampler that is alive but gives no batch within
``rollout.timeout`` is a ``TimeoutError``, and none of them hangs the trainer. ``close`` (normal end,
exception or preemption) stops the process at once, without waiting for batches in flight or queued
(nothing needs them: a resumed phase re-creates them from their seeds). The process ignores SIGTERM
and SIGINT (a job-wide preemption signal is the trainer's, which finishes its batch with the
sampler's help) and is killed by the kernel when the trainer dies, however it dies, even while it
starts (``rollout.sampler_process``), so nothing is left behind.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
import torch.multiprocessing as mp

from rloop_lightning.policy import Policy
from rloop_lightning.rollout.base import RolloutEngine, Rollouts, SamplingParams
from rloop_lightning.rollout.sampler_process import STOP_SIGNAL, sampler_main
from rloop_lightning.rollout.staleness import RolloutSettings, available_cores, may_submit, split_cores

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 10.0
"""How long ``close`` lets a stopped sampler close its engine (vLLM) before it kills it."""


@dataclass
class Request:
    """One rollout batch for the sampler."""

    id: int
    step: int
    prompts: list[str]
    problem_ids: list
    num_samples: int
    seed: int


def policy_arguments(policy: Policy) -> dict:
    """What builds the same policy (model, tokenizer, template) in another process."""
    return dict(model_name_or_path=policy.source, revision=policy.revision, dtype=policy.dtype_name,
                lora=policy.lora, load_in_4bit=policy.load_in_4bit, trust_remote_code=policy.trust_remote_code,
                use_chat_template=policy.use_chat_template, prompt_template=policy.prompt_template,
                system_prompt=policy.system_prompt, attn_implementation=policy.attn_implementation,
                logprob_chunk_size=policy.logprob_chunk_size)


def pushed_parameters(policy: Policy) -> list[tuple[str, torch.Tensor]]:
    """The parameters the trainer changes: all under full fine-tuning, only the adapter's under LoRA."""
    return [(name, parameter) for name, parameter in policy.require_model().named_parameters()
            if parameter.requires_grad]


class AsyncSampler:
    """The trainer's side of the sampler process: versioned weight push, batch planning, waiting.

    Args:
        settings: the phase's rollout settings (``mode: async``).
        engine: the engine the sampler process runs (a copy; this process never starts it).
        sampling: sampling parameters.
        num_samples: completions per prompt.
        seed_of: the request seed of (step, round).
    """

    def __init__(self, settings: RolloutSettings, engine: RolloutEngine, sampling: SamplingParams,
                 num_samples: int, seed_of):
        self.settings = settings
        self.engine = engine
        self.sampling = sampling
        self.num_samples = num_samples
        self.seed_of = seed_of
        self.trainer_cores, self.sampler_cores = split_cores(available_cores(), settings.sampler_cores,
                                                             settings.trainer_cores)
        self.process = None
        self._loader = None  # the dataloader drawing ahead for this sampler (draw_ahead)
        self.version = -1  # newest pushed
        self.next_step = 0  # the step whose batch the trainer takes next
        self.planned: deque[list[dict]] = deque()  # batches drawn ahead, for steps next_step, next_step + 1, ...
        self.submitted: dict[int, Request] = {}  # step -> its request in flight
        self.finished: dict[int, tuple] = {}  # request id -> (version, rollouts, seconds)
        self.last_seconds = 0.0
        self._ids = 0
        self._saved_affinity: Optional[set] = None
        self._saved_threads = torch.get_num_threads()
        self._finalizer: Optional[weakref.finalize] = None

    # ------------------------------------------------------------------ lifetime
    def start(self, policy: Policy, step: int) -> None:
        """Start the sampler process on the policy's weights (version ``step``), pin both sides."""
        context = mp.get_context("spawn")
        self._weights = {name: parameter.detach().to("cpu", copy=True).share_memory_()
                         for name, parameter in pushed_parameters(policy)}
        self._lock = context.Lock()
        self._version = context.Value("q", -1, lock=False)
        self._requests = context.Queue()
        self._results = context.Queue()
        self._requests.put((policy_arguments(policy), self.engine, self.sampling, self._weights))  # its set-up, first
        self.push(policy, step)
        self.next_step = step
        self.process = context.Process(  # light arguments only: the process binds to this one before heavy imports
            target=sampler_main, name="rloop-sampler", daemon=True,
            args=(os.getpid(), self._lock, self._version, self._requests, self._results, self.sampler_cores,
                  self.settings.sampler_device))
        self.process.start()
        self._finalizer = weakref.finalize(self, _stop, self.process, self._requests)
        atexit.register(self._finalizer)  # before multiprocessing's exit handler, whose SIGTERM the sampler ignores
        if hasattr(os, "sched_setaffinity"):
            self._saved_affinity = os.sched_getaffinity(0)
            os.sched_setaffinity(0, self.trainer_cores)
        torch.set_num_threads(len(self.trainer_cores))
        log.info("async rollouts: sampler process %d on cores %s, trainer on cores %s, max_staleness %d",
                 self.process.pid, self.sampler_cores, self.trainer_cores, self.settings.max_staleness)

    def draw_ahead(self, loader) -> None:
        """Have ``loader`` draw ``max_staleness`` batches ahead and announce them to ``plan``; ``close``
        stops it. The loader offers this through ``lookahead``/``lookahead_depth`` attributes (as
        ``data.resumable.ResumableDataLoader`` does); another loader cannot, and each batch is then sampled
        when the trainer reaches it."""
        if self.settings.max_staleness == 0:
            return
        if not (hasattr(loader, "lookahead") and hasattr(loader, "lookahead_depth")):
            log.warning("the training dataloader is not a ResumableDataLoader: asynchronous rollouts cannot see "
                        "prompts ahead, so each batch is sampled when the trainer reaches it (no overlap)")
            return
        loader.lookahead, loader.lookahead_depth = self.plan, self.settings.max_staleness
        self._loader = loader

    def close(self) -> None:
        """Stop the sampler process (idempotent), stop drawing prompts ahead and give the trainer its cores
        back."""
        if self._loader is not None:
            self._loader.lookahead, self._loader.lookahead_depth = None, 0
            self._loader = None
        if self._finalizer is not None:
            self._finalizer()
            atexit.unregister(self._finalizer)
            self._finalizer = None
        if self._saved_affinity is not None:
            os.sched_setaffinity(0, self._saved_affinity)
            self._saved_affinity = None
        torch.set_num_threads(self._saved_threads)

    # ------------------------------------------------------------------ weights
    def push(self, policy: Policy, version: int) -> None:
        """Publish the policy's weights as ``version`` and submit the batches that may now be sampled."""
        with self._lock, torch.no_grad():
            for name, parameter in pushed_parameters(policy):
                self._weights[name].copy_(parameter.detach())
            self._version.value = version
        self.version = version
        self._submit_due()

    # ------------------------------------------------------------------ batches
    def plan(self, problems: Optional[list[dict]]) -> None:
        """A batch the dataloader drew ahead (``None``: a new pass over the data begins, so what was
        planned beyond the current step is void)."""
        if problems is None:
            self.planned.clear()
            for step in [step for step in self.submitted if step >= self.next_step]:
                del self.submitted[step]
            return
        self.planned.append(problems)

    def take(self, step: int, problems: list[dict]) -> tuple[Rollouts, int]:
        """The rollouts of ``step``'s batch and the version that sampled them (waits for them)."""
        if self.planned and _ids(self.planned[0]) == _ids(problems):
            self.planned.popleft()
        self.next_step = step + 1
        request = self.submitted.pop(step, None)
        if request is None or request.problem_ids != _ids(problems):  # not drawn ahead: sample it now
            request = self._submit(step, problems, self.seed_of(step, 0))
        self._submit_due()  # the next batches start sampling while this one trains
        return self._wait(request)

    def sample_now(self, step: int, problems: list[dict], sampling_round: int) -> tuple[Rollouts, int]:
        """Extra prompts sampled at once with the newest version (dynamic sampling's refills)."""
        return self._wait(self._submit(step, problems, self.seed_of(step, sampling_round)))

    def _submit_due(self) -> None:
        for offset, problems in enumerate(self.planned):
            step = self.next_step + offset
            if not may_submit(step, self.version, self.settings.max_staleness):
                break
            if step not in self.submitted:
                self.submitted[step] = self._submit(step, problems, self.seed_of(step, 0))

    def _submit(self, step: int, problems: list[dict], seed: int) -> Request:
        self._ids += 1
        request = Request(self._ids, step, [p["prompt"] for p in problems], _ids(problems), self.num_samples, seed)
        self._requests.put(request)
        return request

    def _wait(self, request: Request) -> tuple[Rollouts, int]:
        deadline = None if self.settings.timeout is None else time.monotonic() + self.settings.timeout
        while request.id not in self.finished:
            try:
                message = self._results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the rollout sampler process (pid {self.process.pid}) died with exit code "
                                       f"{self.process.exitcode} while the trainer waited for the batch of step "
                                       f"{request.step}; its own output above says why") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the rollout sampler process (pid {self.process.pid}) is alive but gave no "
                                       f"batch for step {request.step} within rollout.timeout = "
                                       f"{self.settings.timeout:g} s; raise rollout.timeout if its batches (or its "
                                       "engine's start) really take that long")
                continue
            if message[0] == "error":
                raise RuntimeError(f"the rollout sampler process failed:\n{message[2]}")
            _, request_id, version, rollouts, seconds = message
            if request_id >= request.id or request_id in {r.id for r in self.submitted.values()}:
                self.finished[request_id] = (version, rollouts, seconds)  # older, unclaimed results are void
        version, rollouts, self.last_seconds = self.finished.pop(request.id)
        return rollouts, version


def _ids(problems: list[dict]) -> list:
    return [p.get("id", p["prompt"]) for p in problems]


def _stop(process, requests) -> None:
    """End the sampler process at once, even mid-batch: ``STOP_SIGNAL`` (it closes its engine), then SIGKILL
    after ``STOP_GRACE_SECONDS``; reap it. (SIGTERM would not do: the sampler ignores it.)"""
    if process.is_alive():
        try:
            os.kill(process.pid, STOP_SIGNAL)
        except ProcessLookupError:
            pass
        process.join(timeout=STOP_GRACE_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()
    requests.cancel_join_thread()
