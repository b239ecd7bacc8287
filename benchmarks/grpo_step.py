"""Benchmark: GRPO step time (rollout + reward + update) of ``GRPOModule`` against TRL's
``GRPOTrainer``, and against itself without prompt sharing, on CPU.

Both trainers get the same saved model directory, prompts, ``countdown_reward``, G, completions per
step, completion length, learning rate, beta = 0, one optimizer step per rollout batch, fp32,
constant learning rate, no weight decay (TRL's side: ``benchmarks.trl_reference``). Ratio ours/TRL;
target <= 0.5. A second row per setting times ours against ours with ``share_prompts=False`` in the
engine and the module (every row's prompt run through the model). Step time is the median over
``--rounds`` runs per trainer (taking turns) of ``--steps`` steps each, after ``--warmup`` untimed
steps per run. The check that TRL tokenises prompts into the same ids as our ``Policy`` stops the
run if not.

    python -m benchmarks.grpo_step            # 8x8 16x8 16x16 16x8+160, 3 rounds (~5-7 min on 2 cores)
    python -m benchmarks.grpo_step --quick    # 8x8, 1 round of 3 steps (~1 min)
    python -m benchmarks.grpo_step --no-trl   # without TRL (its rows read n/a)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from functools import partial

from benchmarks import harness
from benchmarks.harness import Row, clock, median_or_nan, since


@dataclass
class StepTimes:
    """Per-step seconds of the timed (post warm-up) steps of one trainer, pooled over rounds."""

    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)
    rollout_seconds: list[float] = field(default_factory=list)
    completion_lengths: list[float] = field(default_factory=list)

    def extend(self, other: StepTimes) -> None:
        for name in ("step_seconds", "step_cpu_seconds", "rollout_seconds", "completion_lengths"):
            getattr(self, name).extend(getattr(other, name))

    def keep_after(self, warmup: int) -> StepTimes:
        """Drop the first ``warmup`` steps (there is one rollout call per step)."""
        for name in ("step_seconds", "step_cpu_seconds", "rollout_seconds", "completion_lengths"):
            setattr(self, name, getattr(self, name)[warmup:])
        return self

    def describe(self, name: str) -> str:
        step = median_or_nan(self.step_seconds)
        rollout = median_or_nan(self.rollout_seconds)
        length = sum(self.completion_lengths) / len(self.completion_lengths) if self.completion_lengths else float("nan")
        return (f"{name}: step {step:.2f} s wall (range {min(self.step_seconds):.2f}-{max(self.step_seconds):.2f}), "
                f"{median_or_nan(self.step_cpu_seconds):.2f} s CPU; rollout {rollout:.2f} s ({rollout / step:.0%}); "
                f"mean completion length {length:.1f}")


@dataclass
class GRPOSetting:
    """What both trainers are given (besides the model directory and the reward)."""

    model_dir: str
    prompts_per_step: int
    num_generations: int
    max_new_tokens: int
    learning_rate: float
    warmup: int
    steps: int
    num_prompts: int = 512
    share_prompts: bool = True
    """Ours only: each distinct prompt pre-filled / run once (engine and update)."""
    instruction: str = ""
    """Text put before every prompt (a task instruction, as real recipes have)."""

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations


def instruction(tokens: int) -> str:
    """A task instruction of ``tokens`` characters (the tiny tokenizer has one token per character)."""
    text = ("Use each of the given numbers exactly once, with + - * and /, to write an expression "
            "whose value is the target. Answer with the expression only. ")
    return (text * (tokens // len(text) + 1))[:tokens]


def time_ours(setting: GRPOSetting) -> StepTimes:
    """``GRPOModule`` under a Lightning ``Trainer``: one rollout batch and one optimizer step per step."""
    import lightning as L
    import torch

    from rloop_lightning.data.datamodules import PromptDataModule
    from rloop_lightning.grpo import GRPOModule
    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.rollout.hf import HFGenerateEngine
    from rloop_lightning.tasks import Countdown
    from rloop_lightning.tasks.countdown import countdown_reward

    times = StepTimes()

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.start = clock()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            wall, cpu = since(self.start)
            times.step_seconds.append(wall)
            times.step_cpu_seconds.append(cpu)
            times.completion_lengths.append(float(trainer.callback_metrics["train/completion_length_mean"]))

    torch.manual_seed(0)
    module = GRPOModule(
        Policy(setting.model_dir, prompt_template=setting.instruction + "{prompt}"),
        engine=HFGenerateEngine(share_prompts=setting.share_prompts),
        sampling=SamplingParams(max_new_tokens=setting.max_new_tokens),
        num_generations=setting.num_generations, micro_batch_size=setting.completions_per_step,
        share_prompts=setting.share_prompts, reward_functions=[countdown_reward],
        optimizer=partial(torch.optim.AdamW, lr=setting.learning_rate, weight_decay=0.0),
    )
    harness.timed(module.engine, "generate", times.rollout_seconds)
    datamodule = PromptDataModule(Countdown(num_train=setting.num_prompts), batch_size=setting.prompts_per_step)
    trainer = L.Trainer(max_steps=setting.warmup + setting.steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StepTimer()])
    trainer.fit(module, datamodule)
    return times.keep_after(setting.warmup)


def check_same_prompt_tokens(trainer, setting: GRPOSetting, prompt: str) -> None:
    """TRL must feed the model the same token ids as our policy does (no chat template, same specials)."""
    from rloop_lightning.policy import Policy

    theirs = trainer.processing_class(text=[setting.instruction + prompt])["input_ids"][0]
    ours = Policy(setting.model_dir, prompt_template=setting.instruction + "{prompt}").encode_prompts([prompt])[0]
    if list(theirs) != list(ours):
        raise RuntimeError(f"TRL tokenises {prompt!r} as {theirs}, ours as {ours}: not a like-for-like comparison")


def time_trl(setting: GRPOSetting) -> StepTimes:
    """TRL's ``GRPOTrainer`` on the same model directory, prompts, reward and settings."""
    import torch
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    from benchmarks.trl_reference import countdown_dataset, grpo_config
    from rloop_lightning.tasks import Countdown
    from rloop_lightning.tasks.countdown import countdown_reward

    times = StepTimes()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = clock()

        def on_step_end(self, args, state, control, **kwargs):
            wall, cpu = since(self.start)
            times.step_seconds.append(wall)
            times.step_cpu_seconds.append(cpu)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                times.completion_lengths.append(float(logs["completions/mean_length"]))

    torch.manual_seed(0)
    dataset = countdown_dataset(Countdown(num_train=setting.num_prompts).load("train"), setting.instruction)
    with tempfile.TemporaryDirectory() as output_dir:
        # countdown_reward already has TRL's signature: fn(prompts, completions, **columns)
        trainer = GRPOTrainer(model=setting.model_dir, reward_funcs=[countdown_reward],
                              args=grpo_config(output_dir, seed=0, max_steps=setting.warmup + setting.steps,
                                               learning_rate=setting.learning_rate,
                                               prompts_per_step=setting.prompts_per_step,
                                               num_generations=setting.num_generations,
                                               max_completion_length=setting.max_new_tokens),
                              train_dataset=dataset, callbacks=[StepTimer()])
        trainer.remove_callback(PrinterCallback)  # its log dicts would interleave with the table on stdout
        check_same_prompt_tokens(trainer, setting, dataset[0]["prompt"][len(setting.instruction):])
        harness.timed(trainer, "_generate_single_turn", times.rollout_seconds)
        trainer.train()
    return times.keep_after(setting.warmup)


