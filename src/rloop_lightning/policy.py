"""The policy wrapper shared by every phase: a Hugging Face causal LM, its tokenizer, optional LoRA/QLoRA.

It owns the three things every phase needs and should not re-implement:
- turning a problem's prompt into model input (chat template when the tokenizer has one, a plain
  template otherwise) and (prompt, completion) pairs into a padded batch;
- per-token log-probs and entropy of completion tokens, the LM head applied ``logprob_chunk_size``
  tokens at a time (``algorithms.chunked_logprobs``) so no [batch, tokens, vocabulary] logits exist;
- the reference policy, the weights the phase started from: under LoRA the base with adapters
  disabled, or, when the policy was loaded from an adapter directory (theta_k of an RLoop
  iteration), a frozen copy of that adapter; under full fine-tuning a frozen copy made on first use.

Batches use the generation layout ``[left-padded prompt | right-padded completion]``; the batch and
the forwards on it (shared prompt prefill, the head lifted out for chunked log-probs) are in
``forwards``.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from rloop_lightning import tiny
from rloop_lightning.algorithms.chunked_logprobs import chosen_token_logprobs, logprobs_from_logits
from rloop_lightning.algorithms.truncation import TopKTies
from rloop_lightning.forwards import (PolicyBatch, check_packing, head_returns_hidden_states, pad,
                                     packed_completion_outputs, position_ids, shared_prompt_logits)
from rloop_lightning.strategies import forwards_in_lockstep

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16", "auto"]
REFERENCE_ADAPTER = "reference"  # the frozen copy of the adapter a policy was loaded from


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft ``LoraConfig`` fields)."""

    r: int = 16
    """Rank of the adapter matrices."""
    alpha: int = 32
    """Scaling: the adapter's update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input; RFT only (GRPO turns every dropout off)."""
    target_modules: str | list[str] = "all-linear"
    """Module names (or ``all-linear``) that get an adapter."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""


def keep_trainable_4bit_layout(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its AVX512-BF16 CPU inference kernel.

    bitsandbytes >= 0.48 repacks a ``Linear4bit`` weight on its first eval-mode, no-grad forward on
    CPU (e.g. a rollout) and never unpacks it; that kernel has no backward, so every later training
    step silently gets wrong LoRA gradients below the top layer. One layout serves both.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def disable_dropout(model: nn.Module) -> list[str]:
    """Turn every dropout of ``model`` off for good, in train mode too: ``nn.Dropout`` modules (LoRA's
    ``lora_dropout`` among them) get p = 0, and attention modules that read their dropout from an
    ``attention_dropout`` attribute (the Hugging Face decoders) get 0. Returns the names of those that were on.
    Unlike ``model.eval()`` this leaves the training mode alone (gradient checkpointing keys on it)."""
    disabled = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            disabled.append(name)
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            module.attention_dropout = 0.0
            disabled.append(f"{name}.attention_dropout")
    return disabled


@contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run a peft model through adapter ``name``, then switch back; which parameters train is unchanged
    (peft's ``set_adapter`` also toggles ``requires_grad``, so the flags are put back as they were)."""
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    previous = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)


def chat_turn_end_id(tokenizer) -> Optional[int]:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``), or None."""
    sentinel = "RLOOP-TURN-END-PROBE"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": sentinel}], tokenize=False)
    except Exception:  # a template that refuses this conversation: no turn end to add
        return None
    if sentinel not in text:
        return None
    ids = tokenizer(text[text.rindex(sentinel) + len(sentinel):], add_special_tokens=False)["input_ids"]
    added = tokenizer.added_tokens_decoder.get(ids[0]) if ids else None
    return ids[0] if added is not None and added.special else None


def generation_config_end_ids(source: str, policy: "Policy") -> list[int]:
    """``eos_token_id`` of the ``generation_config.json`` at ``source`` (an int or a list), [] without one."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(source, revision=policy.revision)
    except OSError:
        return []
    ids = config.eos_token_id
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


