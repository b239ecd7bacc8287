"""Asynchronous rollouts: per-step sampling seeds, the staleness bound, and the sampler process with the
Hugging Face engine (``max_staleness: 0`` is the synchronous phase exactly; 1 runs one batch ahead).

The sampler process is spawned (a fresh interpreter: ~5-10 s to import torch and transformers here),
so each phase test pays that once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import lightning as L
import psutil
import pytest
import torch

from rloop_lightning.callbacks.harvest import ExpertHarvester
from rloop_lightning.data.datamodules import PromptDataModule
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.policy import Policy
from rloop_lightning.rollout.async_sampler import AsyncSampler
from rloop_lightning.rollout.base import SamplingParams, sampling_seed
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.rollout.staleness import (
    DEFAULT_TIMEOUT_SECONDS, RolloutSettings, check_admissible, check_rollout_mode, may_submit, split_cores, staleness,
)
from rloop_lightning.tasks import Countdown

PROMPTS = ["12 3 -> 9\n", "1 2 -> 3\n"]


def digit_share(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# ---------------------------------------------------------------------- seeds
def test_sampling_seed_is_sha256_of_the_four_numbers():
    expected = int.from_bytes(hashlib.sha256(b"7/3/1/2").digest()[:8], "little") & (2**63 - 1)
    assert sampling_seed(7, 3, 1, 2) == expected
    assert sampling_seed(7, 3) == sampling_seed(7, 3, 0, 0)
    seeds = {sampling_seed(*numbers) for numbers in [(7, 3, 1, 2), (8, 3, 1, 2), (7, 4, 1, 2), (7, 3, 0, 2),
                                                     (7, 3, 1, 0)]}
    assert len(seeds) == 5 and all(0 <= seed < 2**63 for seed in seeds)


def test_hf_engine_with_a_seed_samples_the_same_and_leaves_the_global_rng_alone():
    policy = Policy("rloop/micro-llama")
    policy.load_model()
    engine, sampling = HFGenerateEngine(), SamplingParams(max_new_tokens=8)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = engine.generate(policy, PROMPTS, 4, sampling, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's stream did not move
    torch.manual_seed(123)  # another global state: the same samples
    again = engine.generate(policy, PROMPTS, 4, sampling, seed=11)
    other = engine.generate(policy, PROMPTS, 4, sampling, seed=12)
    assert again.completion_ids == first.completion_ids and again.sampler_logprobs == first.sampler_logprobs
    assert other.completion_ids != first.completion_ids


# ---------------------------------------------------------------------- staleness bound
def test_staleness_bound_admits_up_to_max_staleness_exactly():
    assert staleness(5, 3) == 2
    assert may_submit(5, 3, max_staleness=2) and not may_submit(6, 3, max_staleness=2)
    assert may_submit(3, 3, max_staleness=0) and not may_submit(4, 3, max_staleness=0)
    check_admissible(5, 3, 2)
    check_admissible(0, 0, 0)
    with pytest.raises(RuntimeError, match="staleness 3 is outside 0..max_staleness=2"):
        check_admissible(6, 3, 2)
    with pytest.raises(RuntimeError, match="staleness -1"):
        check_admissible(2, 3, 2)  # sampled by a version the trainer has not made yet


def test_cores_split_in_halves_by_default_and_bad_splits_are_named():
    assert split_cores([0, 1], None, None) == ([0], [1])
    assert split_cores([0, 1, 2, 3], None, None) == ([0, 1], [2, 3])
    assert split_cores([0, 1, 2], [2], [0, 1]) == ([0, 1], [2])
    with pytest.raises(ValueError, match=r"may use 1 core\(s\) \[0\]"):
        split_cores([0], None, None)
    with pytest.raises(ValueError, match=r"sampler_cores \[1, 5\] names cores \[5\]"):
        split_cores([0, 1], [1, 5], None)
    with pytest.raises(ValueError, match="trainer_cores is empty"):
        split_cores([0, 1], [0], [])


@pytest.mark.parametrize("settings, message", [
    (dict(max_staleness=-1), "max_staleness must be >= 0"),
    (dict(mode="later"), "rollout.mode must be 'sync' or 'async'"),
    (dict(timeout=0), "rollout.timeout must be positive"),
    (dict(sampler_device="gpu1"), "sampler_device must be 'cpu' or 'cuda:N'"),
])
def test_bad_rollout_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RolloutSettings(**settings)


# ---------------------------------------------------------------------- phases
class Trajectories(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(outputs["trajectories"])


class Metrics(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({key: float(value) for key, value in trainer.callback_metrics.items()})


def make_module(rollout=None, engine=None, **overrides) -> GRPOModule:
    settings = dict(policy=Policy("rloop/micro-llama"), sampling=SamplingParams(max_new_tokens=8), num_generations=4,
                    reward_functions=[digit_share], correct_threshold=0.3, rollout=rollout, engine=engine,
                    optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    settings.update(overrides)
    return GRPOModule(**settings)


def run_phase(module, steps, root, callbacks=()):
    data = PromptDataModule(Countdown(num_train=24, num_test=4, num_ood=4), batch_size=4)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        callbacks=[ExpertHarvester(), *callbacks])
    trainer.fit(module, data)
    return trainer


def harvest(root) -> dict[str, list[dict]]:
    return {path.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((root / "experts").rglob("step*.jsonl"))}


def sampler_children() -> list:
    """Live child processes other than multiprocessing's resource tracker (one per parent, by design)."""
    return [child.cmdline() for child in psutil.Process().children(recursive=True) if child.is_running()
            and child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline())]


