"""Peak memory of a GRPO or RFT recipe at its model's true size: one update micro-batch and one rollout call.

A recipe's memory terms are tensor sizes, so they need the architecture, not trained weights. This
builds the recipe's model from the architecture config written in the repository
(``benchmarks/model_configs/<hub id>.json``: nothing is downloaded) with random weights, loads it
through ``Policy`` with the recipe's dtype, 4-bit quantisation, LoRA, gradient checkpointing and
log-prob chunk size (the tokenizer is the ``rloop/tiny-qwen2.5`` stand-in's: token ids do not change
any size), and measures, in one fresh process on the device present (peak RSS on the CPU,
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` on CUDA):

- **load**: the weights as loaded (4-bit linears, embeddings and norms, adapter), by tensor bytes and
  by the growth of the process;
- **optimiser**: AdamW moments after one step on the adapter (tensor bytes and growth);
- **update**: one GRPO micro-batch (log-probs and entropy under bf16 autocast, clipped loss, backward)
  of ``m`` completions of ``prompt + c`` tokens, at two or more (m, c). Its peak growth is linear in
  the micro-batch's tokens m (prompt + c) (checkpointed layer inputs, one recomputed layer), as long
  as ``c`` is at least one chunk: the slope is the activations per token and the intercept what does
  not grow with them (one chunk of logits, the head's bf16 copy, the adapter's gradients). The
  recipe's micro-batch (``micro_batch_size`` x (prompt + ``max_new_tokens`` + 1); under
  ``micro_batch_tokens``, the full-length sequences the budget holds) is read off the line when it was not
  measured itself. An RFT recipe (``micro_batch_tokens`` set; no ``sampling``) trains on completions of
  GRPO's default 512-token budget; its update is measured as the GRPO micro-batch of the same tokens (the
  same forward, log-probs and backward; the losses differ by per-token terms);
- **rollout**: one ``HFGenerateEngine`` call of ``b`` completions of one prompt of ``P`` tokens, a few
  new tokens each, at two ``b`` and two ``P``. The KV cache holds prompt and generated tokens alike,
  so growth = a + b (s + k L) with L = P + new tokens: ``k`` is the KV cache per token of one
  sequence, ``s`` one decoding step's logits per sequence; the recipe's engine batch and
  200 + ``max_new_tokens`` tokens are read off the plane (a prompt's pre-fill runs once per distinct
  prompt: the recipe's 8 per call are not measured here). An RFT recipe samples only in its evaluation
  callback, whose engine batch is read instead of ``model.engine``'s.

Where CPU time, not memory, is the limit (a 1.5B decode step takes seconds here), the sizes measured
are smaller than the recipe's and the table says which cells are read off the fitted line. The
child process sets glibc's mmap threshold to 64 KiB, so every tensor above it is returned to the
system when freed and the resident size follows the live tensors.

    python -m benchmarks.true_size --recipe configs/recipes/qlora_gsm8k_grpo_8gb.yaml
    python -m benchmarks.true_size --recipe configs/recipes/qlora_gsm8k_grpo.yaml --model-dir /tmp/qwen1.5b
    python -m benchmarks.true_size --update-points 1x513 2x513   # micro-batch x completion columns
    python -m benchmarks.true_size --quick   # the same architecture shrunk (2 layers, width 64): a smoke run

Before anything is allocated the recipe's model config must exist in the repository and the
machine's available memory (``/proc/meminfo``, or ``--memory-limit-gib``) must hold the estimated peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import harness

MODEL_CONFIGS = harness.ROOT / "benchmarks" / "model_configs"
DEFAULT_RECIPE = "configs/recipes/qlora_gsm8k_grpo_8gb.yaml"
PROMPT_TOKENS = 200  # the GSM8K recipes' prompt budget (docs/scale_out.md)
TOKENIZER_MODEL = "rloop/tiny-qwen2.5"
QUICK_SHAPE = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=8192)


@dataclass
class RecipeSizes:
    """What one GRPO or RFT recipe says about memory: the model and the sizes its update and rollouts run at."""

    recipe: str
    """The recipe file."""
    model: str
    """``model.policy.model_name_or_path`` (a hub id)."""
    dtype: str = "float32"
    """``model.policy.dtype``."""
    load_in_4bit: bool = False
    """``model.policy.load_in_4bit``."""
    lora: dict | None = None
    """``model.policy.lora`` (``LoraSettings`` fields)."""
    gradient_checkpointing: bool = False
    """``model.policy.gradient_checkpointing``."""
    logprob_chunk_size: int | None = 512
    """``model.policy.logprob_chunk_size`` (``Policy``'s default when the recipe leaves it out)."""
    micro_batch_size: int = 1
    """``model.micro_batch_size``: completions per update micro-batch (with ``model.micro_batch_tokens``, the
    full-length sequences the budget holds)."""
    engine_batch: int = 256
    """``model.engine.init_args.batch_size``: completions per ``generate`` call (an RFT recipe: its evaluation
    callback's engine)."""
    num_generations: int = 8
    """``model.num_generations``: completions per prompt."""
    max_new_tokens: int = 512
    """``model.sampling.max_new_tokens``."""


@dataclass
class Plan:
    """The sizes one run measures at (smaller than the recipe's where CPU time is the limit)."""

    update_points: list[list[int]]
    """Update micro-batches measured, as [completions, completion columns] (two or more token counts)."""
    rollout_points: list[list[int]]
    """Rollouts measured, as [completions, prompt tokens]: (b0, P0), (b1, P0), (b0, P1)."""
    rollout_new_tokens: int = 4
    """New tokens per completion in every rollout measured."""
    prompt_tokens: int = PROMPT_TOKENS
    """Prompt tokens of every sequence."""
    shape: dict = field(default_factory=dict)
    """Config fields overridden (``--quick``: a shrunk model); empty at true size."""


def read_recipe(path: str | Path) -> RecipeSizes:
    """The sizes a GRPO or RFT recipe YAML sets; a clear error for a file that is neither."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--recipe {path}: no such file")
    recipe = yaml.safe_load(path.read_text()) or {}
    model = recipe.get("model") or {}
    policy = model.get("policy") or {}
    if "model_name_or_path" not in policy or not {"micro_batch_size", "micro_batch_tokens"} & set(model):
        raise ValueError(f"{path}: not a GRPO recipe, nor an RFT recipe with a token budget (needs "
                         f"model.policy.model_name_or_path and model.micro_batch_size or model.micro_batch_tokens)")
    engine = (model.get("engine") or {}).get("init_args") or {}
    if "engine" not in model:  # RFT: the evaluation callback's engine, if it names one
        callbacks = ((recipe.get("trainer") or {}).get("callbacks") or [])
        engine = next((((c.get("init_args") or {}).get("engine") or {}).get("init_args") or {} for c in callbacks
                       if isinstance(c, dict) and (c.get("init_args") or {}).get("engine")), {})
    sizes = RecipeSizes(recipe=str(path), model=policy["model_name_or_path"])
    for name in ("dtype", "load_in_4bit", "lora", "gradient_checkpointing", "logprob_chunk_size"):
        if name in policy:
            setattr(sizes, name, policy[name])
    sizes.engine_batch = engine.get("batch_size", sizes.engine_batch)
    sizes.num_generations = model.get("num_generations", sizes.num_generations)
    sizes.max_new_tokens = (model.get("sampling") or {}).get("max_new_tokens", sizes.max_new_tokens)
    # a token budget's worst micro-batch: as many full-length sequences as the budget holds
    sizes.micro_batch_size = model.get("micro_batch_size") or max(
        1, model["micro_batch_tokens"] // (PROMPT_TOKENS + sizes.max_new_tokens))
    return sizes


def model_config_path(sizes: RecipeSizes) -> Path:
    """``benchmarks/model_configs/<hub id>.json``; names the recipe and its field when it is missing."""
    path = MODEL_CONFIGS / f"{sizes.model}.json"
    if not path.is_file():
        known = sorted(str(p.relative_to(MODEL_CONFIGS).with_suffix("")) for p in MODEL_CONFIGS.rglob("*.json"))
        raise FileNotFoundError(
            f"{sizes.recipe}: model.policy.model_name_or_path {sizes.model!r} has no architecture config in the "
            f"repository ({path.relative_to(harness.ROOT)} is missing; this benchmark downloads nothing). "
            f"Add the model's config.json there. Configs present: {known}")
    return path


def architecture(sizes: RecipeSizes, shape: dict) -> dict:
    """The model's ``config.json`` fields, with ``shape`` overriding (``--quick``)."""
    return {**json.loads(model_config_path(sizes).read_text()), **shape}


def parameter_counts(config: dict) -> dict:
    """Parameters of a Llama/Qwen2-style decoder from its config: decoder linears, embeddings (+ head), adapter."""
    hidden, mlp, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, mlp), (hidden, mlp), (mlp, hidden)]
    linears = layers * sum(i * o for i, o in shapes)
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return {"linears": linears, "embeddings": embeddings, "lora_per_rank": layers * sum(i + o for i, o in shapes)}


