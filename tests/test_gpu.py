"""CUDA checks (``pytest -m gpu``): what the CPU tests rehearse, run once on one GPU.

Collected everywhere and skipped without CUDA; ``scripts/gpu_acceptance.sh`` runs them on a GPU
machine (one H100 for ~15 minutes in all: these take a few minutes) with only the packages the GPU
image has plus carried wheels (bitsandbytes). Measurements go into the junit report as properties
(``record_property``) and, when ``RLOOP_GPU_REPORT_DIR`` is set, as files there for the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rloop_lightning.policy import LoraSettings, Policy

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = ("no CUDA device: torch.cuda.is_available() is False "
           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); scripts/gpu_acceptance.sh runs these on a GPU")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]
CUDA = torch.device("cuda", 0)
LOGPROB_TOLERANCE = 0.05  # bf16 autocast on CUDA vs fp32 on CPU, max |difference| of a log-prob (nats)


def report_file(name: str, text: str) -> None:
    """Keep a measurement for the acceptance report (``RLOOP_GPU_REPORT_DIR``)."""
    directory = os.environ.get("RLOOP_GPU_REPORT_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / name).write_text(text)


def gpu_trainer(tmp_path, steps: int, precision: str = "bf16-mixed", **settings):
    import lightning as L

    return L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), **settings)


def trainable_snapshot(policy: Policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().clone() for name, p in policy.named_parameters() if p.requires_grad}


def assert_changed_and_finite(before: dict[str, torch.Tensor], policy: Policy) -> None:
    after = trainable_snapshot(policy)
    assert after.keys() == before.keys()
    assert all(torch.isfinite(value).all() for value in after.values())
    assert any(not torch.equal(after[name], before[name]) for name in before)
    assert all(p.device.type == "cuda" for p in policy.parameters())


def digit_share(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def grpo_module(policy: Policy, **overrides):
    from rloop_lightning.grpo import GRPOModule
    from rloop_lightning.rollout.base import SamplingParams

    settings = dict(policy=policy, sampling=SamplingParams(max_new_tokens=8), num_generations=4,
                    reward_functions=[digit_share], correct_threshold=0.3,
                    optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    return GRPOModule(**{**settings, **overrides})


def countdown_prompts(batch_size: int = 4):
    from rloop_lightning.data.datamodules import PromptDataModule
    from rloop_lightning.tasks import Countdown

    return PromptDataModule(Countdown(num_train=24, num_test=4, num_ood=4), batch_size=batch_size)


def test_grpo_steps_in_bf16_on_cuda_change_the_weights_and_keep_them_finite(tmp_path):
    torch.manual_seed(0)
    module = grpo_module(Policy("rloop/tiny-llama"))
    module.policy.load_model()
    before = trainable_snapshot(module.policy)
    gpu_trainer(tmp_path, steps=2).fit(module, countdown_prompts())
    assert_changed_and_finite(before, module.policy)


def test_rft_steps_in_bf16_on_cuda_change_the_weights_and_keep_them_finite(tmp_path):
    from rloop_lightning.data.datamodules import DemonstrationDataModule
    from rloop_lightning.rft import RFTModule
    from rloop_lightning.tasks import Countdown

    torch.manual_seed(0)
    module = RFTModule(Policy("rloop/tiny-llama"))
    module.policy.load_model()
    before = trainable_snapshot(module.policy)
    data = DemonstrationDataModule(Countdown(num_train=16, num_test=4, num_ood=4), batch_size=4)
    gpu_trainer(tmp_path, steps=2).fit(module, datamodule=data)
    assert_changed_and_finite(before, module.policy)


def logprob_batch(policy: Policy):
    prompts = [f"{i} {i + 3} {2 * i} ->" for i in range(4)]
    completions = [f"{3 * i + 3} = {i} + {i + 3} + {2 * i}" * 3 for i in range(4)]
    return policy.encode_pairs(prompts, completions)


def on(batch, device):
    return type(batch)(batch.input_ids.to(device), batch.attention_mask.to(device), batch.completion_mask.to(device),
                       batch.prompt_length)


def test_cuda_bf16_logprobs_match_cpu_fp32_and_chunks_match_the_full_logits(record_property):
    """The same weights and tokens: bf16 autocast on CUDA within LOGPROB_TOLERANCE of fp32 on the CPU;
    on CUDA in fp32, chunks of the LM head equal the full logits (1e-4)."""
    policy = Policy("rloop/tiny-llama", logprob_chunk_size=None)
    policy.load_model().eval()
    batch = logprob_batch(policy)
    mask = batch.completion_mask.bool()
    with torch.no_grad():
        cpu, _ = policy.completion_logprobs(batch)
        policy.model.to(CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cuda_bf16, _ = policy.completion_logprobs(on(batch, CUDA))
        full, _ = policy.completion_logprobs(on(batch, CUDA))
        policy.logprob_chunk_size = 7
        chunked, _ = policy.completion_logprobs(on(batch, CUDA))
    gap = float((cuda_bf16.float().cpu() - cpu).abs()[mask].max())
    chunk_gap = float((chunked - full).abs().cpu()[mask].max())
    record_property("logprob_gap_cuda_bf16_vs_cpu_fp32", gap)
    record_property("logprob_gap_chunked_vs_full_cuda_fp32", chunk_gap)
    report_file("logprobs.json", json.dumps({"cuda_bf16_vs_cpu_fp32": gap, "chunked_vs_full_cuda_fp32": chunk_gap}))
    assert gap < LOGPROB_TOLERANCE
    assert chunk_gap < 1e-4


def update_peak(chunk_size, model_dir: str) -> int:
    """Peak CUDA memory allocated above the resident weights by one GRPO update micro-batch at 8 x 513 tokens."""
    from benchmarks.update_memory import update, update_batch

    policy = Policy(model_dir, dtype="bfloat16", logprob_chunk_size=chunk_size)
    policy.load_model().to(CUDA)
    batch = on(update_batch(policy, 8, 513), CUDA)
    update(policy, on(update_batch(policy, 1, 8), CUDA))  # warm-up
    policy.model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    update(policy, batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del policy, batch
    torch.cuda.empty_cache()
    return peak


def test_update_peak_cuda_memory_at_a_152k_vocabulary_chunked_vs_full(tmp_path, record_property):
    """The CUDA counterpart of ``benchmarks.update_memory``: full logits ~18 B per (token x vocabulary),
    chunks ~12 B per (chunk token x vocabulary) on the CPU."""
    from benchmarks.rollout_memory import VOCABULARY, build_model_dir

    model_dir = str(build_model_dir(tmp_path / "model"))
    peaks = {str(chunk): update_peak(chunk, model_dir) for chunk in (None, 512, 256)}
    per_unit = {arm: peak / ((8 * 513 if arm == "None" else int(arm)) * VOCABULARY) for arm, peak in peaks.items()}
    for arm, peak in peaks.items():
        record_property(f"update_peak_bytes_chunk_{arm}", peak)
        record_property(f"update_bytes_per_token_x_vocabulary_chunk_{arm}", round(per_unit[arm], 2))
    report_file("update_memory.json", json.dumps({"peak_bytes": peaks, "bytes_per_token_x_vocabulary": per_unit}))
    assert peaks["512"] < peaks["None"] / 4 and peaks["256"] < peaks["512"]


def bitsandbytes_or_skip() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # an import that fails for any reason (missing, wrong CUDA) is the finding
        pytest.skip(f"bitsandbytes does not load on this machine ({type(error).__name__}: {error}); "
                    "scripts/gpu_acceptance.sh installs the carried wheel from wheels/")


def test_qlora_4bit_on_cuda_trains_the_adapter(record_property):
    bitsandbytes_or_skip()
    torch.manual_seed(0)
    policy = Policy("rloop/tiny-llama", dtype="bfloat16", load_in_4bit=True, lora=LoraSettings(r=8, alpha=16))
    model = policy.load_model()
    if next(model.parameters()).device.type != "cuda":
        model.to(CUDA)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    before = trainable_snapshot(policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = on(logprob_batch(policy), CUDA)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logprobs, _ = policy.completion_logprobs(batch)
        loss = -(logprobs * batch.completion_mask).sum() / batch.completion_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    record_property("qlora_loss", float(loss))
    assert torch.isfinite(loss)
    assert_changed_and_finite(before, policy)


def test_async_sampler_on_cuda_with_staleness_zero_is_the_synchronous_phase(tmp_path):
    """The sampler process on ``cuda:0`` beside the trainer; fp32 so both runs take the same kernels."""
    from rloop_lightning.rollout.staleness import RolloutSettings

    results = {}
    for mode in ("sync", "async"):
        torch.manual_seed(0)
        rollout = RolloutSettings(mode=mode, max_staleness=0, sampler_device="cuda:0")
        module = grpo_module(Policy("rloop/micro-llama"), rollout=rollout)
        gpu_trainer(tmp_path / mode, steps=3, precision="32-true").fit(module, countdown_prompts())
        results[mode] = trainable_snapshot(module.policy)
    assert results["async"].keys() == results["sync"].keys()
    for name, weight in results["sync"].items():
        torch.testing.assert_close(results["async"][name], weight, msg=name)


def test_fsdp2_on_one_gpu_shards_trains_and_gathers(tmp_path):
    """``ModelParallelStrategy`` over a one-GPU mesh: DTensor parameters, manual backward, full gathers."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    module = grpo_module(Policy("rloop/micro-llama"))
    initial = {n: p.detach().clone() for n, p in Policy("rloop/micro-llama").load_model().named_parameters()}
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False)
    gpu_trainer(tmp_path, steps=2, strategy=strategy).fit(module, countdown_prompts())
    parameters = dict(module.policy.model.named_parameters())
    assert parameters and all(isinstance(p, DTensor) for p in parameters.values())
    gathered = {n.removeprefix("_checkpoint_wrapped_module."): p.full_tensor().cpu() for n, p in parameters.items()}
    assert all(torch.isfinite(t).all() for t in gathered.values())
    assert any(not torch.equal(gathered[n], initial[n]) for n in initial if n in gathered)