@pytest.fixture
def one_thread():
    """Trainer and sampler each on one thread: the same kernels, hence the same float rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_async_with_max_staleness_zero_is_the_synchronous_phase_exactly(tmp_path, one_thread):
    """The same seed: the same completions, harvest and final weights, sampled in another process."""
    results = {}
    for mode in ("sync", "async"):
        torch.manual_seed(0)
        module = make_module(RolloutSettings(mode=mode, max_staleness=0, sampler_cores=[1], trainer_cores=[0]))
        recorder = Trajectories()
        run_phase(module, 4, tmp_path / mode, [recorder])
        results[mode] = (recorder.steps, harvest(tmp_path / mode),
                         {name: p.detach().clone() for name, p in module.policy.named_parameters()})
        assert not sampler_children()  # the sampler process ended with the phase
    (sync_steps, sync_harvest, sync_weights), (async_steps, async_harvest, async_weights) = results["sync"], results["async"]
    assert [[r["completion"] for r in step] for step in async_steps] == [[r["completion"] for r in step]
                                                                          for step in sync_steps]
    assert async_steps == sync_steps  # rewards, log-probs, versions: every field of every record
    assert all(r["policy_version"] == r["step"] for step in async_steps for r in step)
    assert async_harvest == sync_harvest and sum(len(v) for v in sync_harvest.values()) > 0
    initial = make_module().policy
    initial.load_model()
    moved = max(float((sync_weights[n] - p.detach()).abs().max()) for n, p in initial.named_parameters())
    assert moved > 1e-3
    for name, weight in sync_weights.items():
        assert torch.equal(async_weights[name], weight), name


@pytest.mark.slow
def test_async_with_max_staleness_one_samples_one_batch_ahead(tmp_path):
    torch.manual_seed(0)
    module = make_module(RolloutSettings(mode="async", max_staleness=1))
    recorder, metrics = Trajectories(), Metrics()
    run_phase(module, 5, tmp_path, [recorder, metrics])
    versions = [{r["policy_version"] for r in step} for step in recorder.steps]
    # batch k is submitted once version k - 1 exists and sampled by the newest version the sampler
    # finds when it starts it: k - 1 while the trainer still updates on batch k - 1, else k
    assert all(len(v) == 1 and step - 1 <= min(v) <= step for step, v in enumerate(versions)), versions
    assert versions[0] == {0}
    assert [row["rollout/staleness"] for row in metrics.rows] == [float(step - min(v)) for step, v in enumerate(versions)]
    assert all(row["importance/weight_mean"] > 0 for row in metrics.rows)  # on by default when stale
    assert {r["policy_version"] for records in harvest(tmp_path).values() for r in records} <= {0, 1, 2, 3}
    assert not sampler_children()


class DyingEngine(HFGenerateEngine):
    def generate(self, policy, prompts, num_samples, sampling, seed=None):
        os._exit(3)


class FailingEngine(HFGenerateEngine):
    def generate(self, policy, prompts, num_samples, sampling, seed=None):
        raise ValueError("the engine broke")


@pytest.mark.slow
@pytest.mark.parametrize("engine, message", [(DyingEngine(), "died with exit code 3 while the trainer waited for "
                                                             "the batch of step 0"),
                                             (FailingEngine(), "ValueError: the engine broke")])
def test_a_sampler_that_dies_or_fails_is_a_clear_error_and_leaves_no_process(tmp_path, engine, message):
    module = make_module(RolloutSettings(mode="async", max_staleness=1), engine=engine)
    with pytest.raises(RuntimeError, match=message):
        run_phase(module, 2, tmp_path)
    assert not sampler_children()


def test_async_on_one_core_is_refused_before_the_model_loads(tmp_path):
    module = make_module(RolloutSettings(mode="async", sampler_cores=None))
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        with pytest.raises(ValueError, match=r"may use 1 core\(s\)"):
            run_phase(module, 1, tmp_path)
    finally:
        os.sched_setaffinity(0, affinity)
    assert module.policy.model is None


@pytest.mark.slow
def test_async_phase_resumes_to_the_uninterrupted_outputs(tmp_path):
    """A crash mid-pass, then a resume from the last checkpoint: the queued rollouts are re-created from
    the per-step seeds (nothing of the queue is saved), dynamic sampling's refills included. With
    max_staleness 0 the outputs equal the uninterrupted asynchronous phase's."""
    import yaml
    from test_resume import grpo_config, phase_outputs, run_phase as run_resumable_phase

    config_path = grpo_config(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    config["model"]["rollout"] = {"mode": "async", "max_staleness": 0, "sampler_cores": [1], "trainer_cores": [0]}
    config_path.write_text(yaml.safe_dump(config))
    run_resumable_phase(GRPOModule, config_path, tmp_path / "reference", every_n_steps=None)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="crash"):
        run_resumable_phase(GRPOModule, config_path, resumed, every_n_steps=2, stop_at=2)
    assert not sampler_children()
    run_resumable_phase(GRPOModule, config_path, resumed, every_n_steps=2)
    reference = phase_outputs(tmp_path / "reference")
    assert any(name.startswith("experts/rank00/step") for name in reference)
    assert phase_outputs(resumed) == reference


