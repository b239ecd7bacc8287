"""Benchmark: the vLLM engine (``VLLMEngine`` on vLLM's CPU build) against the Hugging Face engine,
and our GRPO step with vLLM against TRL's ``GRPOTrainer`` with its own vLLM mode.

Three measurements per model, side by side in one run:
- rollout throughput: generated tokens/s of ``engine.generate`` (prompts x samples, up to
  ``--max-new-tokens`` tokens; random models end early on EOS alike in both engines);
- GRPO step time: wall-clock seconds per ``GRPOModule`` training step with each engine, from the
  step's start to the end of the weight sync that follows its update (rollout + update + sync), the
  median over the steps after the first;
- the same against TRL's ``GRPOTrainer(args=GRPOConfig(use_vllm=True, vllm_mode="colocate"))`` on the
  model's saved directory, with the same prompts, reward, G, completions per step (one
  forward/backward each), learning rate and the loss settings of ``benchmarks.trl_reference``; its
  step (``on_step_begin`` to ``on_step_end``) holds its sync, which TRL runs before each rollout.
A second table splits each step time: the weight sync alone (``VLLMEngine.sync_weights``, TRL's
``VLLMGeneration.sync_weights``) and the rest, medians over the same steps.
Models: ``rloop/tiny-llama`` (0.8M parameters, 95-token vocabulary: Python overheads dominate) and
``rloop/small-llama-32k`` (36M parameters, 32k vocabulary: matrix multiplies dominate).
Targets: vLLM >= 1.5x the HF engine's tokens/s on the larger model; our GRPO step with vLLM <= 0.5x
TRL's with vLLM. vLLM's start-up (~30 s the first time in a process) is excluded: one engine serves
the whole run of ours, TRL starts its own in ``GRPOTrainer.__init__``. Both vLLMs get a 1 GiB KV cache
(``VLLM_CPU_KVCACHE_SPACE=1``).

    python -m benchmarks.vllm_rollout            # 32 prompts x 8 samples x 32 tokens, 3 repeats, 4 GRPO steps
    python -m benchmarks.vllm_rollout --quick    # 8 prompts x 4 samples x 16 tokens, 1 repeat, 2 GRPO steps
"""

from __future__ import annotations

import math
import os
import tempfile
import time

from benchmarks import harness
from benchmarks.harness import Row

MODELS = ("rloop/tiny-llama", "rloop/small-llama-32k")
LEARNING_RATE = 1e-4


def digit_share(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


class StepClock:
    """Wall-clock seconds of each training step and of the weight syncs run within it, and the step's
    CPU seconds (this process's, every thread: vLLM runs in process for both trainers).

    ``begin()`` opens a step and closes the one before; ``mark()`` notes that the open step did
    something up to now (its last hook, or a sync ending). A step lasts from its ``begin()`` to its
    last ``mark()``, so whichever hook runs the sync, it falls inside the step it follows.
    """

    def __init__(self):
        self.steps: list[float] = []
        self.steps_cpu: list[float] = []
        self.syncs: list[float] = []
        self._start: float | None = None
        self._start_cpu = self._last_cpu = 0.0
        self._last = 0.0
        self._sync = 0.0

    def begin(self) -> None:
        self.close()
        self._start = self._last = time.perf_counter()
        self._start_cpu = self._last_cpu = time.process_time()
        self._sync = 0.0

    def mark(self) -> None:
        if self._start is not None:
            self._last, self._last_cpu = time.perf_counter(), time.process_time()

    def close(self) -> None:
        if self._start is not None:
            self.steps.append(self._last - self._start)
            self.steps_cpu.append(self._last_cpu - self._start_cpu)
            self.syncs.append(self._sync)
            self._start = None

    def time_syncs(self, engine, name: str = "sync_weights") -> None:
        """Wrap ``engine.name`` so its seconds count as weight sync of the open step (and mark it)."""
        sync = getattr(engine, name)

        def timed_sync(*args, **kwargs):
            started = time.perf_counter()
            try:
                return sync(*args, **kwargs)
            finally:
                if self._start is not None:
                    self._sync += time.perf_counter() - started
                    self.mark()

        setattr(engine, name, timed_sync)

    def medians(self) -> tuple[float, float, float]:
        """(step, sync, step CPU) median seconds over the steps after the first (its warm-up is not typical)."""
        return step_medians(self.steps, self.syncs, self.steps_cpu)


def step_medians(*series: list[float]) -> tuple[float, ...]:
    """The median of each series over all steps but the first; NaN when there are none."""
    return tuple(harness.median_or_nan(values[1:]) for values in series)


def step_split(step: float, sync: float) -> list[str]:
    """Table cells: the step, its weight sync, the rest, and the sync's share of the step."""
    if not (math.isfinite(step) and math.isfinite(sync)):
        return ["n/a"] * 4
    share = f"{sync / step:.0%}" if step > 0 else "n/a"
    return [f"{step:.2f}", f"{sync:.3f}", f"{step - sync:.2f}", share]


def rollout_runs(policy, engines: dict, prompts: list[str], samples: int, max_new_tokens: int) -> dict:
    from rloop_lightning.rollout.base import SamplingParams

    sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)

    def run(engine):
        return lambda: engine.generate(policy, prompts, samples, sampling).num_completion_tokens

    return {name: run(engine) for name, engine in engines.items()}


