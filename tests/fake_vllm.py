"""A CPU stand-in for the part of vLLM that ``VLLMEngine`` uses, sampling from a real HF model.

``install(monkeypatch)`` puts it in ``sys.modules`` as ``vllm`` (with ``vllm.lora.request``). The
fake ``LLM`` loads the checkpoint with ``transformers``, samples with ``generate`` and reports raw
log-probs (before temperature, as vLLM V1 does), so tests can compare them with
``Policy.completion_logprobs``. It records every call tests want to assert on.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    logprobs: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class WorkerModel:
    """vLLM's model object: ``load_weights(iterable of (name, tensor))`` copies by HF name."""

    def __init__(self, hf_model: torch.nn.Module):
        self.hf_model = hf_model
        self.num_loads = 0

    @torch.no_grad()
    def load_weights(self, weights) -> set[str]:
        parameters = dict(self.hf_model.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in parameters:
                raise KeyError(f"fake vLLM model has no parameter {name!r}")
            parameters[name].copy_(tensor)
            loaded.add(name)
        self.num_loads += 1
        return loaded


class LLM:
    instances: ClassVar[list[LLM]] = []  # every LLM constructed (tests reset it)

    def __init__(self, model: str, gpu_memory_utilization: float = 0.9, enable_sleep_mode: bool = False,
                 enable_lora: bool = False, max_lora_rank: int = 16, dtype: str = "auto", seed: int = 0,
                 **kwargs: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kwargs = dict(model=model, gpu_memory_utilization=gpu_memory_utilization,
                           enable_sleep_mode=enable_sleep_mode, enable_lora=enable_lora,
                           max_lora_rank=max_lora_rank, dtype=dtype, seed=seed, **kwargs)
        self.hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.worker_model = WorkerModel(self.hf_model)
        runner = types.SimpleNamespace(model=self.worker_model)
        executor = types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        self.llm_engine = types.SimpleNamespace(model_executor=executor, remove_lora=self._remove_lora)
        self.seed = seed
        self.asleep = False
        self.sleep_levels: list[int] = []
        self.wake_calls = 0
        self.prefix_cache_resets = 0
        self.removed_loras: list[int] = []
        self.generate_calls: list[dict] = []
        self._adapters: dict[int, torch.nn.Module] = {}
        LLM.instances.append(self)

    # -- the API VLLMEngine uses
    def apply_model(self, func):
        return [func(self.worker_model)]

    def sleep(self, level: int = 1) -> None:
        assert not self.asleep, "sleep() while asleep"
        self.asleep = True
        self.sleep_levels.append(level)

    def wake_up(self) -> None:
        self.asleep = False
        self.wake_calls += 1

    def reset_prefix_cache(self) -> bool:
        self.prefix_cache_resets += 1
        return True

    def _remove_lora(self, lora_id: int) -> bool:
        self.removed_loras.append(lora_id)
        self._adapters.pop(lora_id, None)
        return True

    @torch.no_grad()
    def generate(self, prompts, sampling_params: SamplingParams, lora_request: LoRARequest | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        assert not self.asleep, "generate() while asleep"
        assert sampling_params.logprobs == 0, "the engine must ask for the sampled token's log-prob"
        if lora_request is not None and not self.kwargs["enable_lora"]:
            raise ValueError("LoRA request on an LLM built without enable_lora")
        self.generate_calls.append({"num_prompts": len(prompts), "params": sampling_params,
                                    "lora_request": lora_request})
        model = self._model_for(lora_request)
        torch.manual_seed(self.seed + len(self.generate_calls))
        return [self._sample(model, prompt["prompt_token_ids"], sampling_params) for prompt in prompts]

    # -- internals
    def _model_for(self, lora_request: LoRARequest | None) -> torch.nn.Module:
        if lora_request is None:
            return self.hf_model
        if lora_request.lora_int_id not in self._adapters:
            from peft import PeftModel

            self._adapters[lora_request.lora_int_id] = PeftModel.from_pretrained(
                copy.deepcopy(self.hf_model), lora_request.lora_path).eval()
        return self._adapters[lora_request.lora_int_id]

    def _sample(self, model, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
        stop = set(params.stop_token_ids) | {self.tokenizer.eos_token_id}
        greedy = params.temperature == 0
        input_ids = torch.tensor([prompt_ids] * params.n)
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=params.max_tokens,
            do_sample=not greedy, temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p, top_k=None if greedy or params.top_k < 0 else params.top_k,
            eos_token_id=sorted(stop), pad_token_id=self.tokenizer.pad_token_id,
            output_logits=True, return_dict_in_generate=True,
        )
        generated = output.sequences[:, input_ids.shape[1]:]  # [n, T]
        raw = torch.log_softmax(torch.stack(output.logits, 1).float(), -1)  # [n, T, V] before temperature
        completions = []
        for row in range(params.n):
            ids = generated[row].tolist()
            end = next((i + 1 for i, token in enumerate(ids) if token in stop), None)
            ids = ids[:end] if end else ids
            logprobs = [{token: Logprob(float(raw[row, i, token]), rank=1)} for i, token in enumerate(ids)]
            completions.append(CompletionOutput(
                index=row, text=self.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                logprobs=logprobs, finish_reason="stop" if end else "length"))
        return RequestOutput(prompt_token_ids=list(prompt_ids), outputs=completions)


def build_module() -> types.ModuleType:
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    vllm.__version__ = "0.0.0-fake"
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    lora.request = request
    vllm.lora = lora
    return vllm


def install(monkeypatch) -> types.ModuleType:
    """Make ``import vllm`` (and ``from vllm.lora.request import LoRARequest``) return the fake."""
    vllm = build_module()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", vllm.lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", vllm.lora.request)
    LLM.instances.clear()
    return vllm