SIGTERM_SCRIPT = """
import sys, time, torch
from rloop_lightning.policy import Policy
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.rollout.staleness import RolloutSettings
from rloop_lightning.rollout.async_sampler import AsyncSampler

if __name__ == "__main__":  # the sampler process is spawned: it imports this file
    policy = Policy("rloop/micro-llama")
    policy.load_model()
    sampler = AsyncSampler(RolloutSettings(mode="async"), HFGenerateEngine(), SamplingParams(max_new_tokens=4), 2,
                           lambda step, sampling_round: step)
    sampler.start(policy, 0)
    rollouts, version = sampler.take(0, [{"id": "a", "prompt": "1 2 -> 3"}])
    print(sampler.process.pid, len(rollouts), version, flush=True)
    time.sleep(600)
"""


def test_draw_ahead_hooks_a_resumable_loader_until_close_and_warns_for_another(caplog):
    from rloop_lightning.data.resumable import ResumableDataLoader

    sampler = AsyncSampler(RolloutSettings(mode="async", max_staleness=2), HFGenerateEngine(),
                           SamplingParams(max_new_tokens=4), 2, lambda step, sampling_round: step)
    loader = ResumableDataLoader([{"id": "a"}, {"id": "b"}], batch_size=1, collate_fn=list)
    sampler.draw_ahead(loader)
    assert loader.lookahead == sampler.plan and loader.lookahead_depth == 2
    sampler.close()
    assert loader.lookahead is None and loader.lookahead_depth == 0

    plain = [[{"id": "a"}]]
    with caplog.at_level("WARNING", logger="rloop_lightning.rollout.async_sampler"):
        sampler.draw_ahead(plain)
    assert "cannot see prompts ahead" in caplog.text and sampler._loader is None

    caplog.clear()
    zero = AsyncSampler(RolloutSettings(mode="async", max_staleness=0), HFGenerateEngine(),
                        SamplingParams(max_new_tokens=4), 2, lambda step, sampling_round: step)
    zero.draw_ahead(loader)  # staleness 0: nothing to draw ahead, and no warning
    assert loader.lookahead is None and not caplog.text


