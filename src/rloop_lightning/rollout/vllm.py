"""Rollouts with vLLM colocated with the trainer on the same GPU (``vllm>=0.8.5,<0.12``).

Each training process (DDP/FSDP rank) owns one ``vllm.LLM`` with tensor parallelism 1 on its own
GPU, fed the policy's prompt token ids (the trainer's chat template, no second tokenisation).
Weights flow trainer -> vLLM in ``sync_weights``:

- full fine-tuning: ``model.load_weights(named_tensors)`` on vLLM's model, reached through
  ``LLM.apply_model`` (vLLM >= 0.9) or ``llm_engine.model_executor.driver_worker.model_runner.model``
  (0.8.x). Both run in this process: the engine sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and, when
  ``torch.distributed`` has several ranks, ``distributed_executor_backend="external_launcher"``.
  Sharded models are gathered piece by piece (``full_weight_chunks``: FSDP2 DTensors, FSDP1 units),
  so at most one unit or parameter is unsharded at a time.
  vLLM's prefix cache is reset after every sync (cached prompt KV belongs to the old weights).
- LoRA/QLoRA: the adapter is saved to a temporary directory and later rollouts pass a
  ``LoRARequest`` with a fresh id, so vLLM reloads it; the base stays vLLM's own (bf16) copy.

vLLM's sampler log-probs are not the trainer's (other kernels and precision; under QLoRA another
base), so ``needs_importance_correction`` is True: see ``algorithms.importance``. vLLM V1 reports
*raw* log-probs (before temperature / top-p), the same quantity ``Policy.completion_logprobs``
computes; the Hugging Face engine reports processed ones.
Sleep mode (``enable_sleep_mode``) frees the GPU for training between rollouts: ``sleep(level=1)``
offloads weights to CPU and drops the KV cache, ``wake()`` restores them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from rloop_lightning.policy import Policy
from rloop_lightning.rollout.base import RolloutEngine, Rollouts, SamplingParams

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'rloop-lightning[vllm]'"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # ranks vLLM's LoRA kernels accept
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def import_vllm():
    """The ``vllm`` module, or an ``ImportError`` saying how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"VLLMEngine needs vLLM (and a CUDA GPU): {INSTALL_HINT}") from error
    return vllm


def require_cuda() -> None:
    if torch.cuda.is_available():
        return
    reason = ("this torch is a CPU-only build" if torch.version.cuda is None
              else "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)")
    raise RuntimeError(f"VLLMEngine needs a CUDA GPU but torch.cuda.is_available() is False: {reason}. "
                       "On CPU use rloop_lightning.rollout.hf.HFGenerateEngine (the default engine).")


def clean_parameter_name(name: str) -> str:
    """A parameter name as the unwrapped Hugging Face model spells it (no FSDP/checkpoint wrappers)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_weight_chunks(model: nn.Module) -> Iterator[list[tuple[str, Tensor]]]:
    """The model's full (unsharded) parameters in chunks that may be loaded one after another.

    - no sharding: one chunk of every parameter;
    - FSDP2 (``fully_shard``, DTensor parameters): one chunk per parameter, gathered with
      ``full_tensor()`` (a collective: every rank syncs, in the same order);
    - FSDP1 units: one chunk per unit, gathered with ``summon_full_params(recurse=False)``, outermost
      unit first. FSDP1 allows this only outside forward/backward, after the first forward (before
      it FSDP has no root yet) and not after a backward run *inside* the root's forward, as manual
      optimisation under Lightning's ``FSDPStrategy`` does (FSDP then raises an AssertionError).
    A chunk is valid only until the next is requested.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    parameters = list(model.named_parameters())
    if any(isinstance(parameter, DTensor) for _, parameter in parameters):
        for name, parameter in parameters:
            tensor = parameter.detach()
            yield [(clean_parameter_name(name), tensor.full_tensor() if isinstance(tensor, DTensor) else tensor)]
        return

    if not any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        yield [(clean_parameter_name(name), parameter.detach()) for name, parameter in parameters]
        return
    if not isinstance(model, FullyShardedDataParallel):
        raise TypeError(
            "under FSDP the policy's model must be an FSDP unit itself, or its embeddings and LM head stay "
            "out of reach of the weight sync: add its causal-LM class to auto_wrap_policy "
            "(rloop_lightning.strategies.fsdp_wrap_classes; configs/strategies/fsdp.yaml does)")
    if getattr(model, "_is_root", None) is None:
        log.warning("FSDP has not run a forward pass yet: weight sync skipped (vLLM keeps the checkpoint's "
                    "weights, which differ from the policy's only in a resumed run)")
        return

    def visit(module: nn.Module, prefix: str) -> Iterator[list[tuple[str, Tensor]]]:
        if isinstance(module, FullyShardedDataParallel):
            nested = tuple(clean_parameter_name(name) + "." for name, sub in module.named_modules()
                           if sub is not module and isinstance(sub, FullyShardedDataParallel))
            with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
                yield [(clean_parameter_name(prefix + name), parameter.detach())
                       for name, parameter in module.named_parameters()
                       if not clean_parameter_name(name).startswith(nested)]  # nested units: their own chunk
        for child_name, child in module.named_children():
            yield from visit(child, f"{prefix}{child_name}.")

    yield from visit(model, "")


