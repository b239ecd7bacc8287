"""Running a causal LM on (prompt, completion) batches: the batch layout and the forwards built on it.

Batches use the generation layout ``[left-padded prompt | right-padded completion]`` so that the
completion occupies the same columns in every row: positions restart at each row's first real
token, the head runs on the completion columns only, each distinct prompt can be run once with its
KV cache shared by its completions (``shared_prompt_logits``), and the head can be lifted out of the
forward so that log-probs are computed from hidden states chunk by chunk (``head_returns_hidden_states``).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

# config fields of models whose forward transforms the head's output (Gemma 2, Cohere, Granite)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class PolicyBatch:
    """Token ids of (prompt, completion) pairs in generation layout."""

    input_ids: Tensor  # [N, P + C]
    attention_mask: Tensor  # [N, P + C]
    completion_mask: Tensor  # [N, C]  1 on real completion tokens (including EOS)
    prompt_length: int  # P

    def select(self, rows) -> "PolicyBatch":
        """The rows ``rows`` (indices), keeping the layout (columns are not trimmed)."""
        rows = torch.as_tensor(rows, device=self.input_ids.device)
        return PolicyBatch(self.input_ids[rows], self.attention_mask[rows], self.completion_mask[rows],
                           self.prompt_length)

    def to(self, device) -> "PolicyBatch":
        return PolicyBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           self.completion_mask.to(device), self.prompt_length)

    def lengths(self) -> tuple[list[int], list[int]]:
        """(prompt tokens, completion tokens) of each row."""
        prompt, completion = self.attention_mask[:, :self.prompt_length], self.attention_mask[:, self.prompt_length:]
        return prompt.sum(1).tolist(), completion.sum(1).tolist()

    def trimmed(self) -> "PolicyBatch":
        """The same rows without the columns that are padding in every row (the prompt's left, the
        completion's right); positions count from each row's first real token, so they are unchanged."""
        prompt_lengths, completion_lengths = self.lengths()
        cut = self.prompt_length - max(prompt_lengths, default=0)
        keep = self.prompt_length + max(completion_lengths, default=0)
        return PolicyBatch(self.input_ids[:, cut:keep], self.attention_mask[:, cut:keep],
                           self.completion_mask[:, :keep - self.prompt_length], self.prompt_length - cut)


def widen(values: Optional[Tensor], width: int) -> Optional[Tensor]:
    """Per-completion-token ``values`` [N, C'] padded with zeros on the right to [N, width]."""
    if values is None or values.shape[-1] == width:
        return values
    return torch.nn.functional.pad(values, (0, width - values.shape[-1]))


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Token rows padded to one width on ``side`` (``left`` or ``right``): (ids, attention mask)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, columns] = torch.as_tensor(row)
            mask[i, columns] = 1
    return ids, mask


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions of left-padded rows: 0 at each row's first real token (padding clamped to 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def shared_prefix_cache(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, force: bool = False):
    """Run each distinct row of a left-padded ``input_ids`` once with the KV cache on, then gather the
    cache to every row (differentiably, so gradients from all rows reach the one pass).

    Returns ``(output, cache, inverse)``, ``output`` holding the last position's logits of the
    distinct rows and ``inverse`` mapping rows to them; None when no row repeats (unless ``force``:
    sharded ranks must all take the same path) or the model keeps no cache (gradient checkpointing).
    """
    width = input_ids.shape[1]
    if width == 0:
        return None
    rows = torch.cat([input_ids, attention_mask], 1)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if distinct.shape[0] == rows.shape[0] and not force:
        return None
    ids, mask = distinct[:, :width], distinct[:, width:]
    output = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                   use_cache=True, logits_to_keep=1)
    cache = next((value for key, value in output.items() if key in ("cache", "past_key_values")), None)
    if cache is None:
        return None
    cache.batch_select_indices(inverse)
    return output, cache, inverse


