"""Helpers for multi-device training: FSDP wrap classes of a Hugging Face model, and strategy checks.

FSDP shards at the granularity of the module classes in ``auto_wrap_policy``. For a decoder-only
LM that is the ``*DecoderLayer`` class (one unit per transformer block; also the unit of activation
checkpointing) plus the ``*ForCausalLM`` class itself, so the embeddings, final norm and LM head
form one unit *under the policy* that ``VLLMEngine`` can gather for weight sync::

    FSDPStrategy(auto_wrap_policy=fsdp_wrap_classes(config),
                 activation_checkpointing_policy=decoder_layer_classes(config))

``check_strategy`` turns "FSDP on a machine without CUDA" into one message that names the missing
piece, before any weights load.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

ModelOrConfig = nn.Module | Any | str  # a model, a transformers PretrainedConfig, or a model id/path
GPU_ONLY_STRATEGIES = ("fsdp", "deepspeed")


def _config_of(model_or_config: ModelOrConfig):
    if isinstance(model_or_config, str):
        from transformers import AutoConfig

        from rloop_lightning import tiny

        source = str(tiny.materialize(model_or_config)) if tiny.is_builtin(model_or_config) else model_or_config
        return AutoConfig.from_pretrained(source)
    return model_or_config


def causal_lm_class(model_or_config: ModelOrConfig) -> type[nn.Module]:
    """The causal-LM class (``Qwen2ForCausalLM``, ...) of a model, config, or model id.

    For a model: its outermost ``PreTrainedModel`` (peft and FSDP wrappers are looked through).
    """
    import transformers

    if isinstance(model_or_config, nn.Module):
        for module in model_or_config.modules():
            if isinstance(module, transformers.PreTrainedModel):
                return type(module)
        raise ValueError(f"{type(model_or_config).__name__} contains no Hugging Face PreTrainedModel")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _config_of(model_or_config)
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"transformers has no causal LM for model_type {config.model_type!r}")
    return getattr(transformers, name)


def decoder_layer_classes(model_or_config: ModelOrConfig) -> set[type[nn.Module]]:
    """The transformer-block classes of a model (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...)."""
    if isinstance(model_or_config, nn.Module):
        classes = {type(m) for m in model_or_config.modules() if type(m).__name__.endswith("DecoderLayer")}
        if not classes:  # other naming (GPT-2 ``GPT2Block``): the classes the model declares unsplittable
            names = set(getattr(causal_lm_class(model_or_config), "_no_split_modules", None) or ())
            classes = {type(m) for m in model_or_config.modules() if type(m).__name__ in names}
    else:
        model_class = causal_lm_class(model_or_config)
        module = sys.modules.get(model_class.__module__) or importlib.import_module(model_class.__module__)
        names = getattr(model_class, "_no_split_modules", None) or [
            name for name in vars(module) if name.endswith("DecoderLayer")]
        classes = {getattr(module, name) for name in names if isinstance(getattr(module, name, None), type)}
    if not classes:
        raise ValueError(f"found no decoder-layer class in {type(model_or_config).__name__}")
    return classes


def fsdp_wrap_classes(model_or_config: ModelOrConfig) -> set[type[nn.Module]]:
    """``auto_wrap_policy`` classes: every decoder layer, plus the causal LM as the outer unit."""
    return decoder_layer_classes(model_or_config) | {causal_lm_class(model_or_config)}


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, str):
        return strategy.lower()
    cls = strategy if isinstance(strategy, type) else type(strategy)
    return cls.__name__.lower()


def _accelerator_name(accelerator: Any) -> str:
    if isinstance(accelerator, str):
        return accelerator.lower()
    cls = accelerator if isinstance(accelerator, type) else type(accelerator)
    return cls.__name__.lower().replace("accelerator", "")


def check_strategy(accelerator: Any, strategy: Any) -> None:
    """Raise a ``RuntimeError`` naming what is missing when ``strategy`` cannot run here.

    ``accelerator`` and ``strategy`` are what the Trainer receives: names (``"cpu"``, ``"fsdp"``)
    or instances/classes (``CUDAAccelerator()``, ``FSDPStrategy``).
    """
    strategy_name, accelerator_name = _strategy_name(strategy), _accelerator_name(accelerator)
    gpu_only = next((name for name in GPU_ONLY_STRATEGIES if name in strategy_name), None)
    if gpu_only is None:
        return
    if accelerator_name == "cpu":
        raise RuntimeError(f"strategy {strategy_name!r} needs CUDA GPUs but trainer.accelerator is 'cpu': set "
                           f"trainer.accelerator to 'gpu', or use configs/strategies/ddp_cpu.yaml on CPU")
    if not torch.cuda.is_available():
        reason = ("this torch is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch"
                  if torch.version.cuda is None
                  else "no CUDA device is visible: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
        raise RuntimeError(f"strategy {strategy_name!r} needs CUDA GPUs but torch.cuda.is_available() is False: "
                           f"{reason}. On CPU use configs/strategies/ddp_cpu.yaml")


def check_devices(accelerator: Any, devices: Any, num_nodes: Any, strategy: Any) -> None:
    """Raise a ``ValueError`` for a device count that cannot run: more CPU processes than this machine
    has cores, or FSDP2 (``ModelParallelStrategy``) on a single device, which has nothing to shard over."""
    count = int(devices) if isinstance(devices, (int, str)) and str(devices).isdigit() and int(devices) > 0 else None
    if _accelerator_name(accelerator) == "cpu" and count is not None and count > (os.cpu_count() or 1):
        raise ValueError(f"trainer.devices={count} CPU processes, but this machine has {os.cpu_count()} cores: "
                         f"set trainer.devices to at most {os.cpu_count()}")
    if "modelparallel" in _strategy_name(strategy) and count == 1 and (num_nodes or 1) == 1:
        raise ValueError("ModelParallelStrategy (FSDP2) shards the model over several devices, but trainer.devices=1: "
                         "set trainer.devices >= 2, or drop the strategy to train on one device")


def check_trainer_values(trainer: Mapping) -> None:
    """``max_steps`` -1 or >= 1, ``max_epochs`` null, -1 or >= 1, integer ``devices`` -1 or >= 1: a phase
    that trains no step gives an empty expert set hours later, not an error."""
    max_steps = trainer.get("max_steps", -1)
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ValueError(f"trainer.max_steps must be >= 1 (or -1: bounded by epochs), got {max_steps}")
    max_epochs = trainer.get("max_epochs")
    if max_epochs is not None and max_epochs != -1 and max_epochs < 1:
        raise ValueError(f"trainer.max_epochs must be >= 1, -1 or null, got {max_epochs}")
    devices = trainer.get("devices", "auto")
    count = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()) \
        else None
    if count is not None and count != -1 and count < 1:
        raise ValueError(f"trainer.devices must be >= 1 (or -1: every device, or 'auto'), got {devices!r}")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors): forwards then all-gather."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def forwards_in_lockstep(model: nn.Module) -> bool:
    """Whether every rank must run the same sequence of forward calls: FSDP2 shards all-gather in
    every forward, so a rank that skips one leaves the others waiting."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and is_sharded(model)


def shard_with_fsdp2(model: nn.Module, device_mesh) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every decoder layer, then to the whole model (in place).

    Called from ``configure_model`` under ``ModelParallelStrategy``; sharding is over the mesh's
    ``data_parallel`` dimension. Unlike FSDP1 under Lightning, FSDP2 has no root forward wrapping
    ``training_step``, so GRPO's manual backward and the full-weight gathers work.
    """
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    layers = tuple(decoder_layer_classes(model))
    for module in model.modules():
        if isinstance(module, layers):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
