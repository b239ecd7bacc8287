"""Benchmark: prompt sharing in the update, on CPU.

One training forward + backward of P prompts x G rows of random tokens with
``Policy.completion_logprobs(share_prompts=True)`` (each distinct prompt run once, its KV cache
gathered to the G rows) against the plain forward (every row's prompt run). Median of
``--repeats`` alternating runs per prompt length; target: ratio < 1.

    python -m benchmarks.prompt_sharing            # prompt lengths 32 128 512, 7 repeats
    python -m benchmarks.prompt_sharing --quick    # prompt length 128, 2 repeats (seconds)
"""

from __future__ import annotations

from benchmarks import harness
from benchmarks.harness import Row


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

    def run(share: bool) -> None:
        policy.model.zero_grad(set_to_none=True)
        logprobs, _ = policy.completion_logprobs(batch, share_prompts=share)
        logprobs.sum().backward()

    timings = harness.interleaved({"shared": lambda: run(True), "plain": lambda: run(False)}, repeats)
    shared_wall, shared_cpu = harness.median_seconds(timings["shared"])
    plain_wall, plain_cpu = harness.median_seconds(timings["plain"])
    return Row("train forward+backward seconds (shared prompts vs plain)",
               f"{prompts} prompts x G={generations}, {prompt_tokens} prompt + {completion_tokens} completion tokens",
               shared_wall, plain_wall, shared_cpu, plain_cpu, "< 1", "{:.3f}")


def main(argv=None) -> str:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", help="prompt lengths (default 32 128 512)")
    parser.add_argument("--completion-tokens", type=int, default=128, help="completion length (default 128)")
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts P (default 4)")
    parser.add_argument("--generations", type=int, default=8, help="rows per prompt G (default 8)")
    parser.add_argument("--repeats", type=int, help="timed runs per path and prompt length (default 7)")
    args = harness.fill_defaults(parser.parse_args(argv), quick={"prompt_tokens": [128], "repeats": 2},
                                 full={"prompt_tokens": [32, 128, 512], "repeats": 7})
    started = harness.setup(args.threads)
    from rloop_lightning.policy import Policy

    policy = Policy(harness.tiny_model_dir())
    policy.load_model()
    rows = []
    for prompt_tokens in args.prompt_tokens:
        harness.log(f"prompt sharing: {prompt_tokens} prompt tokens")
        rows.append(prompt_sharing_row(policy, prompt_tokens, args.completion_tokens, args.prompts,
                                       args.generations, args.repeats))
    text = harness.report(harness.format_table(rows), started)
    print(text)
    return text


if __name__ == "__main__":
    main()