def shared_prompt_logits(model: nn.Module, batch: PolicyBatch, force: bool = False) -> Optional[Tensor]:
    """Completion logits [N, C, V] with each distinct prompt of the batch run through the model once
    (final hidden states [N, C, H] inside ``head_returns_hidden_states``).

    GRPO batches hold G completions per prompt: the prompts' keys and values are computed once per
    distinct prompt and the completions run on top of that cache. The logits equal those of a full
    forward of every row up to float rounding; the prompt tokens cost 1/G. None when no prompt
    repeats (unless ``force``) or the model keeps no cache.
    """
    length = batch.prompt_length
    shared = shared_prefix_cache(model, batch.input_ids[:, :length], batch.attention_mask[:, :length], force)
    if shared is None:
        return None
    prompt_output, cache, inverse = shared
    positions = position_ids(batch.attention_mask)[:, length:]
    rest = model(input_ids=batch.input_ids[:, length:], attention_mask=batch.attention_mask, position_ids=positions,
                 use_cache=True, logits_to_keep=batch.completion_mask.shape[1], **{cache_argument(model): cache})
    # the prompt's last position predicts the first completion token, completion position t token t + 1
    return torch.cat([prompt_output.logits[inverse], rest.logits[:, :-1]], dim=1)


# attention implementations that build their mask with transformers' masking utilities (or run varlen
# kernels), which keep sequences apart by position ids restarting at 0 when no attention mask is given
PACKING_ATTENTION = (None, "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_packing(packing: bool, attn_implementation: Optional[str], trust_remote_code: bool) -> None:
    """``ValueError`` naming ``policy.packing`` when the attention cannot keep packed sequences apart."""
    if not packing:
        return
    if attn_implementation not in PACKING_ATTENTION:
        raise ValueError(f"policy.packing needs an attention implementation that keeps packed sequences apart by "
                         f"their position ids ({', '.join(map(str, PACKING_ATTENTION[1:]))}, or the default); "
                         f"policy.attn_implementation={attn_implementation!r} cannot. Set policy.packing: false "
                         "or one of those")
    import transformers

    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        raise ValueError(f"policy.packing needs transformers' packed-sequence masks (transformers >= 4.54); this is "
                         f"transformers {transformers.__version__}, whose attention would cross the sequences. "
                         "Upgrade transformers or set policy.packing: false") from None
    if trust_remote_code:
        raise ValueError("policy.packing with policy.trust_remote_code: a model's own attention code may not keep "
                         "packed sequences apart (only transformers' masking utilities are known to); set "
                         "policy.packing: false")


def packed_completion_outputs(model: nn.Module, batch: PolicyBatch) -> Tensor:
    """Completion logits [N, C, V] (hidden states [N, C, H] inside ``head_returns_hidden_states``) from one
    forward of every row's real tokens packed into one row: positions restart at 0 for each sequence and no
    attention mask is given, so transformers masks attention to the sequence's own tokens (equal to the
    padded forward's up to float rounding, at the cost of the real tokens only). Padding columns get the
    outputs of some real token (masked by the caller)."""
    real = batch.attention_mask.bool()  # [N, P + C]
    flat = real.flatten().cumsum(0).view(real.shape) - 1  # [N, P + C] each real cell's place in the packed row
    outputs = model(input_ids=batch.input_ids[real][None], position_ids=position_ids(batch.attention_mask)[real][None],
                    attention_mask=None, use_cache=False).logits[0]  # [T, V]
    # completion column t is predicted by the output at the column before it (the prompt's last for t = 0)
    width = batch.completion_mask.shape[1]
    before = flat[:, batch.prompt_length - 1:batch.prompt_length - 1 + width].clamp(min=0)  # [N, C]
    return outputs[before]


@contextmanager
def head_returns_hidden_states(model: nn.Module) -> Iterator[Optional[nn.Module]]:
    """Within, ``model(...).logits`` are the final hidden states: the LM head is swapped for an identity.
    Yields the head, or None (nothing swapped) for a model without one or whose forward transforms the
    head's output (soft-capping, scaling: ``LOGIT_TRANSFORMS``): only the full logits are exact there.

    The whole model still runs, so FSDP's root pre-forward gathers the root unit (embeddings, final
    norm, head) as in any forward, and the root (FSDP1 and FSDP2) keeps it gathered until its
    backward: the head the chunks use is the full weight. peft's wrapper is looked through (the head
    is not adapted by ``all-linear``; an adapted head is a module the chunks call as it is).
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings()  # through wrappers: FSDP1's forwards attributes it lacks
    transformed = any(getattr(causal_lm.config, field, None) not in (None, 1, 1.0) for field in LOGIT_TRANSFORMS)
    if head is None or transformed:
        yield None
        return
    parent, name = next((module, name) for module in causal_lm.modules()
                        for name, child in module.named_children() if child is head)
    setattr(parent, name, nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, name, head)
