"""Top-k / top-p truncation of logits: the distribution a sampler with ``top_k > 0`` or ``top_p < 1`` draws from.

With truncation the sampler draws token x from

    q(x) = softmax(z / T)[x] / Z_kept  if x is kept, else 0,
    kept = the top_k largest logits, then the smallest set of those whose probabilities reach top_p,

and both engines report log q(x) (the Hugging Face warpers; vLLM's ``processed_logprobs``). The
trainer scores the same q (``Policy.completion_logprobs(top_k=..., top_p=...)``), so the policy the
objective talks about is the one that samples, and importance ratios compare like with like.

The rules are those of ``transformers``' ``TopKLogitsWarper`` then ``TopPLogitsWarper`` and of vLLM's
``apply_top_k_top_p``: top-p sorts ascending and drops the tokens whose cumulative probability is
<= 1 - top_p, always keeping the most likely one. Top-k has two rules for the tokens tied with the
k-th largest logit (``TopKTies``), and the engine that sampled says which (``RolloutEngine.top_k_ties``):

* ``keep``: every tied token is kept (so more than k tokens): transformers, and vLLM's PyTorch path
  (CPU);
* ``exact``: exactly k are kept: vLLM's Triton top-k/top-p kernel (CUDA), which counts the boundary
  value's duplicates and keeps only as many as fill k (the first in vocabulary order; the trainer
  keeps those ``torch.topk`` picks).

Ties are common with bf16 logits (8 bits of mantissa); with the wrong rule the trainer's normaliser
Z_kept would hold the mass of tied tokens the sampler never had. Which of the tied tokens are kept
does not change Z_kept (they have one logit), only that the sampled token is among them: the token
scored (``keep``) takes the place of a kept tie-mate when the rule would drop it, so the kept set has
the sampler's size and the sampler's mass. The same exchange applies at the top-p boundary.

GRPO scores the policy's current and old log-probs this way; the KL reference is scored without
truncation (temperature only): a reference whose own top-p set missed a sampled token would give an
infinite penalty.

Departure: ``keep`` (the scored tokens) is never dropped. A token the sampler drew is inside its
kept set by construction; the trainer's logits differ from the sampler's by kernel rounding (and,
after an update, by the update), which can move a boundary token out of the set: its log-prob
would be -inf and every ratio with it NaN. Kept (with no tie-mate to give way), it gets its share
of the renormalised mass.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

TopKTies = Literal["keep", "exact"]


def _exact_top_k_removed(logits: Tensor, top_k_indices: Tensor) -> Tensor:
    """[..., V] True outside the ``top_k_indices`` [..., k] that ``torch.topk`` chose: exactly k tokens, every
    logit above the k-th largest and as many tied with it as fit (which tied ones changes no probability)."""
    return torch.ones_like(logits, dtype=torch.bool).scatter_(-1, top_k_indices, False)


def _keep_scored(logits: Tensor, removed: Tensor, keep: Tensor) -> None:
    """Un-remove the ``keep`` [...] tokens in place; where the rule dropped one that ties with a kept token,
    that tie-mate is dropped instead, so the kept set keeps its size and its mass."""
    index = keep.unsqueeze(-1)  # [..., 1]
    dropped = removed.gather(-1, index)  # [..., 1]
    if bool(dropped.any()):
        mates = (logits == logits.gather(-1, index)) & ~removed  # [..., V] kept tokens of the scored logit
        exchange = dropped & mates.any(-1, keepdim=True)
        mate = mates.to(torch.uint8).argmax(-1, keepdim=True)  # the first kept tie-mate (any if none: unused)
        removed.scatter_(-1, mate, removed.gather(-1, mate) | exchange)
    removed.scatter_(-1, index, False)


def truncate_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, keep: Optional[Tensor] = None,
                    top_k_ties: TopKTies = "keep") -> Tensor:
    """``logits`` [..., V] with the tokens outside the top-k / top-p set at -inf (``keep`` [...] ids excepted,
    see the module docstring); ``top_k_ties`` is the sampler's rule for ties with the k-th largest logit.

    ``top_k`` 0 and ``top_p`` 1 leave the logits as they are (the same tensor).
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_k_ties not in ("keep", "exact"):
        raise ValueError(f"top_k_ties must be 'keep' or 'exact', got {top_k_ties!r}")
    if top_k == 0 and top_p >= 1.0:
        return logits
    removed = torch.zeros_like(logits, dtype=torch.bool)
    if 0 < top_k < logits.shape[-1]:
        largest = torch.topk(logits, top_k, dim=-1)
        removed = (_exact_top_k_removed(logits, largest.indices) if top_k_ties == "exact"
                   else logits < largest.values[..., -1:])
    if top_p < 1.0:
        masked = logits.masked_fill(removed, float("-inf"))
        sorted_logits, order = torch.sort(masked, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_removed = cumulative <= 1 - top_p
        sorted_removed[..., -1] = False  # the most likely token always stays
        removed |= sorted_removed.scatter(-1, order, sorted_removed)
    if keep is not None:
        _keep_scored(logits, removed, keep)
    return logits.masked_fill(removed, float("-inf"))