def trl_available() -> bool:
    try:
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "no reference"
        harness.log(f"TRL unavailable ({type(error).__name__}: {error}); GRPO rows report ours only")
        return False
    return True


def grpo_rows(setting: GRPOSetting, rounds: int, use_trl: bool) -> tuple[list[Row], list[str]]:
    """Median step time of ours, ours without prompt sharing and TRL, taking turns ``rounds`` times
    so that load drifts hit all three."""
    ours, plain, theirs = StepTimes(), StepTimes(), StepTimes()
    name = f"{setting.prompts_per_step}x{setting.num_generations}" + (
        f"+{len(setting.instruction)}" if setting.instruction else "")
    for round_index in range(rounds):
        harness.log(f"GRPO {name} round {round_index + 1}/{rounds}: ours")
        ours.extend(time_ours(setting))
        harness.log(f"GRPO {name} round {round_index + 1}/{rounds}: ours, share_prompts=False")
        plain.extend(time_ours(replace(setting, share_prompts=False)))
        if use_trl:
            harness.log(f"GRPO {name} round {round_index + 1}/{rounds}: TRL")
            theirs.extend(time_trl(setting))
    instruction_text = f", {len(setting.instruction)}-token instruction" if setting.instruction else ""
    label = (f"{setting.prompts_per_step} prompts x G={setting.num_generations}{instruction_text}, "
             f"{setting.max_new_tokens} tokens, median of {len(ours.step_seconds)}")

    def row(measurement: str, reference: StepTimes, target: str) -> Row:
        return Row(measurement, label, median_or_nan(ours.step_seconds), median_or_nan(reference.step_seconds),
                   median_or_nan(ours.step_cpu_seconds), median_or_nan(reference.step_cpu_seconds), target, "{:.2f}")

    rows = [row("GRPO step seconds (ours vs TRL)", theirs, "<= 0.5"),
            row("GRPO step seconds (ours vs ours without prompt sharing)", plain, "< 1")]
    details = [ours.describe(f"ours {name}"), plain.describe(f"ours {name}, share_prompts=False")]
    if use_trl:
        details.append(theirs.describe(f"TRL  {name}"))
    return rows, details


