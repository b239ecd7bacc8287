"""A DataLoader that continues mid-epoch after a restart, with the batches an uninterrupted run sees.

Lightning saves the ``state_dict`` of a training DataLoader that has one in its checkpoints and
calls ``load_state_dict`` on resume right before it creates the loader's iterator; without one, a
run resumed mid-epoch starts the epoch's batches over. ``ResumableDataLoader`` keeps the position:

- ``state_dict``: the sampler epoch of the current pass and ``batches_trained``, the batches of
  the pass the model has trained on. ``PhaseCheckpoint`` sets that count: Lightning fetches one
  batch ahead, so the loader cannot tell from what it handed out.
- ``load_state_dict`` arms the next pass: it sets the sampler epoch (Lightning sets it only after
  creating the iterator when it resumes) and skips the batches trained on, or, when the saved
  pass had ended, starts the next epoch.

The order of a pass must be a function of the sampler epoch and of the global torch RNG state when
the pass began (a ``RandomSampler`` without a generator draws its permutation's seed from it;
``DistributedSampler`` uses ``seed + epoch``): ``pass_start_rng`` records that state, and
``PhaseCheckpoint`` puts it back before the replayed pass begins. Skipped batches are fetched and
dropped (map-style datasets whose ``__getitem__`` has no side effects: records, problems).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """``DataLoader`` (same arguments) whose position Lightning saves and restores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pass_start_rng: Optional[torch.Tensor] = None
        """Global torch RNG state when the current pass began."""
        self.pass_epoch: Optional[int] = None
        """Sampler epoch of the current pass (None for samplers without epochs)."""
        self.batches_trained = 0
        """Batches of the current pass the model has trained on (set by ``PhaseCheckpoint``)."""
        self.lookahead: Optional[Callable[[Any], None]] = None
        """Told of every batch drawn once it is set (``None`` first when a pass begins): asynchronous
        rollouts sample prompts before the trainer reaches them."""
        self.lookahead_depth = 0
        """With ``lookahead``: batches drawn ahead of the one handed out."""
        self._resume: Optional[dict[str, Any]] = None

    def samplers(self) -> list:
        return [s for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)) if s is not None]

    def _set_epoch(self, epoch: Optional[int]) -> None:
        if epoch is None:
            return
        for sampler in self.samplers():
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    def _epoch(self) -> Optional[int]:
        return next((s.epoch for s in self.samplers() if isinstance(getattr(s, "epoch", None), int)), None)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.pass_epoch, "batches_trained": self.batches_trained, "length": len(self)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)

    @property
    def resuming_mid_pass(self) -> bool:
        """Whether the armed resume replays part of a pass (False: it starts a new pass)."""
        state = self._resume
        return state is not None and state["batches_trained"] < state["length"]

    def __iter__(self):
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None:
            epoch = resume["epoch"]
            if resume["batches_trained"] < resume["length"]:
                skip = resume["batches_trained"]
            elif epoch is not None:
                epoch += 1  # the saved pass had ended: the next one
            self._set_epoch(epoch)
        self.pass_start_rng = torch.get_rng_state()
        self.pass_epoch = self._epoch()
        self.batches_trained = skip
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        return self._drawn_ahead(iterator)

    def _drawn_ahead(self, iterator):
        """The batches of ``iterator`` in order, ``lookahead_depth`` of them drawn (and announced) ahead."""
        buffer, first = deque(), True
        while True:
            hook = self.lookahead
            while len(buffer) < 1 + (self.lookahead_depth if hook is not None else 0):
                batch = next(iterator, _END)
                if batch is _END:
                    break
                if hook is not None:
                    if first:
                        hook(None)
                    hook(batch)
                first = False
                buffer.append(batch)
            if not buffer:
                return
            yield buffer.popleft()


_END = object()
