"""One GRPO update on long-tailed completion lengths: fixed-count padded micro-batches vs a token budget.

The rollout batch: ``--prompts`` prompts of ``--prompt-tokens`` tokens, ``--generations`` completions
each, completion lengths drawn like a reasoning run's: log-normal (sigma 1) with median a tenth of
``--max-tokens``, clipped to 1..``--max-tokens`` (the few that reach the limit count as truncated).
Random token ids; the loss is DAPO's token mean, one mini-batch, one iteration, SGD.

Arms (each in its own process, for its peak RSS):

* ``padded``: ``micro_batch_size`` rows, each micro-batch as wide as the batch (the longest completion);
* ``tokens``: ``micro_batch_tokens`` = the padded arm's micro-batch size (rows x full width), i.e. the same
  worst-case micro-batch, so the same memory bound; rows sorted by length and all-padding columns cut;
* ``tokens/2``: half that budget;
* ``packed``: the ``tokens`` budget with ``policy.packing`` (each micro-batch's rows in one row, no padding;
  the budget then counts real tokens).

The report's last line: the same rows on ``--ranks`` data-parallel ranks, dealt as sampled (each rank its
consecutive prompts' groups) and as ``balance_ranks`` would move them (``grpo.balance.balanced_assignment``):
the largest rank's real tokens over the mean (computed, not run).

Each arm: load, one warm-up update on a small batch, reset the peak RSS (``/proc/self/clear_refs``), then
one timed update (``GRPOModule._train_on``, the phase's own update) and its peak RSS growth. ``--quick``
runs the arms one after the other in one process (a smoke run: its memory column means little).

    python -m benchmarks.update_tokens                                    # rloop/small-llama-32k, 32 x <= 512
    python -m benchmarks.update_tokens --model rloop/tiny-qwen2.5         # the Qwen stand-in
    python -m benchmarks.update_tokens --quick                            # micro-llama, a smoke run
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

from benchmarks import harness
from benchmarks.rollout_memory import reset_peak_rss, rss_kib


def completion_lengths(count: int, max_tokens: int, seed: int = 0) -> list[int]:
    """Long-tailed lengths: log-normal, median ``max_tokens / 10``, clipped to 1..``max_tokens``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.randn(count, generator=generator)) * max_tokens / 10
    return [int(min(max(round(float(x)), 1), max_tokens)) for x in draws]


def rollout_groups(policy, prompts: int, generations: int, prompt_tokens: int, max_tokens: int, seed: int = 0):
    """``prompts`` groups of random prompt and completion ids with long-tailed completion lengths."""
    import torch

    from rloop_lightning.grpo.groups import Group

    generator = torch.Generator().manual_seed(seed)
    vocabulary = policy.require_model().config.vocab_size
    lengths = completion_lengths(prompts * generations, max_tokens, seed)
    groups = []
    for index in range(prompts):
        mine = lengths[index * generations:(index + 1) * generations]
        groups.append(Group(
            problem={"id": str(index), "prompt": ""},
            prompt_ids=torch.randint(3, vocabulary, (prompt_tokens,), generator=generator).tolist(),
            completion_ids=[torch.randint(3, vocabulary, (n,), generator=generator).tolist() for n in mine],
            completions=[""] * generations, sampler_logprobs=[[0.0] * n for n in mine],
            truncated=[n == max_tokens for n in mine], rewards=torch.randn(generations, generator=generator),
            correct=torch.zeros(generations, dtype=torch.bool)))
    return groups


def update_module(model: str, micro_batch_size: int, micro_batch_tokens: int | None, max_tokens: int,
                  packing: bool = False):
    """A GRPO module around ``model``, with what its update reads of a Trainer stubbed (one process)."""
    import torch

    from rloop_lightning.grpo import GRPOModule
    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.base import SamplingParams

    policy = Policy(model, packing=packing)
    policy.load_model()
    module = GRPOModule(policy, sampling=SamplingParams(max_new_tokens=max_tokens), num_generations=2,
                        micro_batch_size=micro_batch_size, micro_batch_tokens=micro_batch_tokens,
                        reward_functions=[len])
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    module.trainer = SimpleNamespace(world_size=1)
    module.optimizers, module.lr_schedulers = lambda: optimizer, lambda: None
    module.manual_backward = lambda loss: loss.backward()
    module.log = lambda *args, **kwargs: None
    return module


def padding_of(module, groups, micro_batch_tokens: int | None, packing: bool = False) -> tuple[float, int]:
    """(padding fraction, micro-batches) of the arm's cut of this batch."""
    from rloop_lightning import micro_batches

    prompts = [len(g.prompt_ids) for g in groups for _ in g.completion_ids]
    completions = [len(ids) for g in groups for ids in g.completion_ids]
    if micro_batch_tokens is None:  # every micro-batch as wide as the batch
        parts = micro_batches.by_count(len(prompts), module.micro_batch_size)
        run = len(prompts) * (max(prompts) + max(completions))
        return 1 - (sum(prompts) + sum(completions)) / run, len(parts)
    parts = micro_batches.by_tokens(prompts, completions, micro_batch_tokens, packing)
    return 0.0 if packing else micro_batches.padding_fraction(prompts, completions, parts), len(parts)