def estimated_peak_bytes(sizes: RecipeSizes, config: dict, plan: Plan) -> int:
    """A generous estimate of the run's peak resident bytes, checked before anything is allocated.

    The parent builds the random model in bf16 and saves it (2 B per parameter); the child loads it
    (transformers reads the bf16 checkpoint before quantising) and then holds the recipe's weights,
    adapter, moments and the largest measured update (checkpointed inputs, one recomputed layer, one
    chunk of fp32 logits). 1.5x for the allocator and the libraries.
    """
    counts = parameter_counts(config)
    parameters = counts["linears"] + counts["embeddings"]
    adapter = counts["lora_per_rank"] * (sizes.lora or {}).get("r", 16) if sizes.lora is not None else parameters
    linears = counts["linears"] * (0.53 if sizes.load_in_4bit else 2 if sizes.dtype == "bfloat16" else 4)
    resident = linears + counts["embeddings"] * 4 + adapter * 16
    tokens = max(m * (plan.prompt_tokens + c) for m, c in plan.update_points)
    layers = 1 if sizes.gradient_checkpointing else config["num_hidden_layers"]
    update = tokens * (config["hidden_size"] * 2 * config["num_hidden_layers"] + config["intermediate_size"] * 6 * layers)
    logits = (sizes.logprob_chunk_size or tokens) * config["vocab_size"] * 18
    return int(1.5 * max(parameters * 2 * 2, parameters * 2 + resident, resident + update + logits))


