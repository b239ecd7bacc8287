"""Benchmark: the vLLM engine (``VLLMEngine`` on vLLM's CPU build) against the Hugging Face engine,
and our GRPO step with vLLM against TRL's ``GRPOTrainer`` with its own vLLM mode.

Three measurements per model, side by side in one run:
- rollout throughput: generated tokens/s of ``engine.generate`` (prompts x samples, up to
  ``--max-new-tokens`` tokens; random models end early on EOS alike in both engines);
- GRPO step time: seconds per ``GRPOModule`` training step (rollout + update + weight sync) with
  each engine, the median over the steps after the first;
- the same against TRL's ``GRPOTrainer(args=GRPOConfig(use_vllm=True, vllm_mode="colocate"))`` on the
  model's saved directory, with the same prompts, reward, G, completions per step (one
  forward/backward each), learning rate and the loss settings of ``benchmarks.trl_reference``.
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

import os
import tempfile

from benchmarks import harness
from benchmarks.harness import Row

MODELS = ("rloop/tiny-llama", "rloop/small-llama-32k")
LEARNING_RATE = 1e-4


def digit_share(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def rollout_runs(policy, engines: dict, prompts: list[str], samples: int, max_new_tokens: int) -> dict:
    from rloop_lightning.rollout.base import SamplingParams

    sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)

    def run(engine):
        return lambda: engine.generate(policy, prompts, samples, sampling).num_completion_tokens

    return {name: run(engine) for name, engine in engines.items()}


def grpo_step_seconds(model: str, engine, prompts: int, samples: int, max_new_tokens: int, steps: int) -> float:
    import lightning as L
    import torch

    from rloop_lightning.data.datamodules import PromptDataModule
    from rloop_lightning.grpo import GRPOModule
    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.tasks import Countdown

    seconds: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seconds.append(float(trainer.callback_metrics["perf/step_seconds"]))

    module = GRPOModule(policy=Policy(model), engine=engine, sampling=SamplingParams(max_new_tokens=max_new_tokens),
                        num_generations=samples, reward_functions=[digit_share], micro_batch_size=prompts * samples,
                        optimizer=lambda params: torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0))
    data = PromptDataModule(Countdown(num_train=512, num_test=8, num_ood=8), batch_size=prompts)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[StepClock()])
    trainer.fit(module, data)
    return harness.median_or_nan(seconds[1:])


def trl_vllm_step_seconds(model: str, prompts: int, samples: int, max_new_tokens: int, steps: int) -> float:
    """Seconds per step of TRL's ``GRPOTrainer`` in its colocated vLLM mode (the median after the first
    step), set up as ``grpo_step_seconds``: TRL starts and syncs its own ``vllm.LLM``."""
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    from benchmarks.grpo_step import GRPOSetting, check_same_prompt_tokens
    from benchmarks.trl_reference import countdown_dataset, grpo_config
    from rloop_lightning.tasks import Countdown

    seconds: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = harness.clock()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(harness.since(self.start)[0])

    model_dir = harness.tiny_model_dir(model)
    dataset = countdown_dataset(Countdown(num_train=512, num_test=8, num_ood=8).load("train"))
    with tempfile.TemporaryDirectory() as output_dir:
        args = grpo_config(output_dir, seed=0, max_steps=steps, learning_rate=LEARNING_RATE, prompts_per_step=prompts,
                           num_generations=samples, max_completion_length=max_new_tokens, use_vllm=True,
                           vllm_mode="colocate")
        trainer = GRPOTrainer(model=model_dir, reward_funcs=[digit_share], args=args, train_dataset=dataset,
                              callbacks=[StepClock()])
        trainer.remove_callback(PrinterCallback)  # its log dicts would interleave with the table on stdout
        check_same_prompt_tokens(trainer, GRPOSetting(model_dir, prompts, samples, max_new_tokens, LEARNING_RATE,
                                                      0, steps), dataset[0]["prompt"])
        trainer.train()
    return harness.median_or_nan(seconds[1:])


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
    rows, details = [], []
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
        vllm_step = grpo_step_seconds(model, vllm_engine, args.prompts, args.samples, args.max_new_tokens,
                                      args.grpo_steps)
        hf_step = grpo_step_seconds(model, HFGenerateEngine(), args.prompts, args.samples, args.max_new_tokens,
                                    args.grpo_steps)
        rows.append(Row("GRPO step s (vLLM vs HF engine)", setting, vllm_step, hf_step, float("nan"), float("nan"),
                        "-", "{:.2f}"))
        vllm_engine.close()
        if use_trl:
            harness.log(f"{model}: TRL GRPO steps with vLLM")
            trl_step = trl_vllm_step_seconds(model, args.prompts, args.samples, args.max_new_tokens, args.grpo_steps)
        rows.append(Row("GRPO step s (ours with vLLM vs TRL with vLLM)", setting, vllm_step,
                        trl_step if use_trl else float("nan"), float("nan"), float("nan"), "<= 0.5", "{:.2f}"))
    details.append("TRL: GRPOConfig(use_vllm=True, vllm_mode=\"colocate\"), its own vllm.LLM in this process "
                   "(external_launcher, vLLM's default compiled mode; ours runs enforce_eager)")
    output = harness.report(harness.format_table(rows), started, details)
    print(output)
    return output


if __name__ == "__main__":
    main()