@pytest.mark.slow
def test_sigterm_to_the_trainer_leaves_no_sampler_process(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "trainer.py"
    script.write_text(SIGTERM_SCRIPT)
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        sampler_pid, completions, version = map(int, trainer.stdout.readline().split())
        assert (completions, version) == (2, 0) and psutil.pid_exists(sampler_pid)
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and psutil.pid_exists(sampler_pid) and \
                psutil.Process(sampler_pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.2)
        assert not psutil.pid_exists(sampler_pid) or psutil.Process(sampler_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        trainer.kill()


def test_async_on_several_ranks_is_refused_before_the_model_loads():
    module = make_module(RolloutSettings(mode="async"))
    with pytest.raises(ValueError, match="this phase has 2 ranks \\(SimpleNamespace\\): use rollout.mode=sync"):
        check_rollout_mode(module.rollout, 2, "SimpleNamespace")  # what setup() checks
    check_rollout_mode(module.rollout, 1, "SimpleNamespace")  # one rank, two cores: accepted
    assert module.policy.model is None


class StallingEngine(HFGenerateEngine):
    """Alive, never done: a generation stuck in a collective or a driver call, which no exit code reveals."""

    def generate(self, policy, prompts, num_samples, sampling, seed=None):
        time.sleep(3600)


@pytest.mark.slow
def test_a_stalled_sampler_is_a_named_timeout_by_default_and_close_stops_it_at_once():
    """No wait is unbounded by default (``rollout.timeout``: 1800 s, shortened here; the sampler's start counts
    toward the first batch), and ``close`` waits neither for the batch in flight nor for the queued ones: it stops
    the sampler at once, which closes its engine and exits 0 (it used to wait up to 30 s for the queue first)."""
    assert RolloutSettings().timeout == DEFAULT_TIMEOUT_SECONDS == 1800
    policy = Policy("rloop/micro-llama")
    policy.load_model()
    sampler = AsyncSampler(RolloutSettings(mode="async", max_staleness=0, timeout=2), StallingEngine(),
                           SamplingParams(max_new_tokens=4), 2, lambda step, sampling_round: step)
    sampler.start(policy, 0)
    try:
        for step in (1, 2):  # two batches queued ahead of step 0's
            sampler._submit(step, [{"id": str(step), "prompt": "1 1 -> 2"}], step)
        with pytest.raises(TimeoutError, match=r"sampler process \(pid \d+\) is alive but gave no batch for step 0 "
                                               r"within rollout.timeout = 2 s; raise rollout.timeout"):
            sampler.take(0, [{"id": "a", "prompt": "1 2 -> 3"}])
        assert sampler.process.is_alive()
        started = time.monotonic()
        sampler.close()
        closing = time.monotonic() - started
    finally:
        sampler.close()
    assert closing < 5 and sampler.process.exitcode == 0, (closing, sampler.process.exitcode)
    assert not sampler_children()


KILLED_IN_START_UP_SCRIPT = """
if __name__ == "__main__":  # the sampler process is spawned and imports this file: nothing heavy above this line
    import time
    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.async_sampler import AsyncSampler
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.rollout.hf import HFGenerateEngine
    from rloop_lightning.rollout.staleness import RolloutSettings

    policy = Policy("rloop/micro-llama")
    policy.load_model()
    sampler = AsyncSampler(RolloutSettings(mode="async"), HFGenerateEngine(), SamplingParams(max_new_tokens=4), 2,
                           lambda step, sampling_round: step)
    sampler.start(policy, 0)
    print(sampler.process.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_trainer_sigkilled_while_its_sampler_starts_leaves_no_sampler(tmp_path):
    """SIGKILL of the trainer right after it starts the sampler: the sampler, still starting, binds to the trainer
    before any heavy import and, finding it gone, exits. (It used to ask to die with its parent only after
    importing torch, by then for its new parent, and wait on its queue for ever, holding its memory.)"""
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(KILLED_IN_START_UP_SCRIPT)
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    sampler_pid = None
    try:
        sampler_pid = int(trainer.stdout.readline())
        trainer.kill()
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sampler_is_running(sampler_pid):
            time.sleep(0.1)
        assert not sampler_is_running(sampler_pid), f"sampler {sampler_pid} outlived its trainer by 20 s"
    finally:
        trainer.kill()
        if sampler_pid is not None and sampler_is_running(sampler_pid):
            os.kill(sampler_pid, 9)


def sampler_is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