@pytest.mark.slow
def test_true_size_8gb_recipe_fits_8_gb_on_cuda(tmp_path, record_property):
    """``benchmarks.true_size`` for the 8 GB recipe at true size on CUDA, at the recipe's own micro-batch
    (8 x 713 tokens) and engine batch (64 sequences of 708 prompt + 4 new tokens: the KV cache of 200 +
    512), so the fitted lines pass through the recipe's point: the consumer-GPU promise."""
    out = tmp_path / "true_size.json"
    command = [sys.executable, "-m", "benchmarks.true_size", "--recipe", "configs/recipes/qlora_gsm8k_grpo_8gb.yaml",
               "--update-points", "4x513", "8x513", "--rollout-points", "64x708", "32x708", "64x354",
               "--threads", "8", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=420,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    report_file("true_size_8gb.md", result.stdout + "\n" + result.stderr[-3000:])
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())["result"]
    resident = measured["resident"]
    update = max(u["growth"]["peak"] for u in measured["updates"])
    rollout = max(r["growth"]["peak"] for r in measured["rollouts"])
    for name, value in (("resident", resident), ("update_peak", update), ("rollout_peak", rollout)):
        record_property(f"true_size_8gb_{name}_bytes", value)
    reserved = max(u["growth"]["reserved_peak"] for u in measured["updates"])
    record_property("true_size_8gb_update_reserved_peak_bytes", reserved)
    assert resident + update < 8e9 and resident + rollout < 8e9 and reserved < 8e9
