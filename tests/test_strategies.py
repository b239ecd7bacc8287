"""Strategy helpers, FSDP weight gathering on 2 CPU processes, and a 2-process DDP ``rloop grpo fit``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, Qwen2Config

from rloop_lightning import strategies
from rloop_lightning.policy import LoraSettings, Policy
from rloop_lightning.strategies import check_strategy, decoder_layer_classes, fsdp_wrap_classes

ROOT = Path(__file__).resolve().parents[1]


def class_names(classes) -> set[str]:
    return {cls.__name__ for cls in classes}


# --------------------------------------------------------------------------- wrap classes


def test_decoder_layers_from_configs_and_ids():
    assert class_names(decoder_layer_classes(Qwen2Config())) == {"Qwen2DecoderLayer"}
    assert class_names(decoder_layer_classes(LlamaConfig())) == {"LlamaDecoderLayer"}
    assert class_names(fsdp_wrap_classes("rloop/micro-llama")) == {"LlamaDecoderLayer", "LlamaForCausalLM"}


def test_decoder_layers_of_a_lora_model(micro_policy):
    lora = Policy("rloop/micro-llama", lora=LoraSettings(r=4))
    lora.load_model()
    for model in (micro_policy.model, lora.model):  # peft's wrapper is looked through
        assert class_names(fsdp_wrap_classes(model)) == {"LlamaDecoderLayer", "LlamaForCausalLM"}


def test_blocks_with_other_names_come_from_no_split_modules():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    assert class_names(decoder_layer_classes(model)) == {"GPT2Block"}


# --------------------------------------------------------------------------- strategy checks


def test_fsdp_on_cpu_names_the_accelerator():
    with pytest.raises(RuntimeError, match="trainer.accelerator is 'cpu'"):
        check_strategy("cpu", "fsdp")
    with pytest.raises(RuntimeError, match="needs CUDA GPUs"):
        check_strategy(CPUAccelerator(), FSDPStrategy)


def test_fsdp_without_cuda_names_the_missing_piece(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CPU-only build"):
        check_strategy("gpu", "fsdp")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        check_strategy("auto", FSDPStrategy)


def test_cpu_strategies_pass(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for strategy in ("ddp", "ddp_spawn", "auto", DDPStrategy):
        check_strategy("cpu", strategy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_strategy("gpu", "fsdp")


# --------------------------------------------------------------------------- FSDP gathering (2 CPU ranks)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shard_and_gather(wrap, output: str, name: str) -> None:
    """Shard micro-llama with ``wrap(policy) -> None``, take a step, gather it back as vLLM sync would."""
    from rloop_lightning.rollout.weights import full_weight_chunks

    policy = Policy("rloop/micro-llama")
    policy.load_model()
    expected = {key: p.detach().clone() for key, p in policy.model.named_parameters()}
    wrap(policy)
    before_forward = list(full_weight_chunks(policy.model))  # FSDP1 skips: no root before the first forward
    policy.completion_logprobs(policy.encode_pairs(["1 2 -> 3\n"], ["1+2"]))[0].sum().backward()
    chunks = [[(key, tensor.clone()) for key, tensor in chunk] for chunk in full_weight_chunks(policy.model)]
    gathered = {key: tensor for chunk in chunks for key, tensor in chunk}
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in policy.model.parameters())
    torch.save({"before_forward": len(before_forward), "chunks": len(chunks), "local_numel": local,
                "names_match": sorted(gathered) == sorted(expected),
                "values_match": all(torch.equal(gathered[k], expected[k]) for k in expected if k in gathered)},
               f"{output}/{name}.rank{torch.distributed.get_rank()}.pt")


def fsdp1(policy: Policy) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy.model = FullyShardedDataParallel(
        policy.model, auto_wrap_policy=ModuleWrapPolicy(strategies.fsdp_wrap_classes(policy.model)),
        device_id=torch.device("cpu"))


def fsdp2(policy: Policy) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    layers = tuple(decoder_layer_classes(policy.model))
    for module in policy.model.modules():
        if isinstance(module, layers):
            fully_shard(module, mesh=mesh)
    fully_shard(policy.model, mesh=mesh)


def gather_worker(rank: int, port: int, output: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shard_and_gather(fsdp1, output, "fsdp1")
        shard_and_gather(fsdp2, output, "fsdp2")
    finally:
        dist.destroy_process_group()


def test_sharded_weights_gather_back_to_hugging_face_names(tmp_path):
    """FULL_SHARD over gloo on 2 CPU ranks: what ``VLLMEngine.sync_weights`` would load is the full model."""
    torch.multiprocessing.spawn(gather_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    model = Policy("rloop/micro-llama").load_model()
    total, num_parameters = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    for name, before_forward, chunks in (("fsdp1", 0, 3), ("fsdp2", num_parameters, num_parameters)):
        for rank in (0, 1):
            result = torch.load(tmp_path / f"{name}.rank{rank}.pt")
            assert result["before_forward"] == before_forward  # FSDP1: nothing yet; FSDP2: any time
            assert result["chunks"] == chunks  # FSDP1: causal-LM unit + one per decoder layer; FSDP2: per tensor
            assert result["local_numel"] < total  # really sharded
            assert result["names_match"] and result["values_match"], name


# --------------------------------------------------------------------------- DDP fit on 2 CPU processes


class WeightChecksum(L.Callback):
    """Write each rank's parameter checksum at the end of fit (DDP ranks must agree)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        total = sum(float(p.detach().double().sum()) for p in pl_module.policy.parameters())
        path = Path(trainer.default_root_dir) / f"checksum.rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"checksum": total}))


