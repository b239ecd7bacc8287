"""Peak memory growth and time of one GRPO update micro-batch at a Qwen2.5-size vocabulary: full logits vs chunks.

The update computes the completion tokens' log-probs and entropy, the clipped GRPO loss and its
backward. With the full logits (``logprob_chunk_size: null``) that holds several float32 tensors of
micro-batch x completion columns x vocabulary; with chunks (``Policy.logprob_chunk_size``, default
512) the LM head runs on a chunk of tokens at a time and is recomputed in the backward. The model
is a 2-layer width-32 Llama in bfloat16 with a 151,936-token vocabulary (tied; random weights built
from a config), so nearly all the memory and time are the head's.

Each arm runs in its own process: load, warm up on a short batch, reset the peak RSS
(``/proc/self/clear_refs``), run one update micro-batch and report the peak RSS growth over the
resident size before it; then ``--repeats`` more updates for the seconds (median).

    python -m benchmarks.update_memory                  # 8 x 513 completion tokens: the full arm needs ~12 GB
    python -m benchmarks.update_memory --chunk-sizes 128 1024
    python -m benchmarks.update_memory --quick          # 2 x 65 tokens: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks import harness
from benchmarks.rollout_memory import VOCABULARY, build_model_dir, reset_peak_rss, rss_kib

PROMPT_TOKENS = 200  # the GSM8K recipe's prompt budget


def update_batch(policy, batch_size: int, completion_tokens: int):
    """``batch_size`` rows of a 200-token prompt and ``completion_tokens`` completion columns (all real)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    vocabulary = len(policy.tokenizer)  # ids the character tokenizer knows; the head still scores all 151,936
    prompts = torch.randint(3, vocabulary, (batch_size, PROMPT_TOKENS), generator=generator).tolist()
    completions = torch.randint(3, vocabulary, (batch_size, completion_tokens), generator=generator).tolist()
    return policy.make_batch(prompts, completions)


def update(policy, batch) -> None:
    """One micro-batch of the GRPO update: log-probs and entropy, clipped loss (token mean), backward."""
    import torch

    from rloop_lightning.algorithms import clipped_policy_loss

    policy.model.zero_grad(set_to_none=True)
    logprobs, entropy = policy.completion_logprobs(batch, with_entropy=True, temperature=1.0)
    mask = batch.completion_mask.float()
    advantages = torch.linspace(-1, 1, mask.shape[0], device=mask.device)
    out = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, 0.28, "token", "token_mean",
                              mask.shape[1])
    out.loss.backward()
    float((entropy * mask).sum())  # the logged statistic is used, as in the module


def run_arm(chunk_size: int | None, model_dir: str, batch_size: int, completion_tokens: int, repeats: int) -> dict:
    """Runs inside the child process: peak RSS growth of one update, then its median seconds."""
    from rloop_lightning.policy import Policy

    policy = Policy(model_dir, dtype="bfloat16", logprob_chunk_size=chunk_size)
    policy.load_model()
    update(policy, update_batch(policy, 1, 8))  # warm-up: kernels, allocator, autograd
    batch = update_batch(policy, batch_size, completion_tokens)
    policy.model.zero_grad(set_to_none=True)
    reset_peak_rss()
    before = rss_kib("VmRSS")
    update(policy, batch)
    growth_mib = (rss_kib("VmHWM") - before) / 1024
    wall, cpu = [], []
    for _ in range(repeats):
        start = harness.clock()
        update(policy, batch)
        elapsed = harness.since(start)
        wall.append(elapsed[0])
        cpu.append(elapsed[1])
    return {"chunk_size": chunk_size, "growth_mib": growth_mib, "seconds": statistics.median(wall),
            "cpu_seconds": statistics.median(cpu),
            "tokens": int(batch.completion_mask.numel())}


def main(argv=None) -> str | None:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--batch", type=int, help="completions in the micro-batch (default 8)")
    parser.add_argument("--completion-tokens", type=int, help="completion columns (default 513: 512 + EOS)")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", help="chunked arms (default 256 512)")
    parser.add_argument("--repeats", type=int, help="timed updates per arm after the measured one (default 2)")
    parser.add_argument("--child", nargs=2, metavar=("CHUNK_SIZE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = harness.fill_defaults(parser.parse_args(argv),
                                 quick={"batch": 2, "completion_tokens": 65, "chunk_sizes": [32], "repeats": 1},
                                 full={"batch": 8, "completion_tokens": 513, "chunk_sizes": [256, 512],
                                       "repeats": 2})
    if args.child:
        harness.setup(args.threads)
        chunk_size = None if args.child[0] == "full" else int(args.child[0])
        print(json.dumps(run_arm(chunk_size, args.child[1], args.batch, args.completion_tokens, args.repeats)))
        return None
    started = harness.setup(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_model_dir(Path(scratch) / "model")
        rows = []
        for arm in ["full", *map(str, args.chunk_sizes)]:
            harness.log(f"logits: {arm} ...")
            rows.append(harness.run_child("benchmarks.update_memory", [
                "--child", arm, str(model_dir), "--batch", str(args.batch), "--completion-tokens",
                str(args.completion_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]))
    full = rows[0]
    cells = []
    for row in rows:
        tokens = row["chunk_size"] or row["tokens"]  # tokens whose logits exist at once
        per_unit = row["growth_mib"] * 2**20 / (tokens * VOCABULARY)
        cells.append(["full logits" if row["chunk_size"] is None else f"chunks of {row['chunk_size']}",
                      f"{args.batch} x {args.completion_tokens}", f"{row['growth_mib']:.0f}",
                      f"{row['growth_mib'] / full['growth_mib']:.3f}", f"{per_unit:.1f}", f"{row['seconds']:.2f}",
                      f"{row['seconds'] / full['seconds']:.2f}", f"{row['cpu_seconds'] / full['cpu_seconds']:.2f}"])
    table = harness.markdown_table(
        ["log-probs", "completions x tokens", "peak RSS growth (MiB)", "vs full", "B per (token x vocabulary)",
         "s/update", "time vs full (wall)", "(CPU time)"], cells)
    details = [f"vocabulary {VOCABULARY:,}; 2-layer width-32 Llama in bfloat16 (tied head); prompt "
               f"{PROMPT_TOKENS} tokens; log-probs, entropy, clipped loss and backward of one micro-batch",
               "B per (token x vocabulary): the growth over the tokens whose logits exist at once (all of the "
               "micro-batch's, or one chunk), the factor docs/scale_out.md's budgets use"]
    text = harness.report(table, started, details)
    print(text)
    return text


if __name__ == "__main__":
    main()