def run_arm(args, micro_batch_tokens: int | None, packing: bool = False) -> dict:
    """Runs inside the child process: peak RSS growth and seconds of one update."""
    module = update_module(args.model, args.micro_batch_size, micro_batch_tokens, args.max_tokens, packing)
    warm = rollout_groups(module.policy, 1, 2, args.prompt_tokens, 8, seed=1)
    module._train_on(warm)  # kernels, allocator, autograd
    groups = rollout_groups(module.policy, args.prompts, args.generations, args.prompt_tokens, args.max_tokens)
    padding, parts = padding_of(module, groups, micro_batch_tokens, packing)
    reset_peak_rss()
    before = rss_kib("VmRSS")
    start = harness.clock()
    module._train_on(groups)
    wall, cpu = harness.since(start)
    return {"growth_mib": (rss_kib("VmHWM") - before) / 1024, "seconds": wall, "cpu_seconds": cpu,
            "padding": padding, "micro_batches": parts,
            "real_tokens": sum(len(g.prompt_ids) + len(ids) for g in groups for ids in g.completion_ids)}


def rank_imbalance(row_tokens: list[int], generations: int, ranks: int) -> str:
    """The ranks' token imbalance (largest rank over the mean) of these rows, as sampled and as balanced."""
    from rloop_lightning.grpo.balance import balanced_assignment, imbalance

    prompts = len(row_tokens) // generations
    if prompts % ranks:
        return f"rank token imbalance: {prompts} prompts do not split over {ranks} ranks"
    per_rank = len(row_tokens) // ranks  # whole groups, as each rank samples its own prompts
    sampled = [sum(row_tokens[rank * per_rank:(rank + 1) * per_rank]) for rank in range(ranks)]
    balanced = [sum(row_tokens[i] for i in rows) for rows in balanced_assignment(row_tokens, ranks)]
    return (f"rank token imbalance on {ranks} ranks (largest rank's real tokens / mean): as sampled "
            f"{imbalance(sampled):.3f}, with balance_ranks {imbalance(balanced):.3f}")


def main(argv=None) -> str | None:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--model", help="policy model (default rloop/small-llama-32k; --quick: rloop/micro-llama)")
    parser.add_argument("--prompts", type=int, help="prompts in the rollout batch (default 4)")
    parser.add_argument("--generations", type=int, help="completions per prompt (default 8)")
    parser.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default 32)")
    parser.add_argument("--max-tokens", type=int, help="max_new_tokens, the longest completion (default 512)")
    parser.add_argument("--micro-batch-size", type=int, help="rows per padded micro-batch (default 8)")
    parser.add_argument("--arms", nargs="+", choices=["padded", "tokens", "tokens/2", "packed"],
                        help="arms to run besides padded (default: all)")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks for the token-imbalance line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = harness.fill_defaults(parser.parse_args(argv),
                                 quick={"model": "rloop/micro-llama", "prompts": 2, "generations": 4,
                                        "prompt_tokens": 8, "max_tokens": 64, "micro_batch_size": 2},
                                 full={"model": "rloop/small-llama-32k", "prompts": 4, "generations": 8,
                                       "prompt_tokens": 32, "max_tokens": 512, "micro_batch_size": 8})
    budget = args.micro_batch_size * (args.prompt_tokens + args.max_tokens)  # the padded micro-batch's size
    arms = {"padded": None, "tokens": budget, "tokens/2": budget // 2, "packed": budget}
    if args.child:
        harness.setup(args.threads)
        print(json.dumps(run_arm(args, arms[args.child], packing=args.child == "packed")))
        return None
    started = harness.setup(args.threads)
    harness.tiny_model_dir(args.model) if args.model.startswith("rloop/") else None  # built once, not per arm
    passed = ["--model", args.model, "--prompts", str(args.prompts), "--generations", str(args.generations),
              "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens),
              "--micro-batch-size", str(args.micro_batch_size), "--threads", str(args.threads)]
    rows = {}
    for arm in dict.fromkeys(["padded", *(args.arms or arms)]):  # the padded arm is the reference
        harness.log(f"update: {arm} ...")
        rows[arm] = (run_arm(args, arms[arm], packing=arm == "packed") if args.quick  # a smoke run, one process
                     else harness.run_child("benchmarks.update_tokens", [*passed, "--child", arm]))
    padded = rows["padded"]
    cells = [[arm, f"{args.micro_batch_size} rows" if arms[arm] is None else f"{arms[arm]} tokens",
              row["micro_batches"], f"{row['padding']:.2f}", f"{row['seconds']:.2f}",
              f"{padded['seconds'] / row['seconds']:.2f}", f"{padded['cpu_seconds'] / row['cpu_seconds']:.2f}",
              f"{row['growth_mib']:.0f}", f"{row['growth_mib'] / padded['growth_mib']:.2f}"]
             for arm, row in rows.items()]
    table = harness.markdown_table(
        ["micro-batches", "size", "count", "padding fraction", "s/update", "speed-up vs padded (wall)", "(CPU time)",
         "peak RSS growth (MiB)", "memory vs padded"], cells)
    lengths = completion_lengths(args.prompts * args.generations, args.max_tokens)
    details = [f"{args.model}; {args.prompts} prompts x {args.generations} completions, prompts {args.prompt_tokens} "
               f"tokens, completion lengths log-normal (median {args.max_tokens // 10}, max {args.max_tokens}): "
               f"median {sorted(lengths)[len(lengths) // 2]}, longest {max(lengths)}, "
               f"{sum(n == args.max_tokens for n in lengths)} at the limit; {padded['real_tokens']} real tokens",
               "one GRPO update (token-mean loss, one mini-batch, SGD) in its own process after a warm-up; peak "
               "RSS growth over the resident size before the update",
               rank_imbalance([args.prompt_tokens + n for n in lengths], args.generations, args.ranks)]
    text = harness.report(table, started, details)
    print(text)
    return text


if __name__ == "__main__":
    main()
