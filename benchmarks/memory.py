"""Peak memory (RSS) of full fine-tuning vs LoRA vs QLoRA on a ~100M-parameter Llama, on the CPU.

Each mode runs in its own process (peak RSS is per process): build the policy from a config
(random weights, nothing downloaded), then a few RFT-style steps (forward, backward, AdamW) on
fixed (prompt, completion) pairs. Prints one table; ratios are against full fine-tuning.

    python -m benchmarks.memory            # ~1-2 minutes on 2 cores
    python -m benchmarks.memory --steps 2 --batch 4
    python -m benchmarks.memory --quick    # 2 layers, 1 step, batch 2: a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import harness

MODES = ("full", "lora", "qlora")
# ~100M parameters: 12 layers, width 768, vocabulary of the character tokenizer (embeddings are small)
SPEC = dict(architecture="llama", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, intermediate_size=3072, max_position_embeddings=512)


def build_model_dir(directory: Path, num_hidden_layers: int) -> Path:
    from rloop_lightning import tiny

    tokenizer = tiny.build_tokenizer()
    spec = replace(tiny.TinyModelSpec(**SPEC), num_hidden_layers=num_hidden_layers)
    model = tiny.build_model(spec, len(tokenizer), tokenizer.pad_token_id,
                             tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_mode(mode: str, model_dir: str, steps: int, batch: int) -> dict:
    """Runs inside the child process: train ``steps`` steps and report peak RSS."""
    import torch

    from rloop_lightning.policy import LoraSettings, Policy

    torch.manual_seed(0)
    imports_mib = harness.peak_rss_mib()  # torch, transformers, bnb...
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
        steady = max(steady, harness.current_rss_mib())  # after the step: weights, grads, optimizer state
    seconds = (time.perf_counter() - started) / steps
    peak_mib = harness.peak_rss_mib()
    return {"mode": mode, "total_params": total, "trainable_params": trainable, "peak_rss_mib": peak_mib,
            "imports_mib": imports_mib, "steady_mib": steady, "seconds_per_step": seconds}


def main(argv=None) -> str | None:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--steps", type=int, help="training steps per mode (default 3)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 12: ~100M parameters)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = harness.fill_defaults(parser.parse_args(argv), quick={"steps": 1, "batch": 2, "layers": 2},
                                 full={"steps": 3, "batch": 8, "layers": SPEC["num_hidden_layers"]})
    if args.child:
        harness.setup(args.threads)
        print(json.dumps(run_mode(args.child[0], args.child[1], args.steps, args.batch)))
        return None
    started = harness.setup(args.threads)  # the parent only builds the model; children measure
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_model_dir(Path(scratch) / "model", args.layers)
        child = ["--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)]
        rows = [harness.run_child("benchmarks.memory", ["--child", mode, str(model_dir), *child]) for mode in MODES]
    full = rows[0]["peak_rss_mib"] - rows[0]["imports_mib"]
    header = ["mode", "trainable params", "peak RSS (MiB)", "of which libraries", "training peak (MiB)", "vs full",
              "RSS between steps (MiB)", "s/step"]
    cells = []
    for row in rows:
        training = row["peak_rss_mib"] - row["imports_mib"]
        cells.append([row["mode"], f"{row['trainable_params'] / 1e6:.2f}M", f"{row['peak_rss_mib']:.0f}",
                      f"{row['imports_mib']:.0f}", f"{training:.0f}", f"{training / full:.2f}",
                      f"{row['steady_mib']:.0f}", f"{row['seconds_per_step']:.2f}"])
    table = "\n".join([
        f"~{rows[0]['total_params'] / 1e6:.0f}M-parameter Llama, batch {args.batch}, {args.steps} steps, CPU",
        harness.markdown_table(header, cells),
        "QLoRA's peak includes loading: transformers reads the fp32 checkpoint before quantising it."])
    text = harness.report(table, started)
    print(text)
    return text


if __name__ == "__main__":
    main()
