"""Benchmark: rollout throughput (generated tokens/s) of ``HFGenerateEngine`` against a bare sampling
loop (forward with a KV cache, multinomial sampling at temperature 1, no logits processors), on CPU.

Every completion is forced to ``--max-new-tokens`` tokens in both paths (EOS masked; in the engine
via ``min_new_tokens`` in the model's generation config), so both do the same work. The engine's
time covers everything it does (tokenising, ``generate``, log-probs of the sampled tokens,
decoding); the bare loop starts from padded token ids. Ratio engine/bare; target >= 0.70. Median
of ``--repeats`` alternating runs per batch size.

    python -m benchmarks.rollout_throughput            # batch sizes 16 64 256, 7 repeats
    python -m benchmarks.rollout_throughput --quick    # batch 16, 2 repeats (seconds)
    python -m benchmarks.rollout_throughput --profile  # also a cProfile of one engine call (stderr)
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats

from benchmarks import harness
from benchmarks.harness import Row


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
    from rloop_lightning.forwards import pad
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
            harness.log(f"warning: engine generated {rollouts.num_completion_tokens} tokens, expected "
                        f"{batch * max_new_tokens}; its tokens/s counts the tokens generated")
        return rollouts.num_completion_tokens

    def run_bare() -> int:
        with inference_mode(model):
            return bare_sample(model, input_ids, attention_mask, max_new_tokens, tokenizer.eos_token_id).numel()

    with fixed_completion_length(model, max_new_tokens):
        timings = harness.interleaved({"engine": run_engine, "bare": run_bare}, repeats)
    engine_wall, engine_cpu = harness.median_rates(timings["engine"])
    bare_wall, bare_cpu = harness.median_rates(timings["bare"])
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


def main(argv=None) -> str:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion length (default 32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="rollout batch sizes (default 16 64 256)")
    parser.add_argument("--repeats", type=int, help="timed runs per path and batch size (default 7)")
    parser.add_argument("--profile", action="store_true",
                        help="also print (stderr) a cProfile of one engine call at the largest batch size")
    args = harness.fill_defaults(parser.parse_args(argv), quick={"batch_sizes": [16], "repeats": 2},
                                 full={"batch_sizes": [16, 64, 256], "repeats": 7})
    started = harness.setup(args.threads)
    from rloop_lightning.policy import Policy
    from rloop_lightning.tasks import Countdown

    policy = Policy(harness.tiny_model_dir())
    policy.load_model()
    prompts = [p["prompt"] for p in Countdown(num_train=512).load("train")]
    rows = []
    for batch in args.batch_sizes:
        harness.log(f"rollout: batch {batch}")
        rows.append(rollout_row(policy, prompts, batch, args.max_new_tokens, args.repeats))
    if args.profile:
        harness.log(profile_engine(policy, prompts, max(args.batch_sizes), args.max_new_tokens))
    text = harness.report(harness.format_table(rows), started)
    print(text)
    return text


if __name__ == "__main__":
    main()
