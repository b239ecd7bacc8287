"""Benchmark: asynchronous rollouts (a sampler process on its own cores, ``rollout.mode: async``) against
the synchronous GRPO phase at its best thread setting, with the Hugging Face and the vLLM engine.

Two measurements, side by side in one run:
- throughput: rollout samples per second of a GRPO phase (prompts x G per step, over the steps after
  the first, so start-up and vLLM's start are excluded), on ``rloop/tiny-llama`` (0.8M parameters)
  and ``rloop/small-llama-32k`` (36M); synchronous with 1 torch thread and with every core (the best
  one is the reference), asynchronous with ``max_staleness`` 1, the sampler on the upper half of the
  cores, the trainer on the rest. Target: async >= 1.3x the best synchronous setting on the 36M model.
- quality: held-out pass@1 of the tiny Countdown base (``configs/base/tiny_countdown.yaml``, built
  first if ``--base`` does not exist: ~4 min) after the same number of GRPO samples, synchronous vs
  asynchronous, over ``--seeds`` (Hugging Face engine; 100 test problems x 16 samples). Target: the
  asynchronous mean within the seed spread of the synchronous runs.

    python -m benchmarks.async_rollout           # 5 timed steps after a warm-up one, 8 prompts x 8, both models and engines; quality 3 seeds x 40 steps
    python -m benchmarks.async_rollout --quick   # tiny-llama, HF engine, 2 timed steps; quality 1 seed x 2 steps from the untrained model, 4 problems
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from benchmarks import harness

MODELS = ("rloop/tiny-llama", "rloop/small-llama-32k")
ROOT = Path(__file__).resolve().parents[1]


def digit_share(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


PROFILE = ("perf/step_seconds", "perf/rollout_seconds", "perf/sampler_seconds")


class StepClock:
    """Wall-clock time at the end of every training step, and the step's time profile: the whole step, the
    trainer's rollout part (sampling and scoring, or waiting for the sampler process) and the sampler
    process's busy time per batch (asynchronous only)."""

    def __init__(self):
        import lightning as L

        class Clock(L.Callback):
            def on_train_batch_end(inner, trainer, pl_module, outputs, batch, batch_idx):
                self.times.append(time.perf_counter())
                self.profiles.append({key: float(trainer.callback_metrics[key]) for key in PROFILE
                                      if key in trainer.callback_metrics})

        self.times: list[float] = []
        self.profiles: list[dict[str, float]] = []
        self.callback = Clock()

    def profile(self) -> list[str]:
        """Mean seconds per timed step (the first excluded): step, trainer's rollout part, trainer's update
        part, sampler busy ("-" when synchronous)."""
        timed = self.profiles[1:] or self.profiles
        mean = {key: statistics.mean(p[key] for p in timed) for key in PROFILE if timed and key in timed[0]}
        step, rollout = mean.get("perf/step_seconds", float("nan")), mean.get("perf/rollout_seconds", float("nan"))
        sampler = mean.get("perf/sampler_seconds")
        return [f"{step:.2f}", f"{rollout:.2f}", f"{step - rollout:.2f}", "-" if sampler is None else f"{sampler:.2f}"]

    def samples_per_second(self, samples_per_step: int) -> float:
        if len(self.times) < 2:
            return float("nan")
        return samples_per_step * (len(self.times) - 1) / (self.times[-1] - self.times[0])


def make_engine(name: str):
    if name == "vllm":
        from rloop_lightning.rollout.vllm import VLLMEngine

        return VLLMEngine(enforce_eager=True, seed=0, kv_cache_gib=1)
    from rloop_lightning.rollout.hf import HFGenerateEngine

    return HFGenerateEngine()


def grpo_phase(model: str, engine: str, mode: str, threads: int, steps: int, prompts: int, samples: int,
               max_new_tokens: int, seed: int = 0, reward=None, learning_rate: float = 1e-4,
               policy_dir: str | None = None):
    """Run one GRPO phase; returns (samples/s after the first step, the module)."""
    import lightning as L
    import torch

    from rloop_lightning.data.datamodules import PromptDataModule
    from rloop_lightning.grpo import GRPOModule, LossSettings
    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.rollout.staleness import RolloutSettings
    from rloop_lightning.tasks import Countdown

    torch.set_num_threads(threads)
    L.seed_everything(seed, verbose=False)
    module = GRPOModule(policy=Policy(policy_dir or model), engine=make_engine(engine),
                        sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens), num_generations=samples,
                        micro_batch_size=128, loss=LossSettings(clip_eps_high=0.28),
                        reward_functions=[reward] if reward else None,
                        rollout=RolloutSettings(mode=mode, max_staleness=1),
                        optimizer=lambda params: torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0))
    clock = StepClock()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock.callback])
    trainer.fit(module, PromptDataModule(Countdown(), batch_size=prompts, limit=512))
    if engine == "vllm":
        module.engine.close()
    return clock.samples_per_second(prompts * samples), module, clock.profile()


