"""Benchmark: rollout throughput and GRPO step time of rloop-lightning against references, on CPU.

Two measurements, all taken in one run side by side and printed as one markdown table:

1. Rollout throughput (generated tokens/s) of ``HFGenerateEngine`` against a bare sampling loop
   (forward with a KV cache, multinomial sampling at temperature 1, no logits processors). Every
   completion is forced to ``--max-new-tokens`` tokens in both paths (EOS masked; in the engine via
   ``min_new_tokens`` in the model's generation config), so both do the same work. Ratio engine/bare; target >= 0.70.
2. GRPO step time (rollout + reward + update) of ``GRPOModule`` under a Lightning ``Trainer``
   against TRL's ``GRPOTrainer`` at the same settings: same saved model directory, prompts,
   ``countdown_reward``, G, completions per step, completion length, learning rate, beta = 0, one
   optimizer step per rollout batch, fp32, constant learning rate, no weight decay. Ratio ours/TRL;
   target <= 0.5. Step time is the median over ``--rounds`` runs per trainer (taking turns) of
   ``--steps`` steps each, after ``--warmup`` untimed steps per run. A second row per setting times
   ours against ours with ``share_prompts=False`` in the engine and the module (every row's prompt
   run through the model), the gain of pre-filling and running each distinct prompt once.

    python scripts/bench_grpo.py            # full (~2-3 min on a 2-core CPU)
    python scripts/bench_grpo.py --quick    # smoke (< 2 min)

The machine is often shared, so timings use ``--threads`` torch threads (default 1: with 2 OpenMP
threads on a 2-core machine at load average ~5, a descheduled thread stalls every parallel region
and decoding ran 10-50x slower). Each table row also gives the ratio of process CPU time, which
time spent descheduled does not inflate; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial

MODEL = "rloop/tiny-llama"


@dataclass
class Row:
    """One line of the result table: wall-clock and CPU-time values of ours and the reference."""

    measurement: str
    setting: str
    ours: float
    reference: float
    ours_cpu: float
    reference_cpu: float
    target: str
    unit_format: str = "{:.0f}"


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


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds; CPU time is this process's, so time spent descheduled does not count."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- rollout throughput


def bare_sample(model, input_ids, attention_mask, num_tokens: int, eos_token_id: int):
    """Sample ``num_tokens`` tokens per row: KV-cache forward + multinomial, EOS masked. [B, T]"""
    import torch
    from transformers import DynamicCache

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    tokens = []
    for step in range(num_tokens):
        logits[:, eos_token_id] = float("-inf")  # fixed length, as min_new_tokens does in the engine
        token = torch.multinomial(torch.softmax(logits.float(), -1), 1)  # [B, 1]
        tokens.append(token)
        if step == num_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        position_ids = position_ids[:, -1:] + 1
        logits = model(input_ids=token, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=True).logits[:, -1]
    return torch.cat(tokens, 1)


@contextlib.contextmanager
def fixed_completion_length(model, num_tokens: int):
    """Make ``generate`` emit exactly ``num_tokens`` tokens (``min_new_tokens`` via the generation config)."""
    previous = model.generation_config.min_new_tokens
    model.generation_config.min_new_tokens = num_tokens
    try:
        yield
    finally:
        model.generation_config.min_new_tokens = previous


def rollout_row(policy, prompts: list[str], batch: int, max_new_tokens: int, repeats: int) -> Row:
    """Median tokens/s of the engine and of the bare loop over ``repeats`` interleaved runs each."""
    from rloop_lightning.policy import pad
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.rollout.hf import HFGenerateEngine, inference_mode

    prompts = [prompts[i % len(prompts)] for i in range(batch)]
    engine = HFGenerateEngine(batch_size=batch)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    model, tokenizer = policy.model, policy.tokenizer
    input_ids, attention_mask = pad(policy.encode_prompts(prompts), tokenizer.pad_token_id, side="left")

    def run_engine() -> int:
        rollouts = engine.generate(policy, prompts, 1, sampling)
        if rollouts.num_completion_tokens != batch * max_new_tokens:
            log(f"warning: engine generated {rollouts.num_completion_tokens} tokens, expected "
                f"{batch * max_new_tokens}; its tokens/s counts the tokens generated")
        return rollouts.num_completion_tokens

    def run_bare() -> int:
        with inference_mode(model):
            return bare_sample(model, input_ids, attention_mask, max_new_tokens, tokenizer.eos_token_id).numel()

    rates: dict[str, list[tuple[float, float]]] = {"engine": [], "bare": []}
    with fixed_completion_length(model, max_new_tokens):
        for repeat in range(repeats + 1):  # round 0 warms both paths up; order alternates
            order = [("engine", run_engine), ("bare", run_bare)]
            for name, run in order if repeat % 2 else order[::-1]:
                start = clock()
                tokens = run()
                wall, cpu = since(start)
                if repeat:
                    rates[name].append((tokens / wall, tokens / cpu))
    engine_wall, engine_cpu = (statistics.median(x) for x in zip(*rates["engine"]))
    bare_wall, bare_cpu = (statistics.median(x) for x in zip(*rates["bare"]))
    return Row("rollout tokens/s (engine vs bare loop)", f"{batch} seqs x {max_new_tokens} new tokens",
               engine_wall, bare_wall, engine_cpu, bare_cpu, ">= 0.70")


def profile_engine(policy, prompts: list[str], batch: int, max_new_tokens: int, lines: int = 25) -> str:
    """cProfile of one ``HFGenerateEngine.generate`` call: the top functions by own time."""
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.rollout.hf import HFGenerateEngine

    prompts = [prompts[i % len(prompts)] for i in range(batch)]
    engine = HFGenerateEngine(batch_size=batch)
    with fixed_completion_length(policy.model, max_new_tokens):
        engine.generate(policy, prompts, 1, SamplingParams(max_new_tokens=max_new_tokens))
        profiler = cProfile.Profile()
        profiler.enable()
        engine.generate(policy, prompts, 1, SamplingParams(max_new_tokens=max_new_tokens))
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


# --------------------------------------------------------------------------- prompt sharing


def prompt_sharing_row(policy, prompt_tokens: int, completion_tokens: int, prompts: int, generations: int,
                       repeats: int) -> Row:
    """Median seconds of one training forward + backward over ``prompts`` x ``generations`` rows
    of random tokens, each distinct prompt run once (``share_prompts=True``) vs every row's prompt."""
    import torch

    torch.manual_seed(0)
    vocabulary = len(policy.tokenizer)
    prompt_ids = [torch.randint(3, vocabulary, (prompt_tokens,)).tolist() for _ in range(prompts)]
    batch = policy.make_batch([prompt_ids[i // generations] for i in range(prompts * generations)],
                              torch.randint(3, vocabulary, (prompts * generations, completion_tokens)).tolist())

    def run(share: bool) -> tuple[float, float]:
        policy.model.zero_grad(set_to_none=True)
        start = clock()
        logprobs, _ = policy.completion_logprobs(batch, share_prompts=share)
        logprobs.sum().backward()
        return since(start)

    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for repeat in range(repeats + 1):  # round 0 warms up; order alternates
        for share in (True, False) if repeat % 2 else (False, True):
            seconds = run(share)
            if repeat:
                times[share].append(seconds)
    shared_wall, shared_cpu = (statistics.median(x) for x in zip(*times[True]))
    plain_wall, plain_cpu = (statistics.median(x) for x in zip(*times[False]))
    return Row("train forward+backward seconds (shared prompts vs plain)",
               f"{prompts} prompts x G={generations}, {prompt_tokens} prompt + {completion_tokens} completion tokens",
               shared_wall, plain_wall, shared_cpu, plain_cpu, "< 1", "{:.3f}")


# --------------------------------------------------------------------------- GRPO step time


def timed(obj, name: str, seconds: list[float]) -> None:
    """Wrap ``obj.name`` (a bound method) so each call appends its wall-clock seconds to ``seconds``."""
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(obj, name, wrapper)


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
    share_prompts: bool = True  # ours only: each distinct prompt pre-filled / run once (engine and update)
    instruction: str = ""  # text put before every prompt (a task instruction, as real recipes have)

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations


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
    timed(module.engine, "generate", times.rollout_seconds)
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

    from rloop_lightning.tasks import Countdown
    from rloop_lightning.tasks.countdown import countdown_reward
    from trl_reference import countdown_dataset, grpo_config

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
        timed(trainer, "_generate_single_turn", times.rollout_seconds)
        trainer.train()
    return times.keep_after(setting.warmup)


def trl_available() -> bool:
    try:
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "no reference"
        log(f"TRL unavailable ({type(error).__name__}: {error}); GRPO rows report ours only")
        return False
    return True


def grpo_rows(setting: GRPOSetting, rounds: int, use_trl: bool) -> tuple[list[Row], list[str]]:
    """Median step time of ours, ours without prompt sharing and TRL, taking turns ``rounds`` times
    so that load drifts hit all three."""
    ours, plain, theirs = StepTimes(), StepTimes(), StepTimes()
    name = f"{setting.prompts_per_step}x{setting.num_generations}" + (
        f"+{len(setting.instruction)}" if setting.instruction else "")
    for round_index in range(rounds):
        log(f"GRPO {name} round {round_index + 1}/{rounds}: ours")
        ours.extend(time_ours(setting))
        log(f"GRPO {name} round {round_index + 1}/{rounds}: ours, share_prompts=False")
        plain.extend(time_ours(replace(setting, share_prompts=False)))
        if use_trl:
            log(f"GRPO {name} round {round_index + 1}/{rounds}: TRL")
            theirs.extend(time_trl(setting))
    instruction = f", {len(setting.instruction)}-token instruction" if setting.instruction else ""
    label = (f"{setting.prompts_per_step} prompts x G={setting.num_generations}{instruction}, "
             f"{setting.max_new_tokens} tokens, median of {len(ours.step_seconds)}")

    def row(measurement: str, reference: StepTimes, target: str) -> Row:
        return Row(measurement, label, median_or_nan(ours.step_seconds), median_or_nan(reference.step_seconds),
                   median_or_nan(ours.step_cpu_seconds), median_or_nan(reference.step_cpu_seconds), target, "{:.2f}")

    rows = [row("GRPO step seconds (ours vs TRL)", theirs, "<= 0.5"),
            row("GRPO step seconds (ours vs ours without prompt sharing)", plain, "< 1")]
    details = [describe_steps(f"ours {name}", ours), describe_steps(f"ours {name}, share_prompts=False", plain)]
    if use_trl:
        details.append(describe_steps(f"TRL  {name}", theirs))
    return rows, details


# --------------------------------------------------------------------------- report


def format_table(rows: list[Row]) -> str:
    lines = ["| measurement | setting | ours | reference | ratio ours/ref (wall) | ratio (CPU time) | target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        cells = [row.unit_format.format(value) if math.isfinite(value) else "n/a" for value in (row.ours, row.reference)]
        ratios = [f"{a / b:.2f}" if math.isfinite(b) else "n/a"
                  for a, b in ((row.ours, row.reference), (row.ours_cpu, row.reference_cpu))]
        lines.append(f"| {row.measurement} | {row.setting} | {cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} "
                     f"| {row.target} |")
    return "\n".join(lines)


def describe_steps(name: str, times: StepTimes) -> str:
    step = median_or_nan(times.step_seconds)
    rollout = median_or_nan(times.rollout_seconds)
    length = statistics.mean(times.completion_lengths) if times.completion_lengths else float("nan")
    return (f"{name}: step {step:.2f} s wall (range {min(times.step_seconds):.2f}-{max(times.step_seconds):.2f}), "
            f"{median_or_nan(times.step_cpu_seconds):.2f} s CPU; rollout {rollout:.2f} s ({rollout / step:.0%}); "
            f"mean completion length {length:.1f}")


def environment() -> str:
    import lightning
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, "
            f"lightning {lightning.__version__}; {os.cpu_count()} CPUs, torch threads "
            f"{torch.get_num_threads()}, load average {load}")


def instruction(tokens: int) -> str:
    """A task instruction of ``tokens`` characters (the tiny tokenizer has one token per character)."""
    text = ("Use each of the given numbers exactly once, with + - * and /, to write an expression "
            "whose value is the target. Answer with the expression only. ")
    return (text * (tokens // len(text) + 1))[:tokens]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer settings, repeats and steps (< 2 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion length (default 32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="rollout batch sizes (default 16 64 256)")
    parser.add_argument("--repeats", type=int, help="timed rollout runs per path and batch size (default 7)")
    parser.add_argument("--grpo", nargs="+", metavar="PROMPTSxG[+I]",
                        help="GRPO settings, prompts per step x generations, optionally + an instruction of I "
                             "tokens before every prompt (default 8x8 16x8 16x16 16x8+160)")
    parser.add_argument("--prompt-tokens", type=int, nargs="*",
                        help="prompt lengths of the prompt-sharing rows, 4 prompts x G=8 with 128 completion "
                             "tokens each (default 32 128 512)")
    parser.add_argument("--warmup", type=int, help="untimed GRPO steps per run (default 2)")
    parser.add_argument("--steps", type=int, help="timed GRPO steps per run (default 4)")
    parser.add_argument("--rounds", type=int, help="runs of each trainer per GRPO setting, alternating (default 3)")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="learning rate of both trainers")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (GRPO rows report ours only)")
    parser.add_argument("--profile", action="store_true",
                        help="also print (stderr) a cProfile of one engine call at the largest batch size")
    args = parser.parse_args(argv)
    quick = {"batch_sizes": [16, 64], "repeats": 2, "prompt_tokens": [128], "grpo": ["8x8"], "warmup": 1, "steps": 3,
             "rounds": 1}
    full = {"batch_sizes": [16, 64, 256], "repeats": 7, "prompt_tokens": [32, 128, 512],
            "grpo": ["8x8", "16x8", "16x16", "16x8+160"],
            "warmup": 2, "steps": 4, "rounds": 3}
    defaults = quick if args.quick else full
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.grpo = [tuple(int(x) for x in text.lower().replace("+", "x").split("x")) + (0,) for text in args.grpo]
    return args


def quiet_libraries() -> None:
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("lightning", "lightning.pytorch", "rloop_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main(argv=None) -> str:
    args = parse_args(argv)
    import torch

    from rloop_lightning import tiny
    from rloop_lightning.policy import Policy
    from rloop_lightning.tasks import Countdown

    torch.set_num_threads(args.threads)
    quiet_libraries()
    started = time.perf_counter()
    model_dir = str(tiny.materialize(MODEL))
    policy = Policy(model_dir)
    policy.load_model()
    prompts = [p["prompt"] for p in Countdown(num_train=512).load("train")]
    rows: list[Row] = []
    for batch in args.batch_sizes:
        log(f"rollout: batch {batch}")
        rows.append(rollout_row(policy, prompts, batch, args.max_new_tokens, args.repeats))
    if args.profile:
        log(profile_engine(policy, prompts, max(args.batch_sizes), args.max_new_tokens))
    for prompt_tokens in args.prompt_tokens:
        log(f"prompt sharing: {prompt_tokens} prompt tokens")
        rows.append(prompt_sharing_row(policy, prompt_tokens, 128, 4, 8, args.repeats))
    use_trl = not args.no_trl and trl_available()
    details: list[str] = []
    for prompts_per_step, generations, instruction_tokens, *_ in args.grpo:
        setting = GRPOSetting(model_dir, prompts_per_step, generations, args.max_new_tokens, args.learning_rate,
                              args.warmup, args.steps, instruction=instruction(instruction_tokens))
        setting_rows, lines = grpo_rows(setting, args.rounds, use_trl)
        rows.extend(setting_rows)
        details.extend(lines)
    report = "\n".join([
        f"{environment()}; total {time.perf_counter() - started:.0f} s", "", format_table(rows), "",
        *(f"- {line}" for line in details)])
    print(report)
    return report


if __name__ == "__main__":
    main()