def available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo``: what this machine can allocate without swapping."""
    with open("/proc/meminfo") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))


def check_memory(sizes: RecipeSizes, config: dict, plan: Plan, limit_bytes: int) -> None:
    """Refuse, before any allocation, a run whose estimated peak exceeds ``limit_bytes``."""
    need = estimated_peak_bytes(sizes, config, plan)
    if need > limit_bytes:
        raise MemoryError(
            f"{sizes.recipe}: {sizes.model} at true size needs ~{need / 2**30:.1f} GiB for this measurement "
            f"(update points {plan.update_points}), more than the {limit_bytes / 2**30:.1f} GiB this machine can "
            f"give (MemAvailable, or --memory-limit-gib); nothing was allocated. Run it on a machine with more "
            f"memory, or with smaller --update-points")


def build_model_dir(config: dict, directory: Path) -> Path:
    """The architecture with random weights, saved in bf16 with the Qwen2.5 stand-in's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rloop_lightning import tiny

    tokenizer = AutoTokenizer.from_pretrained(tiny.materialize(TOKENIZER_MODEL))
    fields = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    model_config = AutoConfig.for_model(**fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def update_point(text: str) -> list[int]:
    """``AxB``: A completions of B tokens (completion columns of an update, prompt tokens of a rollout)."""
    m, _, c = text.partition("x")
    if not (m.isdigit() and c.isdigit() and int(m) > 0 and int(c) > 0):
        raise argparse.ArgumentTypeError(f"a point is AxB (completions x tokens), got {text!r}")
    return [int(m), int(c)]


def run_child(arguments: list[str]) -> dict:
    """``python -m benchmarks.true_size --child ...`` with its progress on this stderr; its last stdout line."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors leave RSS
    result = subprocess.run([sys.executable, "-m", "benchmarks.true_size", *arguments], cwd=harness.ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({result.returncode}): see its output above")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> str | None:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"a GRPO recipe (default {DEFAULT_RECIPE})")
    parser.add_argument("--update-points", type=update_point, nargs="+",
                        help="update micro-batches MxC, two or more token counts (default 1x513 2x513)")
    parser.add_argument("--rollout-points", type=update_point, nargs=3,
                        help="rollouts BxP (completions x prompt tokens): B0xP0 B1xP0 B0xP1 (default 32x700 64x700 "
                             "32x350)")
    parser.add_argument("--memory-limit-gib", type=float, help="refuse above this (default: MemAvailable)")
    parser.add_argument("--model-dir", help="keep the random model here (built if absent, reused if present)")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--child", nargs=2, metavar=("PLAN_JSON", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = harness.fill_defaults(parser.parse_args(argv),
                                 quick={"update_points": [[1, 33], [2, 33]], "rollout_points": [[2, 80], [4, 80],
                                                                                               [2, 120]]},
                                 full={"update_points": [[1, 513], [2, 513]],
                                       "rollout_points": [[32, 700], [64, 700], [32, 350]]})
    sizes = read_recipe(args.recipe)
    if args.child:
        from benchmarks import true_size_measure

        harness.setup(args.threads)
        plan = Plan(**json.loads(args.child[0]))
        print(json.dumps(true_size_measure.measure(sizes, plan, args.child[1])))
        return None
    plan = Plan(args.update_points, args.rollout_points,
                **(dict(prompt_tokens=16, shape=QUICK_SHAPE) if args.quick else {}))
    if len({m * (plan.prompt_tokens + c) for m, c in plan.update_points}) < 2:
        parser.error("--update-points needs two or more different token counts (the line's slope and intercept)")
    config = architecture(sizes, plan.shape)
    limit = args.memory_limit_gib * 2**30 if args.memory_limit_gib else available_bytes()
    check_memory(sizes, config, plan, limit)
    started = harness.setup(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model_dir or Path(scratch) / "model")
        if not (model_dir / "config.json").is_file():
            harness.log(f"building {sizes.model} ({'shrunk' if plan.shape else 'true size'}, random weights) ...")
            build_model_dir(config, model_dir)
        harness.log("measuring in a fresh process ...")
        result = run_child(["--child", json.dumps(asdict(plan)), str(model_dir), "--recipe", args.recipe,
                            "--threads", str(args.threads)])
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": asdict(sizes), "plan": asdict(plan), "result": result},
                                              indent=1))
    from benchmarks import true_size_measure

    table, details = true_size_measure.tables(sizes, plan, result)
    text = harness.report(table, started, details)
    print(text)
    return text


if __name__ == "__main__":
    main()