class Policy(nn.Module):
    """A causal LM + tokenizer from a hub id, a local directory or a built-in tiny model id.

    Args:
        model_name_or_path: hub id (``Qwen/Qwen2.5-Math-1.5B``), local directory in Hugging Face
            format (a full model or a peft adapter directory), or a built-in id (``rloop/tiny-llama``).
        revision: hub revision (branch, tag or commit).
        dtype: weight dtype; ``auto`` keeps the checkpoint's.
        lora: LoRA settings; ``None`` trains all weights.
        load_in_4bit: QLoRA: load the base in 4-bit nf4 via bitsandbytes (needs ``lora``).
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: run code shipped with a hub model. Off by default: it executes that code.
        use_chat_template: ``None`` uses the tokenizer's chat template when it has one.
        prompt_template: used when no chat template applies; ``{prompt}`` is the problem's prompt.
        system_prompt: optional system message for chat templates.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``flash_attention_2``, ...).
        logprob_chunk_size: completion tokens per application of the LM head when computing log-probs
            and entropy (training, old policy, KL reference); the backward recomputes each chunk's
            logits, so memory grows with this x vocabulary (~12 B each: 0.95 GB at 512 tokens and a
            152k vocabulary, ``benchmarks.update_memory``), not with batch x completion length x
            vocabulary (18 B each). ``None`` computes the full logits at once (the same numbers, up
            to float rounding).
        packing: run a batch's sequences packed into one row, no padding (``forwards.packed_completion_outputs``;
            instead of prompt sharing). Refused with an attention implementation not known to keep them apart.
    """

    def __init__(
        self,
        model_name_or_path: str = "rloop/tiny-llama",
        revision: Optional[str] = None,
        dtype: DType = "float32",
        lora: Optional[LoraSettings] = None,
        load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        use_chat_template: Optional[bool] = None,
        prompt_template: str = "{prompt}",
        system_prompt: Optional[str] = None,
        attn_implementation: Optional[str] = None,
        logprob_chunk_size: Optional[int] = 512,
        packing: bool = False,
    ):
        super().__init__()
        if logprob_chunk_size is not None and logprob_chunk_size <= 0:
            raise ValueError(f"policy.logprob_chunk_size must be a positive number of tokens (or null for the full "
                             f"logits at once), got {logprob_chunk_size}")
        check_packing(packing, attn_implementation, trust_remote_code)
        if load_in_4bit and lora is None:
            raise ValueError("load_in_4bit=True (QLoRA) needs `lora` settings: 4-bit weights cannot be trained")
        if "{prompt}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{prompt}}', got {prompt_template!r}")
        self.model_name_or_path = model_name_or_path
        self.revision = revision
        self.dtype_name = dtype
        self.lora = lora
        self.load_in_4bit = load_in_4bit
        self.gradient_checkpointing = gradient_checkpointing
        self.trust_remote_code = trust_remote_code
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.attn_implementation = attn_implementation
        self.logprob_chunk_size = logprob_chunk_size
        self.packing = packing
        self.source = self._resolve_source(model_name_or_path)
        self.tokenizer = self._load_tokenizer()
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError(f"use_chat_template=True but the tokenizer of {model_name_or_path!r} has none")
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self.model: Optional[nn.Module] = None
        self._reference: Optional[nn.Module] = None
        self._end_token_ids: Optional[list[int]] = None
        self.encode_prompts(["1 + 1 = ?"])  # a template that fails or renders nothing fails here, named
        self._check_special_tokens()

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _resolve_source(name: str) -> str:
        return str(tiny.materialize(name)) if tiny.is_builtin(name) else name

    def _adapter_config(self) -> Optional[dict]:
        path = Path(self.source) / "adapter_config.json"
        return json.loads(path.read_text()) if path.exists() else None

    def base_source(self) -> str:
        """The directory or hub id of the full model: the policy's own, or an adapter's base."""
        adapter = self._adapter_config()
        return self._resolve_source(adapter["base_model_name_or_path"]) if adapter else self.source

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            self.source, revision=self.revision, trust_remote_code=self.trust_remote_code
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {self.model_name_or_path!r} has no EOS token; completions cannot end")
        return tokenizer

    def _model_config(self):
        """The model's config (its own when loaded, else read from ``config.json``; no weights needed)."""
        if self.model is not None:
            return self.model.config
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.base_source(), revision=self.revision,
                                          trust_remote_code=self.trust_remote_code)

    @property
    def context_length(self) -> Optional[int]:
        """The model's maximum sequence length (from its config; no weights needed)."""
        return getattr(self._model_config(), "max_position_embeddings", None)

    def _check_special_tokens(self) -> None:
        """Refuse an EOS, padding or chat turn-end token whose id is past the model's embedding (a token
        ``tokenizer_config.json`` names but the vocabulary lacks gets the next free id): RFT would close
        every completion with it and fail in the embedding lookup, and generation could never emit it."""
        config = self._model_config()
        vocab_size = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                             "vocab_size", None)
        if vocab_size is None:
            return
        turn_end = chat_turn_end_id(self.tokenizer) if self.use_chat_template else None
        for role, token_id in (("eos_token", self.tokenizer.eos_token_id), ("pad_token", self.tokenizer.pad_token_id),
                               ("chat template's turn-end token", turn_end)):
            if token_id is not None and token_id >= vocab_size:
                raise ValueError(
                    f"the tokenizer of {self.model_name_or_path!r} has {role} "
                    f"{self.tokenizer.convert_ids_to_tokens(token_id)!r} with id {token_id}, but the model's "
                    f"embedding has {vocab_size} tokens (ids 0..{vocab_size - 1}): the model does not know this "
                    f"token. Set the {role} (tokenizer_config.json) to a token of the model's vocabulary")

    @property
    def torch_dtype(self):
        return "auto" if self.dtype_name == "auto" else getattr(torch, self.dtype_name)

    def load_model(self) -> nn.Module:
        """Load weights (idempotent). Called from ``LightningModule.configure_model``."""
        if self.model is not None:
            return self.model
        from transformers import AutoModelForCausalLM

        adapter = self._adapter_config()
        base_source = adapter["base_model_name_or_path"] if adapter else self.source
        kwargs = dict(dtype=self.torch_dtype, revision=self.revision, trust_remote_code=self.trust_remote_code)
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.load_in_4bit:
            kwargs["quantization_config"] = self._quantization_config()
        model = AutoModelForCausalLM.from_pretrained(self._resolve_source(base_source), **kwargs)
        if self.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.gradient_checkpointing
            )
            keep_trainable_4bit_layout(model)
        elif self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.source, is_trainable=True)
            # the weights loaded (theta_k = base + this adapter) are the KL reference: keep a frozen copy
            model.load_adapter(self.source, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        elif self.lora is not None:
            from peft import LoraConfig, get_peft_model

            settings = self.lora
            model = get_peft_model(model, LoraConfig(
                r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                target_modules=settings.target_modules, bias=settings.bias, task_type="CAUSAL_LM",
            ))
        if self.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode; the phases train it
        self.model = model
        return model

    def _quantization_config(self):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ImportError("load_in_4bit needs bitsandbytes: pip install 'rloop-lightning[qlora]'") from error
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if self.dtype_name in ("bfloat16", "auto") else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)

    @property
    def is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("policy weights are not loaded yet: call load_model() (configure_model does)")
        return self.model

    # ------------------------------------------------------------------ text
    def format_prompt(self, prompt: str) -> str:
        if not self.use_chat_template:
            return self.prompt_template.format(prompt=prompt)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:  # a syntax error, or the template's own raise_exception(...)
            raise ValueError(f"the chat template of {self.model_name_or_path!r} (the tokenizer's chat_template, in "
                             f"tokenizer_config.json or chat_template.jinja) fails on a prompt: "
                             f"{type(error).__name__}: {error}. Fix the template, or set "
                             "policy.use_chat_template: false to use policy.prompt_template") from None

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        texts = [self.format_prompt(p) for p in prompts]
        # chat templates already carry BOS/special tokens as text
        ids = self.tokenizer(texts, add_special_tokens=not self.use_chat_template)["input_ids"]
        empty = next((index for index, row in enumerate(ids) if not row), None)
        if empty is not None:
            source = ("the chat template (the tokenizer's chat_template)" if self.use_chat_template
                      else f"policy.prompt_template {self.prompt_template!r}")
            raise ValueError(f"{source} of {self.model_name_or_path!r} turns prompt {empty} "
                             f"({str(prompts[empty])[:60]!r}) into no tokens at all: a prompt must give the model "
                             "something to continue from")
        return ids

    def encode_completions(self, completions: Sequence[str]) -> list[list[int]]:
        """Token ids of completions, each closed by ``end_token_ids[0]`` (the chat turn's end under a template)."""
        ids = self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        return [row + [self.end_token_ids[0]] for row in ids]

    @property
    def end_token_ids(self) -> list[int]:
        """The tokens that end a completion, first the one a completion is closed with.

        First the chat template's turn end when prompts go through the template (Qwen: ``<|im_end|>``,
        which Qwen2.5-Math's tokenizer does not call EOS), else the tokenizer's EOS; then the
        tokenizer's EOS and every ``eos_token_id`` of the model's ``generation_config`` (Qwen2.5-Instruct
        names ``<|im_end|>`` and ``<|endoftext|>``). Rollout engines stop at any of them.
        """
        if self._end_token_ids is None:
            turn_end = chat_turn_end_id(self.tokenizer) if self.use_chat_template else None
            ids = [turn_end, self.tokenizer.eos_token_id, *generation_config_end_ids(self.base_source(), self)]
            self._end_token_ids = list(dict.fromkeys(i for i in ids if i is not None))
        return self._end_token_ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def make_batch(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> PolicyBatch:
        pad_id = self.tokenizer.pad_token_id
        prompt, prompt_mask = pad(prompt_ids, pad_id, side="left")
        completion, completion_mask = pad(completion_ids, pad_id, side="right")
        return PolicyBatch(torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1),
                           completion_mask, prompt.shape[1])

    def encode_pairs(self, prompts: Sequence[str], completions: Sequence[str], max_length: Optional[int] = None) -> PolicyBatch:
        """Tokenise (prompt, completion + EOS) pairs; ``max_length`` truncates completions, then prompts' left."""
        prompt_ids = self.encode_prompts(prompts)
        completion_ids = self.encode_completions(completions)
        if max_length is not None:
            for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
                if len(p) >= max_length:
                    raise ValueError(f"prompt {i} has {len(p)} tokens, not below max_length={max_length}")
                completion_ids[i] = c[: max_length - len(p)]
        return self.make_batch(prompt_ids, completion_ids)

    # ------------------------------------------------------------------ log-probs
    def completion_logprobs(self, batch: PolicyBatch, model: Optional[nn.Module] = None,
                            with_entropy: bool = False, temperature: float = 1.0,
                            share_prompts: bool = False, top_k: int = 0, top_p: float = 1.0,
                            top_k_ties: TopKTies = "keep") -> tuple[Tensor, Optional[Tensor]]:
        """Per-token log-probs [N, C] of the completion tokens (and entropy [N, C], no grad).

        ``temperature`` divides the logits and ``top_k``/``top_p`` truncate them
        (``algorithms.truncation``; ``top_k_ties``: the rule of the engine that sampled, ``RolloutEngine.top_k_ties``),
        so log-probs are those of the distribution that sampled the tokens (as the sampler reported them);
        temperature 0 (greedy) counts as 1. ``share_prompts``
        runs each distinct prompt once (see ``shared_prompt_logits``); the result is the same.
        The model returns hidden states and the head runs ``logprob_chunk_size`` tokens at a time
        (``chosen_token_logprobs``); every rank takes the same path, as it depends only on settings.
        """
        model = model if model is not None else self.require_model()
        # checkpointed training keeps no KV cache: nothing to share
        share_prompts = share_prompts and not (self.gradient_checkpointing and model.training)
        chunked = head_returns_hidden_states(model) if self.logprob_chunk_size is not None else nullcontext()
        with chunked as head:
            outputs = packed_completion_outputs(model, batch) if self.packing else None
            if outputs is None and share_prompts:
                outputs = shared_prompt_logits(model, batch, force=forwards_in_lockstep(model))
            if outputs is None:
                outputs = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=position_ids(batch.attention_mask),
                    logits_to_keep=batch.completion_mask.shape[1] + 1, use_cache=False,
                ).logits[:, :-1]
        targets = batch.input_ids[:, batch.prompt_length:]
        if head is None:  # [N, C, V] logits
            return logprobs_from_logits(outputs, targets, temperature, with_entropy, top_k, top_p, top_k_ties)
        return chosen_token_logprobs(outputs, head, targets, self.logprob_chunk_size, temperature, with_entropy,
                                     top_k, top_p, top_k_ties)

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The policy as loaded (the weights the phase started from), frozen.

        Under LoRA: the frozen copy of the loaded adapter when the policy came from an adapter
        directory (theta_k = base + adapter_k), else the base with adapters disabled; under full
        fine-tuning, a frozen copy made on first use. A frozen adapter rather than merging adapter_k
        into the base: merging into a 4-bit base would re-quantise it (the reference and the starting
        policy would no longer be theta_k), and the adapter trained on top would then belong to a
        merged base that exists nowhere on disk; the copy costs one adapter's memory.
        """
        model = self.require_model()
        if self.is_peft and REFERENCE_ADAPTER in model.peft_config:
            with active_adapter(model, REFERENCE_ADAPTER):
                yield model
            return
        if self.is_peft:
            with model.disable_adapter():
                yield model
            return
        if self._reference is None:
            log.info("creating a frozen reference copy of the policy (full fine-tuning with KL)")
            reference = copy.deepcopy(model).eval()
            reference.requires_grad_(False)
            object.__setattr__(self, "_reference", reference)  # not a submodule: never trained or saved
        yield self._reference

    @torch.no_grad()
    def reference_logprobs(self, batch: PolicyBatch, temperature: float = 1.0, share_prompts: bool = False) -> Tensor:
        with self.reference() as model:
            return self.completion_logprobs(batch, model=model, temperature=temperature, share_prompts=share_prompts)[0]

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | Path, merged: bool = False, state_dict: Optional[dict] = None) -> Path:
        """Save in Hugging Face format (safetensors): adapter-only under LoRA unless ``merged``.

        ``state_dict``: the model's full weights gathered from a sharded strategy (FSDP), used
        instead of this process's (sharded) parameters.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = self.require_model()
        if self.is_peft and merged:
            if state_dict is not None:
                raise ValueError("merged export from gathered FSDP weights is not supported; save the adapter")
            if self.load_in_4bit:
                raise ValueError("cannot merge LoRA into 4-bit weights; save the adapter (merged=False)")
            model = copy.deepcopy(model).merge_and_unload()
        saving = {"state_dict": state_dict} if state_dict is not None else {}
        if self.is_peft and not merged:
            model.peft_config["default"].base_model_name_or_path = self._base_reference()
            saving["selected_adapters"] = ["default"]  # not the frozen reference copy
        model.save_pretrained(directory, **saving)
        self.tokenizer.save_pretrained(directory)
        (directory / "rloop_policy.json").write_text(json.dumps(self.describe(), indent=2))
        return directory

    def _base_reference(self) -> str:
        adapter = self._adapter_config()
        return adapter["base_model_name_or_path"] if adapter else self.model_name_or_path

    def describe(self) -> dict:
        return {
            "model_name_or_path": self.model_name_or_path, "dtype": self.dtype_name,
            "lora": asdict(self.lora) if self.lora else None, "load_in_4bit": self.load_in_4bit,
            "prompt_template": self.prompt_template, "use_chat_template": self.use_chat_template,
        }