class VLLMEngine(RolloutEngine):
    """Colocated vLLM sampling with in-place weight sync and optional sleep mode.

    Args:
        gpu_memory_utilization: share of GPU memory vLLM may take for weights + KV cache (the
            trainer shares the GPU: 0.3-0.5 is typical colocated).
        enable_sleep_mode: release vLLM's memory between rollouts (``sleep``/``wake``).
        sleep_level: 1 offloads weights to CPU and drops the KV cache; 2 drops both (weights
            must then be synced before sampling again).
        max_model_len: context length vLLM plans its KV cache for; default the model's.
        max_lora_rank: for LoRA policies; default the adapter's rank rounded up to a vLLM rank.
        dtype: vLLM's weight dtype; default the policy's ``dtype``.
        seed: sampling seed; rank ``r`` uses ``seed + r``.
        llm_kwargs: any other ``vllm.LLM`` argument (``enforce_eager``, ``quantization``,
            ``logprobs_mode``, ``max_num_seqs``, ...).
    """

    needs_importance_correction = True

    def __init__(self, gpu_memory_utilization: float = 0.4, enable_sleep_mode: bool = True, sleep_level: int = 1,
                 max_model_len: int | None = None, max_lora_rank: int | None = None,
                 dtype: str | None = None, seed: int = 0, llm_kwargs: dict[str, Any] | None = None):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        import_vllm()  # fail at configuration time, before any weights load
        require_cuda()
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.seed = seed
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm = None
        self.asleep = False
        self.lora_request = None
        self.num_syncs = 0
        self._next_lora_id = 1
        self._lora_directory: str | None = None
        self._weights_discarded = False  # level-2 sleep drops the weights: sync before sampling

    # ------------------------------------------------------------------ set-up
    def build(self, policy: Policy):
        """Start vLLM on the policy's base weights (idempotent)."""
        if self.llm is not None:
            return self.llm
        vllm = import_vllm()
        require_cuda()
        policy.require_model()
        if policy.is_peft and self.sleep_level == 2:
            raise ValueError("sleep_level=2 discards vLLM's base weights, which a LoRA policy never re-sends; "
                             "use sleep_level=1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: direct weight access
        rank, world_size = _distributed_rank()
        kwargs: dict[str, Any] = {
            "model": _base_model_source(policy), "revision": policy.revision,
            "trust_remote_code": policy.trust_remote_code, "dtype": self.dtype or policy.dtype_name,
            "seed": self.seed + rank, "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_sleep_mode": self.enable_sleep_mode, "enable_lora": policy.is_peft,
        }
        if policy.is_peft:
            kwargs["max_lora_rank"] = self.max_lora_rank or _vllm_lora_rank(policy)
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if world_size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(self.llm_kwargs)
        log.info("starting vLLM on %s (rank %d of %d)", kwargs["model"], rank, world_size)
        self.llm = vllm.LLM(**kwargs)
        return self.llm

    # ------------------------------------------------------------------ sampling
    def generate(self, policy: Policy, prompts: list[str], num_samples: int,
                 sampling: SamplingParams) -> Rollouts:
        llm = self.build(policy)
        self.wake()
        if self._weights_discarded or (policy.is_peft and self.lora_request is None):
            self.sync_weights(policy)  # vLLM starts without the adapter; level-2 sleep dropped the weights
        prompt_ids = policy.encode_prompts(prompts)
        self.check_prompt_lengths(policy, prompt_ids, sampling, self.max_model_len or policy.context_length)
        outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids],
                               self.sampling_params(policy, num_samples, sampling),
                               lora_request=self.lora_request, use_tqdm=False)
        if self.enable_sleep_mode:
            self.sleep()
        return self.to_rollouts(policy, prompt_ids, outputs, num_samples)

    def sampling_params(self, policy: Policy, num_samples: int, sampling: SamplingParams):
        vllm = import_vllm()
        return vllm.SamplingParams(
            n=num_samples, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_new_tokens,
            logprobs=0,  # 0 extra candidates: just the sampled token's log-prob
            stop_token_ids=[policy.tokenizer.eos_token_id],
        )

    @staticmethod
    def to_rollouts(policy: Policy, prompt_ids: list[list[int]], outputs, num_samples: int) -> Rollouts:
        result = Rollouts([], [], [], [], [], [])
        for index, request in enumerate(outputs):
            if len(request.outputs) != num_samples:
                raise RuntimeError(f"vLLM returned {len(request.outputs)} completions for prompt {index}, "
                                   f"expected {num_samples}")
            for completion in request.outputs:
                token_ids = list(completion.token_ids)
                if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
                    raise RuntimeError("vLLM returned no per-token log-probs; SamplingParams needs logprobs=0")
                result.prompt_index.append(index)
                result.prompt_ids.append(list(prompt_ids[index]))
                result.completion_ids.append(token_ids)
                result.completions.append(policy.decode(token_ids))  # same text as the HF engine
                result.sampler_logprobs.append(
                    [float(position[token].logprob) for position, token in zip(completion.logprobs, token_ids)])
                result.truncated.append(completion.finish_reason == "length")
        return result

    # ------------------------------------------------------------------ weights
    def sync_weights(self, policy: Policy) -> None:
        """Copy the policy's current weights (or LoRA adapter) into vLLM; starts vLLM if needed.

        Call it outside the training forward pass (FSDP gathers parameters here), once per
        rollout batch after its optimizer steps, and once before the first rollout of a resumed run.
        """
        llm = self.build(policy)
        self.wake()
        if policy.is_peft:
            self._sync_adapter(policy)
        else:
            for chunk in full_weight_chunks(policy.require_model()):
                self._load_weights(llm, chunk)
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()
        self._weights_discarded = False
        self.num_syncs += 1

    @staticmethod
    def _load_weights(llm, weights: list[tuple[str, Tensor]]) -> None:
        if not weights:
            return
        if hasattr(llm, "apply_model"):  # vLLM >= 0.9; in-process executor, so nothing is pickled
            llm.apply_model(lambda model: model.load_weights(weights))
        else:  # vLLM 0.8.x
            llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)

    def _sync_adapter(self, policy: Policy) -> None:
        from vllm.lora.request import LoRARequest

        directory = tempfile.mkdtemp(prefix="rloop-vllm-lora-")
        policy.require_model().save_pretrained(directory)
        previous, previous_directory = self.lora_request, self._lora_directory
        self.lora_request = LoRARequest(lora_name=f"policy-{self._next_lora_id}", lora_int_id=self._next_lora_id,
                                        lora_path=directory)
        self._lora_directory = directory
        self._next_lora_id += 1
        if previous is not None:
            engine = getattr(self.llm, "llm_engine", None)
            if engine is not None and hasattr(engine, "remove_lora"):
                engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous_directory, ignore_errors=True)

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Release vLLM's GPU memory (weights to CPU at level 1, KV cache dropped) for training."""
        if self.llm is not None and self.enable_sleep_mode and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True
            self._weights_discarded = self.sleep_level == 2

    def wake(self) -> None:
        """Restore vLLM's weights and KV cache, after returning the trainer's cached free blocks."""
        if self.llm is not None and self.asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # PyTorch's allocator keeps freed activations reserved otherwise
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Drop vLLM and the temporary adapter directory."""
        self.llm = None
        self.lora_request = None
        if self._lora_directory:
            shutil.rmtree(self._lora_directory, ignore_errors=True)
            self._lora_directory = None


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _base_model_source(policy: Policy) -> str:
    """What vLLM loads: the policy's checkpoint, or for an adapter directory the adapter's base."""
    adapter = policy._adapter_config()
    return policy._resolve_source(adapter["base_model_name_or_path"]) if adapter else policy.source


def _vllm_lora_rank(policy: Policy) -> int:
    rank = policy.require_model().peft_config["default"].r
    for supported in LORA_RANKS:
        if rank <= supported:
            return supported
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest supported rank {LORA_RANKS[-1]}")