def grpo_step_seconds(model: str, engine, prompts: int, samples: int, max_new_tokens: int,
                      steps: int) -> tuple[float, float, float]:
    """(step, weight sync, step CPU) median seconds of our ``GRPOModule`` with ``engine``; the step ends with the
    sync after its update (``on_train_batch_end``). The sync before the first step is in no step."""
    import lightning as L
    import torch

    from rloop_lightning.data.datamodules import PromptDataModule
    from rloop_lightning.grpo import GRPOModule
    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.tasks import Countdown

    clock = StepClock()
    clock.time_syncs(engine)

    class StepHooks(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.mark()

    module = GRPOModule(policy=Policy(model), engine=engine, sampling=SamplingParams(max_new_tokens=max_new_tokens),
                        num_generations=samples, reward_functions=[digit_share], micro_batch_size=prompts * samples,
                        optimizer=lambda params: torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0))
    data = PromptDataModule(Countdown(num_train=512, num_test=8, num_ood=8), batch_size=prompts)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[StepHooks()])
    try:
        trainer.fit(module, data)
    finally:
        del engine.sync_weights  # the engine's own method again (it serves the next measurements)
    clock.close()
    return clock.medians()


def sync_by_reload(generation) -> None:
    """Give TRL's colocated vLLM (``GRPOTrainer.vllm_generation``) a weight sync that works on vLLM's CPU
    build: the same parameters TRL sends (``_iter_named_params``), through vLLM's in-place
    ``reload_weights``, as ``VLLMEngine.sync_weights`` does. TRL's own sync calls ``model.load_weights``
    per parameter, which fails there: CPU post-load processing swaps each linear layer's weight for a
    packed copy without a ``weight_loader``."""
    from rloop_lightning.rollout.vllm import _reprocess_tied_output_head

    def sync_weights():
        llm = generation.llm
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": generation._iter_named_params()})
        llm.apply_model(_reprocess_tied_output_head)
        llm.reset_prefix_cache()

    generation.sync_weights = sync_weights


def trl_vllm_step_seconds(model: str, prompts: int, samples: int, max_new_tokens: int,
                          steps: int) -> tuple[float, float, float]:
    """(step, weight sync, step CPU) median seconds of TRL's ``GRPOTrainer`` in its colocated vLLM mode, set up as
    ``grpo_step_seconds``: TRL starts its own ``vllm.LLM`` and syncs it at the start of each step (on
    CPU through ``sync_by_reload``)."""
    import torch

    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    from benchmarks.grpo_step import GRPOSetting, check_same_prompt_tokens
    from benchmarks.trl_reference import countdown_dataset, grpo_config
    from rloop_lightning.tasks import Countdown

    clock = StepClock()

    class StepHooks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()
            clock.close()

    model_dir = harness.tiny_model_dir(model)
    dataset = countdown_dataset(Countdown(num_train=512, num_test=8, num_ood=8).load("train"))
    with tempfile.TemporaryDirectory() as output_dir:
        args = grpo_config(output_dir, seed=0, max_steps=steps, learning_rate=LEARNING_RATE, prompts_per_step=prompts,
                           num_generations=samples, max_completion_length=max_new_tokens, use_vllm=True,
                           vllm_mode="colocate")
        trainer = GRPOTrainer(model=model_dir, reward_funcs=[digit_share], args=args, train_dataset=dataset,
                              callbacks=[StepHooks()])
        if not torch.cuda.is_available():
            sync_by_reload(trainer.vllm_generation)
        clock.time_syncs(trainer.vllm_generation)
        trainer.remove_callback(PrinterCallback)  # its log dicts would interleave with the table on stdout
        check_same_prompt_tokens(trainer, GRPOSetting(model_dir, prompts, samples, max_new_tokens, LEARNING_RATE,
                                                      0, steps), dataset[0]["prompt"])
        trainer.train()
    return clock.medians()