def parse_setting(text: str) -> tuple[int, int, int]:
    """``PROMPTSxG[+I]`` -> (prompts per step, G, instruction tokens)."""
    sizes, _, instruction_tokens = text.lower().partition("+")
    prompts, generations = (int(x) for x in sizes.split("x"))
    return prompts, generations, int(instruction_tokens or 0)


def main(argv=None) -> str:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion length (default 32)")
    parser.add_argument("--grpo", nargs="+", metavar="PROMPTSxG[+I]",
                        help="settings: prompts per step x generations, optionally + an instruction of I "
                             "tokens before every prompt (default 8x8 16x8 16x16 16x8+160)")
    parser.add_argument("--warmup", type=int, help="untimed steps per run (default 2)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 4)")
    parser.add_argument("--rounds", type=int, help="runs of each trainer per setting, alternating (default 3)")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="learning rate of both trainers")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (rows against TRL read n/a)")
    args = harness.fill_defaults(parser.parse_args(argv),
                                 quick={"grpo": ["8x8"], "warmup": 1, "steps": 3, "rounds": 1},
                                 full={"grpo": ["8x8", "16x8", "16x16", "16x8+160"], "warmup": 2, "steps": 4,
                                       "rounds": 3})
    started = harness.setup(args.threads)
    model_dir = harness.tiny_model_dir()
    use_trl = not args.no_trl and trl_available()
    rows: list[Row] = []
    details: list[str] = []
    for prompts_per_step, generations, instruction_tokens in map(parse_setting, args.grpo):
        setting = GRPOSetting(model_dir, prompts_per_step, generations, args.max_new_tokens, args.learning_rate,
                              args.warmup, args.steps, instruction=instruction(instruction_tokens))
        setting_rows, lines = grpo_rows(setting, args.rounds, use_trl)
        rows.extend(setting_rows)
        details.extend(lines)
    text = harness.report(harness.format_table(rows), started, details)
    print(text)
    return text


if __name__ == "__main__":
    main()