def throughput_rows(args) -> tuple[list[list], int]:
    """The throughput table, and the thread count of the fastest synchronous run of the first model with
    the Hugging Face engine (the quality comparison's synchronous setting)."""
    cores = len(os.sched_getaffinity(0))
    settings = [("sync", 1), ("sync", cores)] if cores > 1 else [("sync", 1)]
    settings.append(("async", 1))  # threads set by the core split
    rows, quality_threads = [], None
    for model in args.models:
        for engine in args.engines:
            rates, profiles = {}, {}
            for mode, threads in settings:
                harness.log(f"throughput: {model} {engine} {mode} threads={threads}")
                rates[(mode, threads)], _, profiles[(mode, threads)] = grpo_phase(
                    model, engine, mode, threads, args.steps + 1, args.prompts, args.samples, args.max_new_tokens,
                    reward=digit_share)
            best = max((rate, threads) for (mode, threads), rate in rates.items() if mode == "sync")
            if engine == "hf" and quality_threads is None:
                quality_threads = best[1]
            for (mode, threads), rate in rates.items():
                setting = (f"sync, {threads} thread(s)" if mode == "sync" else
                           "async, sampler/trainer on separate cores, max_staleness 1")
                rows.append([model, engine, setting, f"{rate:.1f}", f"{rate / best[0]:.2f}", *profiles[(mode, threads)]])
    return rows, quality_threads or 1


def countdown_base(args) -> str:
    """The tiny Countdown base's policy directory, built with the shipped RFT config if missing."""
    if args.quick:
        return harness.tiny_model_dir("rloop/tiny-llama")
    policy = Path(args.base)
    if not (policy / "config.json").exists():
        from rloop_lightning.loop.phases import PhaseSettings, build_phase
        from rloop_lightning.rft import RFTModule

        harness.log(f"building the tiny Countdown base in {policy.parent} (1000 RFT steps)")
        phase = build_phase(RFTModule, PhaseSettings(str(ROOT / "configs/base/tiny_countdown.yaml")),
                            {"trainer.default_root_dir": str(policy.parent), "trainer.enable_progress_bar": False})
        phase.trainer.fit(phase.model, datamodule=phase.datamodule)
    return str(policy)


def held_out_pass_at_1(policy, problems: int) -> float:
    from rloop_lightning.evaluation import Evaluator, evaluate_policy
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.rollout.hf import HFGenerateEngine
    from rloop_lightning.tasks import Countdown

    evaluator = Evaluator(Countdown(), split="test", num_samples=16, ks=[1], limit=problems, greedy=False,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=16))
    return evaluate_policy(policy, [evaluator], HFGenerateEngine(), seed=0)["countdown/test"]["pass@1"]


def quality_rows(args, best_sync_threads: int) -> tuple[list[list], list[str]]:
    base = countdown_base(args)
    results: dict[str, list[float]] = {"sync": [], "async": []}
    for seed in args.seeds:
        for mode in results:
            harness.log(f"quality: {mode} seed {seed}")
            _, module, _ = grpo_phase("countdown base", "hf", mode, best_sync_threads, args.quality_steps, 16, 8, 16,
                                   seed=seed, learning_rate=5e-4, policy_dir=base)
            results[mode].append(held_out_pass_at_1(module.policy, args.eval_problems))
    rows = []
    for mode, values in results.items():
        spread = f"{min(values):.3f}-{max(values):.3f}"
        rows.append([mode, len(values), args.quality_steps * 16 * 8, f"{statistics.mean(values):.3f}", spread,
                     " ".join(f"{v:.3f}" for v in values)])
    sync_values = results["sync"]
    within = min(sync_values) <= statistics.mean(results["async"]) <= max(sync_values)
    return rows, [f"async mean pass@1 within the synchronous seeds' range: {within}"]


def main(argv=None) -> str:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--engines", nargs="+", default=None, choices=["hf", "vllm"])
    parser.add_argument("--steps", type=int, default=None, help="timed GRPO steps (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--quality-steps", type=int, default=None)
    parser.add_argument("--eval-problems", type=int, default=None)
    parser.add_argument("--base", default="runs/base/tiny_countdown/policy",
                        help="the tiny Countdown base policy directory (built here when missing)")
    args = harness.fill_defaults(
        parser.parse_args(argv),
        quick=dict(models=["rloop/tiny-llama"], engines=["hf"], steps=2, seeds=[0], quality_steps=2, eval_problems=4),
        full=dict(models=list(MODELS), engines=["hf", "vllm"], steps=5, seeds=[0, 1, 2], quality_steps=40,
                  eval_problems=100))
    started = harness.setup(args.threads)
    throughput, quality_threads = throughput_rows(args)
    quality, notes = quality_rows(args, best_sync_threads=quality_threads)
    notes.insert(0, f"quality runs: synchronous with {quality_threads} thread(s), the best HF setting above")
    tables = "\n\n".join([
        harness.markdown_table(["model", "engine", "setting", "samples/s", "x best sync", "step s", "rollout s",
                                "update s", "sampler busy s"], throughput),
        harness.markdown_table(["mode", "seeds", "samples", "held-out pass@1 (mean)", "seed range", "per seed"],
                               quality)])
    text = harness.report(tables, started, notes)
    print(text)
    return text


if __name__ == "__main__":
    main()
