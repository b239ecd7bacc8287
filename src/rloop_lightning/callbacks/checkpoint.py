"""Mid-phase checkpoints that resume a GRPO or RFT phase exactly where it stopped.

``PhaseCheckpoint`` saves ``{dirpath}/stepNNNNNNN.ckpt`` (default ``dirpath``:
``{default_root_dir}/checkpoints``) every ``every_n_steps`` optimizer steps and/or every
``every_seconds`` seconds, after a whole training batch (for GRPO: a rollout batch with all its
optimizer steps and its harvest shard). ``trainer.fit(ckpt_path=PhaseCheckpoint.latest(dirpath))``
continues from it. A checkpoint holds what Lightning saves (weights or adapter, optimizer, LR
schedulers, loop counters, callback and data module states, the position of a
``ResumableDataLoader``) and, for every rank, what Lightning leaves out:

- the RNG states (torch, CUDA, Python ``random``, NumPy) and the torch state at which the data
  pass began, so a replayed pass draws the same order and sampling continues the same stream;
- the module's and the data module's own checkpoint state of that rank (GRPO's rollout step and
  prompt statistics, the refill draws of dynamic sampling): Lightning keeps rank 0's only.

Resuming with these gives byte-identical outputs to an uninterrupted run on CPU. Why not
``ModelCheckpoint(every_n_train_steps=N, save_last=True)``: under manual optimization (GRPO) it
ignores ``train_time_interval`` and warns at every save, it saves only when ``global_step % N == 0``
(never, when GRPO's ``num_mini_batches`` steps per rollout batch skip over the multiples of N, or
when an update is skipped), and it writes ``last.ckpt`` in place, so a SIGKILL mid-write leaves no
usable checkpoint. Here a checkpoint is written to a temporary name and renamed; the previous one
is deleted only after the rename. Once the phase completes (``on_fit_end``), the checkpoints are
deleted, unless ``keep_last``.

SIGTERM or SIGINT (a preemption, Ctrl-C) stops the phase after its current training batch: a
checkpoint is saved there when the phase has a cadence (``every_n_steps`` or ``every_seconds``), and
``Preempted`` exits with status 128 + the signal (``callbacks.preemption``).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from rloop_lightning.agreement import on_main_process, raise_together, values_of_ranks
from rloop_lightning.callbacks.preemption import Preempted, StopSignals, first_signal
from rloop_lightning.data.resumable import ResumableDataLoader

log = logging.getLogger(__name__)
CHECKPOINT = re.compile(r"step(\d+)\.ckpt")
RANKS_KEY = "rloop_ranks"


def rng_states() -> dict[str, Any]:
    """Every generator's state in types ``torch.load(weights_only=True)`` accepts (tensors, tuples, numbers):
    strategies that load checkpoints that way (``ModelParallelStrategy``) refuse pickled numpy arrays."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian))
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any], torch_cpu: bool = True) -> None:
    if torch_cpu:
        torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather(trainer: L.Trainer, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (every rank must call this)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    values: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def agreed_signal(trainer: L.Trainer, received: Optional[int]) -> Optional[int]:
    """The stop signal of every rank: the first rank's that received one (one all-reduce; every rank
    must call this)."""
    if trainer.world_size == 1:
        return received
    return first_signal([int(signum) or None for signum in values_of_ranks(received or 0)])


class PhaseCheckpoint(Checkpoint):
    """Save a resumable checkpoint every ``every_n_steps`` optimizer steps and/or ``every_seconds``.

    Args:
        dirpath: where checkpoints go; default ``{trainer.default_root_dir}/checkpoints``.
        every_n_steps: save when the optimizer step count reaches a new multiple of this (None: off).
        every_seconds: save when this many seconds have passed since the last save or the start of
            training (None: off); rank 0's clock decides for every rank.
        keep_last: keep the newest checkpoint when the fit completes (default: delete them all).
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_steps: Optional[int] = None,
                 every_seconds: Optional[float] = None, keep_last: bool = False):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0 or None, got {every_seconds}")
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self.keep_last = keep_last
        self._last_saved_step = 0
        self._last_saved_time = time.monotonic()
        self._restored: Optional[dict[str, Any]] = None  # this rank's state, until training starts
        self._signals = StopSignals()

    # ------------------------------------------------------------------ paths
    def root(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "checkpoints"

    @staticmethod
    def checkpoints(dirpath: str | os.PathLike) -> list[Path]:
        """Complete checkpoints in ``dirpath``, oldest first (temporary files are not listed)."""
        found = [(int(match.group(1)), path) for path in Path(dirpath).glob("step*.ckpt")
                 if (match := CHECKPOINT.fullmatch(path.name))]
        return [path for _, path in sorted(found)]

    @classmethod
    def latest(cls, dirpath: str | os.PathLike) -> Optional[Path]:
        """The newest complete checkpoint in ``dirpath``, or None."""
        found = cls.checkpoints(dirpath)
        return found[-1] if found else None

    # ------------------------------------------------------------------ saving
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signals.install()  # after Lightning's own handlers (its SIGTERM stop exits with status 0)
        self._last_saved_step = trainer.global_step
        self._last_saved_time = time.monotonic()
        loader = self.loader(trainer)
        if self._restored is not None:
            state, self._restored = self._restored, None
            # the torch state was set for the replayed pass (load); it continues from the saved one,
            # unless the pass began after the save (it drew from the saved state already)
            mid_pass = loader is not None and loader.batches_trained > 0
            set_rng_states(state["rng"], torch_cpu=mid_pass or loader is None)
            if loader is None and trainer.ckpt_path is not None:
                log.warning("the training dataloader is not a ResumableDataLoader: a phase resumed mid-epoch "
                            "starts the epoch's batches over")

    @staticmethod
    def loader(trainer: L.Trainer) -> Optional[ResumableDataLoader]:
        loader = trainer.train_dataloader
        return loader if isinstance(loader, ResumableDataLoader) else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loader = self.loader(trainer)
        if loader is not None:
            loader.batches_trained = batch_idx + 1
        if self._due(trainer):
            self.save(trainer)
        signum = agreed_signal(trainer, self._signals.received)  # every rank stops after one batch
        if signum is not None:
            self.stop(trainer, signum)

    def stop(self, trainer: L.Trainer, signum: int) -> None:
        """End the phase after this batch on a signal: save a checkpoint if the phase has a cadence, raise
        ``Preempted``."""
        self._signals.restore()
        self._signals.received = None  # handled here, not again at teardown
        saved = None
        if self.every_n_steps is not None or self.every_seconds is not None:
            saved = self.save(trainer) if trainer.global_step != self._last_saved_step else self.latest(self.root(trainer))
        name = signal.Signals(signum).name
        where = (f"checkpoint {saved}; rerun the same command to resume from it" if saved is not None else
                 "no checkpoint (no cadence, or no optimizer step yet): a rerun starts the phase over")
        message = f"{name}: phase stopped after step {trainer.global_step}, {where}"
        log.warning(message)
        raise Preempted(signum, message)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._signals.restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A signal that came after the last batch (while the phase exported its policy) still stops the
        run: the phase is not marked done, and a rerun redoes it."""
        signum = agreed_signal(trainer, self._signals.received) if stage == "fit" else None
        self._signals.restore()
        if signum is not None:
            message = (f"{signal.Signals(signum).name} after the last training batch: the phase finished but is "
                       "not marked done, and a rerun redoes it")
            log.warning(message)
            raise Preempted(signum, message)

    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        if step == self._last_saved_step:  # no optimizer step since the last save
            return False
        every = self.every_n_steps
        due = every is not None and step // every > self._last_saved_step // every
        if self.every_seconds is not None:
            late = time.monotonic() - self._last_saved_time >= self.every_seconds
            due = due or bool(trainer.strategy.broadcast(late))
        return due

    def save(self, trainer: L.Trainer) -> Path:
        """Write the checkpoint of the current step (every rank calls this), then drop older ones."""
        root = self.root(trainer)
        path = root / f"step{trainer.global_step:07d}.ckpt"
        # one name on every rank: sharded strategies write one directory together (one run per directory)
        temporary = root / f".{path.name}.tmp-save"

        def prepare() -> None:
            root.mkdir(parents=True, exist_ok=True)
            if temporary.exists():  # left by a crash mid-save
                remove(temporary)

        def publish() -> None:
            os.replace(temporary, path)
            for older in self.checkpoints(root):
                if older != path:
                    remove(older)

        # the main process's file steps end in on_main_process, not a barrier: a failure (a full disk)
        # stops every rank at once, with the main process's error
        on_main_process(f"the checkpoint of step {trainer.global_step}", prepare)
        started = time.perf_counter()
        with deferred_write_error(trainer.strategy) as failure:
            trainer.save_checkpoint(temporary)  # every rank dumps its state; ends with a barrier
        raise_together(failure.error, f"the checkpoint of step {trainer.global_step}")
        on_main_process(f"the checkpoint of step {trainer.global_step}", publish)
        self._last_saved_step = trainer.global_step
        self._last_saved_time = time.monotonic()
        log.info("checkpoint %s (%.2f s)", path, time.perf_counter() - started)
        return path

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loader = self.loader(trainer)
        module_state: dict = {}
        pl_module.on_save_checkpoint(module_state)
        datamodule = trainer.datamodule
        mine = {"rng": rng_states(), "pass_start_rng": loader.pass_start_rng if loader is not None else None,
                "module": module_state, "datamodule": {} if datamodule is None else datamodule.state_dict()}
        checkpoint[RANKS_KEY] = gather(trainer, mine)

    # ------------------------------------------------------------------ loading
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Runs after Lightning restored module and data module (rank 0's state): this rank's state on top."""
        ranks = checkpoint.get(RANKS_KEY)
        if ranks is None:
            return
        if len(ranks) != trainer.world_size:
            raise ValueError(f"{trainer.ckpt_path} was saved by {len(ranks)} processes; this run has "
                             f"{trainer.world_size}. Resume with the same number of devices.")
        state = ranks[trainer.global_rank]
        pl_module.on_load_checkpoint(state["module"])
        if trainer.datamodule is not None:
            trainer.datamodule.load_state_dict(state["datamodule"])
        # the data pass that resumes is created before training starts: it must draw from the state
        # the saved pass drew from (or, if that pass had ended, from the state at the save)
        pass_start = state["pass_start_rng"]
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        batches = loops.get("combined_loader")
        ended = not batches or batches[0]["batches_trained"] >= batches[0]["length"]
        torch.set_rng_state(state["rng"]["torch"] if ended or pass_start is None else pass_start)
        self._restored = state

    # ------------------------------------------------------------------ clean-up
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The phase is complete: its checkpoints go, but the newest with ``keep_last``."""
        root = self.root(trainer)

        def clean() -> None:
            if not root.exists():
                return
            found = self.checkpoints(root)
            for path in found[:-1] if self.keep_last else found:
                remove(path)
            for temporary in root.glob(".step*.tmp-*"):
                remove(temporary)
            if not any(root.iterdir()):
                root.rmdir()

        on_main_process("PhaseCheckpoint (deleting the phase's checkpoints)", clean)


class WriteError:
    """What ``deferred_write_error`` caught: the main process's checkpoint write error, or None."""

    error: Optional[Exception] = None


@contextmanager
def deferred_write_error(strategy) -> Iterator[WriteError]:
    """Catch an error of the strategy's checkpoint writer (``checkpoint_io.save_checkpoint``: the main
    process's file write under DDP) instead of raising it, so that the main process still reaches the
    barrier that ends ``Trainer.save_checkpoint``; the caller then raises it on every rank
    (``raise_together``). Sharded strategies write with ``torch.distributed.checkpoint``, whose ranks
    share a failure themselves."""
    failure = WriteError()
    io = getattr(strategy, "checkpoint_io", None)
    if io is None:
        yield failure
        return
    own, write = vars(io).get("save_checkpoint"), io.save_checkpoint

    def guarded(*args, **kwargs):
        try:
            return write(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- raised on every rank after the barrier
            failure.error = error

    io.save_checkpoint = guarded
    try:
        yield failure
    finally:
        if own is None:
            del io.save_checkpoint  # the class's method again
        else:
            io.save_checkpoint = own


def remove(path: Path) -> None:
    """A checkpoint is a file, or a directory under sharded strategies."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
