"""Top-k / top-p truncation of logits: the distribution a sampler with ``top_k > 0`` or ``top_p < 1`` draws from.

With truncation the sampler draws token x from

    q(x) = softmax(z / T)[x] / Z_kept  if x is kept, else 0,
    kept = the top_k largest logits, then the smallest set of those whose probabilities reach top_p,

and both engines report log q(x) (the Hugging Face warpers; vLLM's ``processed_logprobs``). The
trainer scores the same q (``Policy.completion_logprobs(top_k=..., top_p=...)``), so the policy the
objective talks about is the one that samples, and importance ratios compare like with like.

The rules are those of ``transformers``' ``TopKLogitsWarper`` then ``TopPLogitsWarper`` and of vLLM's
``apply_top_k_top_p`` (the same two): top-k keeps every logit >= the k-th largest (ties kept); top-p
sorts ascending and drops the tokens whose cumulative probability is <= 1 - top_p, always keeping
the most likely one.

GRPO scores the policy's current and old log-probs this way; the KL reference is scored without
truncation (temperature only): a reference whose own top-p set missed a sampled token would give an
infinite penalty.

Departure: ``keep`` (the scored tokens) is never dropped. A token the sampler drew is inside its
kept set by construction; the trainer's logits differ from the sampler's by kernel rounding (and,
after an update, by the update), which can move a boundary token out of the set: its log-prob
would be -inf and every ratio with it NaN. Kept, it gets its share of the renormalised mass.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def truncate_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, keep: Optional[Tensor] = None) -> Tensor:
    """``logits`` [..., V] with the tokens outside the top-k / top-p set at -inf (``keep`` [...] ids excepted).

    ``top_k`` 0 and ``top_p`` 1 leave the logits as they are (the same tensor).
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_k == 0 and top_p >= 1.0:
        return logits
    removed = torch.zeros_like(logits, dtype=torch.bool)
    if 0 < top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        removed |= logits < kth_largest
    if top_p < 1.0:
        masked = logits.masked_fill(removed, float("-inf"))
        sorted_logits, order = torch.sort(masked, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_removed = cumulative <= 1 - top_p
        sorted_removed[..., -1] = False  # the most likely token always stays
        removed |= sorted_removed.scatter(-1, order, sorted_removed)
    if keep is not None:
        removed.scatter_(-1, keep.unsqueeze(-1), False)
    return logits.masked_fill(removed, float("-inf"))