def main(argv=None) -> str:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--samples", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--grpo-steps", type=int)
    args = harness.fill_defaults(parser.parse_args(argv),
                                 quick=dict(prompts=8, samples=4, max_new_tokens=16, repeats=1, grpo_steps=2),
                                 full=dict(prompts=32, samples=8, max_new_tokens=32, repeats=3, grpo_steps=4))
    started = harness.setup(args.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, for our engine and TRL's alike

    from benchmarks.grpo_step import trl_available
    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.hf import HFGenerateEngine
    from rloop_lightning.rollout.vllm import VLLMEngine
    from rloop_lightning.tasks import Countdown

    prompts = [p["prompt"] for p in Countdown(num_train=args.prompts, num_test=8, num_ood=8).load("train")]
    rows, split_rows, details = [], [], []
    use_trl = trl_available()
    for model in MODELS:
        harness.log(f"{model}: rollouts")
        policy = Policy(model)
        policy.load_model()
        vllm_engine = VLLMEngine(enforce_eager=True, seed=0)
        vllm_engine.load_policy(policy)  # start-up outside the timed runs
        timings = harness.interleaved(
            rollout_runs(policy, {"vllm": vllm_engine, "hf": HFGenerateEngine()}, prompts, args.samples,
                         args.max_new_tokens), args.repeats)
        (vllm_rate, vllm_cpu), (hf_rate, hf_cpu) = harness.median_rates(timings["vllm"]), harness.median_rates(timings["hf"])
        setting = f"{model}, {args.prompts} x {args.samples} x <= {args.max_new_tokens} tokens"
        target = ">= 1.5x" if model.endswith("32k") else "-"
        rows.append(Row("rollout tokens/s (vLLM vs HF engine)", setting, vllm_rate, hf_rate, vllm_cpu, hf_cpu, target))
        harness.log(f"{model}: GRPO steps")
        steps = {"ours, vLLM engine": grpo_step_seconds(model, vllm_engine, args.prompts, args.samples,
                                                        args.max_new_tokens, args.grpo_steps),
                 "ours, HF engine": grpo_step_seconds(model, HFGenerateEngine(), args.prompts, args.samples,
                                                      args.max_new_tokens, args.grpo_steps)}
        vllm_engine.close()
        if use_trl:
            harness.log(f"{model}: TRL GRPO steps with vLLM")
            steps["TRL, its vLLM mode"] = trl_vllm_step_seconds(model, args.prompts, args.samples,
                                                                args.max_new_tokens, args.grpo_steps)
        nan = float("nan")
        (vllm_step, _, vllm_cpu), (hf_step, _, hf_cpu) = steps["ours, vLLM engine"], steps["ours, HF engine"]
        trl_step, _, trl_cpu = steps.get("TRL, its vLLM mode", (nan, nan, nan))
        rows.append(Row("GRPO step s, sync included (vLLM vs HF engine)", setting, vllm_step, hf_step, vllm_cpu,
                        hf_cpu, "-", "{:.2f}"))
        rows.append(Row("GRPO step s, sync included (ours with vLLM vs TRL with vLLM)", setting, vllm_step, trl_step,
                        vllm_cpu, trl_cpu, "<= 0.5", "{:.2f}"))
        split_rows += [[model, trainer, *step_split(step, sync), f"{cpu:.2f}"]
                       for trainer, (step, sync, cpu) in steps.items()]
    details.append("TRL: GRPOConfig(use_vllm=True, vllm_mode=\"colocate\"), its own vllm.LLM in this process "
                   "(external_launcher, vLLM's default compiled mode; ours runs enforce_eager)")
    details.append("step: from a step's start to the end of the weight sync after its update (ours) or of the "
                   "step (TRL, which syncs before each rollout); medians over the steps after the first")
    tables = (harness.format_table(rows) + "\n\n" +
              harness.markdown_table(["model", "GRPO step", "step s (sync included)", "weight sync s",
                                      "rest of the step s", "sync share", "step CPU s"], split_rows))
    output = harness.report(tables, started, details)
    print(output)
    return output


if __name__ == "__main__":
    main()
