"""Peak memory growth of HF-engine rollouts at a Qwen2.5-size vocabulary: output_scores vs the recorder.

The rollout engine needs the sampler's log-prob of each drawn token. Asking ``generate`` for
``output_scores`` (what the engine did before) keeps every step's float32 scores, B x T x V; the
engine now records the drawn token's log-prob per step (``ChosenTokenLogprobs``) and holds one
step's B x V. The model is a 2-layer width-32 Llama with a 151,936-token vocabulary (random weights,
built from a config: almost no completion ends early, so every row runs the full T steps).

Each arm runs in its own process: load, warm up, reset the peak RSS (``/proc/self/clear_refs``),
generate, report the peak RSS growth over the resident size before ``generate``.

    python -m benchmarks.rollout_memory                     # 64 x 256 recorder; output_scores at 8 and 16
    python -m benchmarks.rollout_memory --before-batches 8 16 64   # the full "before" arm: 10-15 GB
    python -m benchmarks.rollout_memory --quick             # 8 x 32: a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import harness

VOCABULARY = 151_936  # Qwen2.5
SPEC = dict(architecture="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=64, max_position_embeddings=1024)
PROMPT = "3 5 7 -> 22\n"


def build_model_dir(directory: Path) -> Path:
    """The micro Llama with a 151,936-row embedding (tied) over the character tokenizer's ids."""
    from rloop_lightning import tiny

    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tiny.TinyModelSpec(**SPEC), VOCABULARY, tokenizer.pad_token_id,
                             tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """Make VmHWM (peak RSS) restart from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def generate_with_output_scores(policy, prompts: list[str], num_samples: int, max_new_tokens: int) -> int:
    """The engine's former path: ``generate(output_scores=True)``, then log-softmax step by step."""
    import torch

    from rloop_lightning.forwards import pad
    from rloop_lightning.rollout.hf import inference_mode

    tokenizer, model = policy.tokenizer, policy.model
    rows = [ids for ids in policy.encode_prompts(prompts) for _ in range(num_samples)]
    input_ids, attention_mask = pad(rows, tokenizer.pad_token_id, side="left")
    with inference_mode(model):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                output_scores=True, return_dict_in_generate=True, use_cache=True)
    generated = output.sequences[:, input_ids.shape[1]:]
    logprobs = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, generated[:, t, None]).squeeze(-1)
                            for t, step in enumerate(output.scores)], dim=1)
    return int(logprobs.numel())


def run_arm(arm: str, model_dir: str, batch: int, max_new_tokens: int) -> dict:
    """Runs inside the child process: one ``generate`` of ``batch`` completions; peak RSS growth."""
    import torch

    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.rollout.hf import HFGenerateEngine

    policy = Policy(model_dir)
    policy.load_model()
    engine = HFGenerateEngine(batch_size=batch, share_prompts=False)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)

    def run() -> int:
        if arm == "output_scores":
            return generate_with_output_scores(policy, [PROMPT], batch, max_new_tokens)
        return engine.generate(policy, [PROMPT], batch, sampling).num_completion_tokens

    torch.manual_seed(0)
    if arm == "output_scores":
        generate_with_output_scores(policy, [PROMPT], 1, 2)  # warm-up: kernels, allocator
    else:
        engine.generate(policy, [PROMPT], 1, SamplingParams(max_new_tokens=2))
    reset_peak_rss()
    before = rss_kib("VmRSS")
    tokens = run()
    return {"arm": arm, "batch": batch, "tokens": tokens, "growth_mib": (rss_kib("VmHWM") - before) / 1024}


def main(argv=None) -> str | None:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--batch", type=int, help="completions per generate call, recorder arm (default 64)")
    parser.add_argument("--before-batches", type=int, nargs="+",
                        help="batches of the output_scores arm (default 8 16; 64 needs 10-15 GB free)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per completion (default 256)")
    parser.add_argument("--child", nargs=3, metavar=("ARM", "MODEL_DIR", "BATCH"), help=argparse.SUPPRESS)
    args = harness.fill_defaults(parser.parse_args(argv),
                                 quick={"batch": 8, "before_batches": [8], "max_new_tokens": 32},
                                 full={"batch": 64, "before_batches": [8, 16], "max_new_tokens": 256})
    if args.child:
        harness.setup(args.threads)
        arm, model_dir, batch = args.child
        print(json.dumps(run_arm(arm, model_dir, int(batch), args.max_new_tokens)))
        return None
    started = harness.setup(args.threads)
    arms = [("output_scores", batch) for batch in args.before_batches]
    arms += [("recorder", batch) for batch in sorted({*args.before_batches, args.batch})]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_model_dir(Path(scratch) / "model")
        rows = []
        for arm, batch in arms:
            harness.log(f"{arm}, batch {batch} ...")
            rows.append(harness.run_child("benchmarks.rollout_memory", [
                "--child", arm, str(model_dir), str(batch), "--max-new-tokens", str(args.max_new_tokens),
                "--threads", str(args.threads)]))
    steps = args.max_new_tokens
    cells = []
    for row in rows:
        batch = row["batch"]
        all_steps = batch * steps * VOCABULARY * 4 / 2**20  # B x T x V float32
        one_step = batch * VOCABULARY * 4 / 2**20  # B x V float32
        cells.append([row["arm"], f"{batch} x {steps}", f"{row['growth_mib']:.0f}", f"{all_steps:.0f}",
                      f"{one_step:.0f}", f"{row['tokens']}"])
    before = [row for row in rows if row["arm"] == "output_scores"]
    details = [f"vocabulary {VOCABULARY:,}; 2-layer width-32 Llama; sampling at temperature 1, top-p 1"]
    if before and args.batch not in {row["batch"] for row in before}:
        largest = max(before, key=lambda row: row["batch"])
        scaled = largest["growth_mib"] * args.batch / largest["batch"]
        details.append(f"output_scores at {args.batch} x {steps}, scaled linearly in the batch from "
                       f"{largest['batch']} (it grows as B x T x V): ~{scaled / 1024:.2f} GiB")
    table = harness.markdown_table(
        ["arm", "completions x tokens", "peak RSS growth (MiB)", "B x T x V fp32 (MiB)", "B x V fp32 (MiB)",
         "tokens"], cells)
    text = harness.report(table, started, details)
    print(text)
    return text


if __name__ == "__main__":
    main()
