"""The measuring half of ``benchmarks.true_size``: runs in the child process, and turns its numbers into tables.

``measure`` loads the policy as the recipe sets it, then measures each phase's peak growth with a
``Meter`` (peak RSS on the CPU, ``torch.cuda`` peak statistics on CUDA); ``tables`` fits the update's
line in the micro-batch and the rollout's plane in (batch, new tokens) and prints them next to what
``docs/scale_out.md`` computes.
"""

from __future__ import annotations

import time

from benchmarks import harness
from benchmarks.rollout_memory import reset_peak_rss, rss_kib

FILLER = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May? ").split()
MIB = 2**20


class Meter:
    """Peak memory growth of one phase on the device present: RSS on the CPU, allocated/reserved on CUDA."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.before = 0

    def now(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else rss_kib("VmRSS") * 1024

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        self.before = self.now()

    def peak_growth(self) -> dict:
        """Bytes above the level at ``reset``: peak, and (CUDA) the allocator's reserved peak."""
        import torch

        if not self.cuda:
            return {"peak": rss_kib("VmHWM") * 1024 - self.before, "after": self.now() - self.before}
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated() - self.before, "after": self.now() - self.before,
                "reserved_peak": torch.cuda.max_memory_reserved()}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_inventory(model) -> dict:
    """Bytes of the loaded weights by kind: 4-bit linears (with their quantisation constants), the
    other base weights (embeddings, norms), the adapter."""
    linears = other = adapter = 0
    for name, parameter in model.named_parameters():
        size = tensor_bytes([parameter])
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            nested = getattr(state, "state2", None)
            size += tensor_bytes([t for t in (state.absmax, state.code, getattr(nested, "absmax", None),
                                              getattr(nested, "code", None)) if t is not None])
            linears += size
        elif "lora_" in name:
            adapter += size
        else:
            other += size
    return {"linears_4bit" if linears else "linears": linears, "other": other, "adapter": adapter}


def prompt_text(policy, tokens: int) -> str:
    """A GSM8K-like question whose templated prompt has at most ``tokens`` tokens (as close as words allow)."""
    words: list[str] = []
    while len(policy.encode_prompts([" ".join([*words, FILLER[len(words) % len(FILLER)]])])[0]) <= tokens:
        words.append(FILLER[len(words) % len(FILLER)])
    return " ".join(words)


def update(policy, batch, autocast) -> None:
    """One GRPO micro-batch, as ``benchmarks.update_memory`` runs it, under the recipe's bf16 autocast."""
    import torch

    from benchmarks.update_memory import update as grpo_update

    with autocast():
        grpo_update(policy, batch)
    torch.cuda.synchronize() if torch.cuda.is_available() else None