RUN_CONFIG = """
seed_everything: 0
trainer:
  max_steps: 2
  log_every_n_steps: 1
  enable_checkpointing: false
  enable_progress_bar: false
  logger: false
  default_root_dir: {root}
  callbacks:
    - class_path: rloop_lightning.callbacks.ExpertHarvester
    - class_path: test_strategies.WeightChecksum
model:
  policy: {{model_name_or_path: rloop/micro-llama}}
  sampling: {{max_new_tokens: 8}}
  num_generations: 2
  micro_batch_size: 4
  optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 0.01}}}}
data:
  class_path: rloop_lightning.data.datamodules.PromptDataModule
  init_args:
    task: {{class_path: rloop_lightning.tasks.Countdown, init_args: {{num_train: 64, num_test: 8, num_ood: 8}}}}
    batch_size: 2
"""


def test_grpo_fit_under_ddp_on_two_cpu_processes(tmp_path):
    config = tmp_path / "run.yaml"
    root = tmp_path / "run"
    config.write_text(RUN_CONFIG.format(root=root))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                 os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "rloop_lightning", "grpo", "fit", "--config", str(config),
               "--config", str(ROOT / "configs/strategies/ddp_cpu.yaml")]
    result = subprocess.run(command, check=False, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    experts = root / "experts"
    for rank in ("00", "01"):
        assert (experts / f"rank{rank}").is_dir()
        assert json.loads((experts / f"prompt_stats.rank{rank}.json").read_text())
    checksums = [json.loads((root / f"checksum.rank{r}.json").read_text())["checksum"] for r in (0, 1)]
    initial = sum(float(p.detach().double().sum()) for p in Policy("rloop/micro-llama").load_model().parameters())
    assert checksums[0] == pytest.approx(checksums[1], abs=1e-9)  # gradients were averaged across ranks
    assert checksums[0] != pytest.approx(initial, abs=1e-6)  # and the policy did train


class ShardingProbe(L.Callback):
    """Record, per rank, whether the policy's parameters are FSDP2 shards and how many elements it holds."""

    def on_fit_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        parameters = list(pl_module.policy.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters)
        path = Path(trainer.default_root_dir) / f"sharding.rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"dtensor": all(isinstance(p, DTensor) for p in parameters), "local": local}))


def test_grpo_fit_under_fsdp2_on_two_cpu_processes_exports_full_weights(tmp_path):
    config = tmp_path / "run.yaml"
    root = tmp_path / "run"
    config.write_text(RUN_CONFIG.format(root=root).replace(
        "    - class_path: test_strategies.WeightChecksum",
        "    - class_path: test_strategies.ShardingProbe\n    - class_path: rloop_lightning.callbacks.ExportPolicy"))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                 os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "rloop_lightning", "grpo", "fit", "--config", str(config),
               "--config", str(ROOT / "configs/strategies/fsdp2_cpu.yaml")]
    result = subprocess.run(command, check=False, cwd=tmp_path, env=environment, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    initial = Policy("rloop/micro-llama").load_model()
    total = sum(p.numel() for p in initial.parameters())
    probes = [json.loads((root / f"sharding.rank{r}.json").read_text()) for r in (0, 1)]
    assert all(p["dtensor"] for p in probes) and all(p["local"] < total for p in probes)  # really sharded
    for rank in ("00", "01"):
        assert (root / "experts" / f"rank{rank}").is_dir()
    exported = Policy(str(root / "policy")).load_model()  # full weights, loadable without FSDP
    shapes = {n: p.shape for n, p in initial.named_parameters()}
    assert {n: p.shape for n, p in exported.named_parameters()} == shapes
    assert any(not torch.equal(a, b) for a, b in zip(exported.parameters(), initial.parameters()))  # trained


@pytest.mark.parametrize("trainer, message", [
    ({"accelerator": "cpu", "devices": (os.cpu_count() or 1) + 1, "strategy": "ddp"}, "cores"),
    ({"accelerator": "cpu", "devices": 1, "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}},
     "trainer.devices=1"),
], ids=["more-processes-than-cores", "fsdp2-on-one-device"])
def test_the_loop_refuses_a_device_count_that_cannot_run_before_anything_is_written(tmp_path, trainer, message):
    import json

    from rloop_lightning.cli import cli_main
    from test_loop import write_loop_config

    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        cli_main(["fit", "--config", str(config), "--trainer", json.dumps(trainer)])
    assert not (tmp_path / "run").exists()
