"""The asynchronous sampler's own process: load a policy, then sample each request with the newest weights.

``rollout.async_sampler.AsyncSampler`` starts it (spawn) with light arguments only: the trainer's pid,
the weight lock and version, and the two queues. Its first act, before it imports torch or receives
anything heavy, is to bind its life to the trainer's (``child_processes.end_with_parent``: killed when
the trainer dies, gone at once if the trainer died while it started). The policy's arguments, the
engine, the sampling parameters and the shared-memory weights then come as the first message of the
request queue.

Signals: SIGTERM and SIGINT are ignored, since a job-wide preemption signal is the trainer's to act
on, and the trainer may be waiting for this process's batch to finish its own (``callbacks.preemption``).
The trainer stops this process with ``STOP_SIGNAL`` (SIGUSR1), at once, even mid-batch: the handler
raises ``SamplerStopped``, which ends ``generate`` or the wait for a request, and the engine is closed
on the way out.
"""

from __future__ import annotations

import os
import signal
import time
import traceback

from rloop_lightning.child_processes import end_with_parent, leave_stop_signals_to_parent

STOP_SIGNAL = signal.SIGUSR1


class SamplerStopped(BaseException):
    """The trainer stopped the sampler (``STOP_SIGNAL``); not an error."""


def _stop_now(signum, frame) -> None:
    signal.signal(STOP_SIGNAL, signal.SIG_IGN)  # once: closing the engine on the way out is not interrupted
    raise SamplerStopped


def _load_newest(policy, weights: dict, lock, version, loaded: int) -> int:
    import torch

    with lock:
        newest = version.value
        if newest != loaded:
            parameters = dict(policy.require_model().named_parameters())
            with torch.no_grad():
                for name, tensor in weights.items():
                    parameters[name].copy_(tensor)
    return newest


def sampler_main(parent: int, lock, version, requests, results, cores: list[int], device: str = "cpu") -> None:
    """The sampler process: bind to the trainer ``parent``, receive the set-up, then serve requests until stopped."""
    end_with_parent(parent)
    leave_stop_signals_to_parent()
    signal.signal(STOP_SIGNAL, _stop_now)
    engine = None
    try:
        os.sched_setaffinity(0, cores)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
        if device.startswith("cuda:"):  # this process sees that GPU alone (set before torch is imported)
            os.environ["CUDA_VISIBLE_DEVICES"] = device[5:]
        import torch

        from rloop_lightning.policy import Policy

        torch.set_num_threads(len(cores))
        arguments, engine, sampling, weights = requests.get()
        policy = Policy(**arguments)
        policy.load_model()
        if device != "cpu":
            policy.model.to("cuda:0")
        loaded = -1
        while True:
            request = requests.get()
            newest = _load_newest(policy, weights, lock, version, loaded)
            if newest != loaded:
                engine.sync_weights(policy)  # vLLM: reload (or the adapter); Hugging Face: its model is the policy's
                loaded = newest
            started = time.perf_counter()
            rollouts = engine.generate(policy, request.prompts, request.num_samples, sampling, seed=request.seed)
            results.put(("done", request.id, loaded, rollouts, time.perf_counter() - started))
    except SamplerStopped:  # results nobody will read must not hold the exit
        results.cancel_join_thread()
    except BaseException:  # noqa: BLE001 - the trainer raises it with this traceback
        results.put(("error", None, traceback.format_exc()))
    finally:
        if engine is not None:
            engine.close()