def update_batch(policy, micro_batch: int, prompt_tokens: int, completion_tokens: int, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    vocabulary = len(policy.tokenizer)
    prompts = torch.randint(3, vocabulary, (micro_batch, prompt_tokens), generator=generator).tolist()
    completions = torch.randint(3, vocabulary, (micro_batch, completion_tokens), generator=generator).tolist()
    batch = policy.make_batch(prompts, completions)
    return type(batch)(batch.input_ids.to(device), batch.attention_mask.to(device), batch.completion_mask.to(device),
                       batch.prompt_length)


def load(sizes, model_dir: str, device, meter: Meter):
    """The policy as the recipe loads it; the load's growth and the weights' inventory."""
    from rloop_lightning.policy import LoraSettings, Policy

    policy = Policy(model_dir, dtype=sizes.dtype, load_in_4bit=sizes.load_in_4bit,
                    lora=LoraSettings(**sizes.lora) if sizes.lora is not None else None,
                    gradient_checkpointing=sizes.gradient_checkpointing, logprob_chunk_size=sizes.logprob_chunk_size)
    meter.reset()
    started = time.perf_counter()
    model = policy.load_model()
    if next(model.parameters()).device.type != device.type:  # bitsandbytes' 4-bit loads straight onto CUDA
        model.to(device)
    return policy, {"growth": meter.peak_growth(), "inventory": weight_inventory(model),
                    "seconds": time.perf_counter() - started}


def measure_updates(policy, sizes, plan, device, meter: Meter, autocast) -> tuple[dict, list[dict]]:
    """AdamW's moments after one step, then the update's peak growth at each micro-batch of ``plan``."""
    import torch

    model = policy.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    meter.reset()
    update(policy, update_batch(policy, 1, 8, 8, device), autocast)  # warm-up: kernels, allocator, autograd
    optimizer.step()
    model.zero_grad(set_to_none=True)
    moments = tensor_bytes(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
                           and t.dim())
    optimizer_row = {"moments": moments, "growth": meter.peak_growth()}
    rows = []
    for micro_batch, completion_tokens in plan["update_points"]:
        harness.log(f"update, {micro_batch} x ({plan['prompt_tokens']} + {completion_tokens}) tokens ...")
        batch = update_batch(policy, micro_batch, plan["prompt_tokens"], completion_tokens, device)
        meter.reset()
        started = time.perf_counter()
        update(policy, batch, autocast)
        seconds = time.perf_counter() - started
        gradients = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        rows.append({"micro_batch": micro_batch, "growth": meter.peak_growth(), "gradients": gradients,
                     "tokens": int(batch.input_ids.numel()), "seconds": seconds})
        model.zero_grad(set_to_none=True)
        del batch
    return optimizer_row, rows


def measure_rollouts(policy, sizes, plan, meter: Meter, autocast) -> list[dict]:
    """One ``generate`` call of b completions of one P-token prompt per [b, P] of ``plan``: peak growth."""
    from rloop_lightning.rollout.base import SamplingParams
    from rloop_lightning.rollout.hf import HFGenerateEngine

    policy.model.config.use_cache = True
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=plan["rollout_new_tokens"])
    with autocast():  # warm-up: kernels, allocator
        HFGenerateEngine(batch_size=2).generate(policy, [prompt_text(policy, 8)], 2, sampling, seed=0)
    rows = []
    for batch, prompt_tokens in plan["rollout_points"]:
        harness.log(f"rollout, {batch} completions of a {prompt_tokens}-token prompt ...")
        text = prompt_text(policy, prompt_tokens)
        meter.reset()
        started = time.perf_counter()
        with autocast():
            rollouts = HFGenerateEngine(batch_size=batch).generate(policy, [text], batch, sampling, seed=0)
        rows.append({"batch": batch, "new_tokens": plan["rollout_new_tokens"], "growth": meter.peak_growth(),
                     "prompt_tokens": len(rollouts.prompt_ids[0]), "completion_tokens": rollouts.num_completion_tokens,
                     "seconds": time.perf_counter() - started})
        del rollouts
    return rows


def measure(sizes, plan, model_dir: str) -> dict:
    """Everything, in this (fresh) process: load, optimiser, updates, rollouts."""
    from contextlib import nullcontext

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = Meter(device)
    baseline = meter.now()
    plan = plan if isinstance(plan, dict) else plan.__dict__

    def autocast():
        if sizes.dtype == "float32":
            return nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    policy, loaded = load(sizes, model_dir, device, meter)
    optimizer_row, updates = measure_updates(policy, sizes, plan, device, meter, autocast)
    resident = meter.now() - baseline
    in_use = None
    if device.type == "cuda":  # the whole device as the driver sees it: context, allocator's reserve, tensors
        free, total = torch.cuda.mem_get_info()
        in_use = {"in_use": total - free, "reserved": torch.cuda.memory_reserved()}
    rollouts = measure_rollouts(policy, sizes, plan, meter, autocast)
    return {"device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
            "baseline": baseline, "resident": resident, "device_memory": in_use, "load": loaded, "optimizer": optimizer_row,
            "updates": updates, "rollouts": rollouts}


