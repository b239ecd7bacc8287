"""Peak memory (RSS) of full fine-tuning vs LoRA vs QLoRA on a ~100M-parameter Llama, on the CPU.

Each mode runs in its own process (peak RSS is per process): build the policy from a config
(random weights, nothing downloaded), then a few RFT-style steps (forward, backward, AdamW) on
fixed (prompt, completion) pairs. Prints one table; ratios are against full fine-tuning.

    python scripts/bench_memory.py            # ~1-2 minutes on 2 cores
    python scripts/bench_memory.py --steps 2 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("full", "lora", "qlora")
# ~100M parameters: 12 layers, width 768, vocabulary of the character tokenizer (embeddings are small)
SPEC = dict(architecture="llama", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, intermediate_size=3072, max_position_embeddings=512)


def build_model_dir(directory: Path) -> Path:
    from rloop_lightning import tiny

    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tiny.TinyModelSpec(**SPEC), len(tokenizer), tokenizer.pad_token_id,
                             tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_mode(mode: str, model_dir: str, steps: int, batch: int) -> dict:
    """Runs inside the child process: train ``steps`` steps and report peak RSS."""
    import torch

    from rloop_lightning.policy import LoraSettings, Policy

    torch.manual_seed(0)
    imports_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, transformers, bnb...
    lora = LoraSettings(r=16, alpha=32) if mode in ("lora", "qlora") else None
    policy = Policy(model_dir, lora=lora, load_in_4bit=mode == "qlora")
    model = policy.load_model()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    prompts = [f"{i} {i + 1} {i + 2} -> {3 * i + 3}\n" for i in range(batch)]
    completions = [f"{i}+{i + 1}+{i + 2}" * 8 for i in range(batch)]  # ~60-character completions
    started = time.perf_counter()
    steady = 0.0
    for _ in range(steps):
        encoded = policy.encode_pairs(prompts, completions)
        logprobs, _ = policy.completion_logprobs(encoded)
        loss = -(logprobs * encoded.completion_mask).sum() / encoded.completion_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steady = max(steady, current_rss_mib())  # after the step: weights, grads, optimizer state
    seconds = (time.perf_counter() - started) / steps
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"mode": mode, "total_params": total, "trainable_params": trainable, "peak_rss_mib": peak_mib,
            "imports_mib": imports_mib, "steady_mib": steady, "seconds_per_step": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child[0], args.child[1], args.steps, args.batch)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_model_dir(Path(scratch) / "model")
        rows = []
        for mode in MODES:
            command = [sys.executable, __file__, "--child", mode, str(model_dir), "--steps", str(args.steps),
                       "--batch", str(args.batch)]
            output = subprocess.run(command, check=True, capture_output=True, text=True,
                                    env=dict(os.environ, TOKENIZERS_PARALLELISM="false")).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
    full = rows[0]["peak_rss_mib"] - rows[0]["imports_mib"]
    print(f"~{rows[0]['total_params'] / 1e6:.0f}M-parameter Llama, batch {args.batch}, {args.steps} steps, CPU")
    print("| mode | trainable params | peak RSS (MiB) | of which libraries | training peak (MiB) | vs full "
          "| RSS between steps (MiB) | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        training = row["peak_rss_mib"] - row["imports_mib"]
        print(f"| {row['mode']} | {row['trainable_params'] / 1e6:.2f}M | {row['peak_rss_mib']:.0f} | "
              f"{row['imports_mib']:.0f} | {training:.0f} | {training / full:.2f} | {row['steady_mib']:.0f} | "
              f"{row['seconds_per_step']:.2f} |")
    print("QLoRA's peak includes loading: transformers reads the fp32 checkpoint before quantising it.")


if __name__ == "__main__":
    main()