# --------------------------------------------------------------------------- fits and tables


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs (two or more distinct xs)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def fit_rollout(points: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """(a, s, k) of growth = a + b (s + k L) through (b0, L0), (b1, L0), (b0, L1): ``k`` per token of a
    sequence (prompt or generated: the KV cache), ``s`` per sequence whatever its length (a step's logits)."""
    (b0, t0, g00), (b1, _, g10), (_, t1, g01) = points
    k = (g01 - g00) / (b0 * (t1 - t0))
    per_sequence = (g10 - g00) / (b1 - b0)
    s = per_sequence - k * t0
    return g00 - b0 * per_sequence, s, k


def gb(value: float) -> str:
    return f"{value / 1e9:.2f}"


def tables(sizes, plan, result: dict) -> tuple[str, list[str]]:
    """The phases measured, then the recipe's terms (measured or read off the fits), for docs/scale_out.md."""
    plan = plan if isinstance(plan, dict) else plan.__dict__
    cuda = result["device"].startswith("cuda")
    inventory, loaded = result["load"]["inventory"], result["load"]["growth"]
    updates, rollouts = result["updates"], result["rollouts"]
    intercept, slope = fit_line([u["tokens"] for u in updates], [u["growth"]["peak"] for u in updates])
    a, s, k = fit_rollout([(r["batch"], r["prompt_tokens"] + r["new_tokens"], r["growth"]["peak"]) for r in rollouts])
    m, b, t = sizes.micro_batch_size, sizes.engine_batch, sizes.max_new_tokens
    recipe_tokens = m * (plan["prompt_tokens"] + t + 1)
    update_peak, rollout_peak = intercept + slope * recipe_tokens, a + b * (s + k * (plan["prompt_tokens"] + t))
    how = ("measured" if any(u["tokens"] == recipe_tokens for u in updates) else
           f"line through {[u['tokens'] for u in updates]} tokens")
    rows = [["load (peak)", "weights as loaded", gb(loaded["peak"]), f"{result['load']['seconds']:.0f}"]]
    rows.append(["optimiser", "warm-up update + one AdamW step", gb(result["optimizer"]["growth"]["peak"]), ""])
    rows += [["update", f"m = {u['micro_batch']} x {u['tokens'] // u['micro_batch']} tokens", gb(u["growth"]["peak"]),
              f"{u['seconds']:.0f}"] for u in updates]
    rows += [["rollout", f"b = {r['batch']}, {r['prompt_tokens']} + {r['new_tokens']} tokens", gb(r["growth"]["peak"]),
              f"{r['seconds']:.0f}"] for r in rollouts]
    phases = harness.markdown_table(["phase", "size", "peak growth (GB)", "s"], rows)
    source = f"measured ({'CUDA' if cuda else 'CPU'}, {'shrunk' if plan['shape'] else 'true size'})"
    terms = [
        ["4-bit decoder linears (+ quantisation constants)" if "linears_4bit" in inventory else "decoder linears",
         "tensor bytes", gb(inventory.get("linears_4bit", inventory.get("linears", 0)))],
        ["embeddings (= head) and norms", "tensor bytes", gb(inventory["other"])],
        ["LoRA weights", "tensor bytes", gb(inventory["adapter"])],
        ["AdamW moments", "tensor bytes", gb(result["optimizer"]["moments"])],
        ["resident after load + optimiser step (growth over imports)", source, gb(result["resident"])],
        ["LoRA gradients", "tensor bytes", gb(updates[-1]["gradients"])],
        ["update: activations per token (slope)", source, f"{slope / 1e3:.1f} KB"],
        [f"update: activations of the recipe's {recipe_tokens} tokens", source, gb(slope * recipe_tokens)],
        ["update: what does not grow with the tokens (chunk of logits, head's bf16 copy, gradients)", source,
         gb(intercept)],
        [f"**update peak growth at the recipe's m = {m} ({recipe_tokens} tokens)**", f"{source}, {how}",
         f"**{gb(update_peak)}**"],
        ["rollout: KV cache per token of a sequence (k)", source, f"{k / 1e3:.1f} KB"],
        ["rollout: per sequence whatever its length (one step's logits; s)", source, f"{s / 1e6:.1f} MB"],
        ["rollout: what does not grow with the batch (a)", source, gb(a)],
        [f"**rollout peak growth at the recipe's b = {b}, {plan['prompt_tokens']} + {t} tokens**",
         f"{source}, plane through (b, tokens) {[(r['batch'], r['prompt_tokens'] + r['new_tokens']) for r in rollouts]}",
         f"**{gb(rollout_peak)}**"],
        ["**resident + update peak**", "", f"**{gb(result['resident'] + update_peak)}**"],
        ["**resident + rollout peak**", "", f"**{gb(result['resident'] + rollout_peak)}**"],
    ]
    details = [f"{sizes.recipe}: {sizes.model}, {sizes.dtype}, 4-bit {sizes.load_in_4bit}, LoRA {sizes.lora}, "
               f"gradient checkpointing {sizes.gradient_checkpointing}, chunk {sizes.logprob_chunk_size}; "
               f"device {result['device_name']}; GB = 1e9 B",
               "growth: over the resident size before the phase (" + (
                   "torch.cuda.max_memory_allocated; reserved peak "
                   f"{gb(max(u['growth'].get('reserved_peak', 0) for u in updates))} GB"
                   if cuda else "peak RSS, /proc/self/clear_refs then VmHWM") + ")"]
    return phases + "\n\n" + harness.markdown_table(["term", "source", "GB"], terms), details
