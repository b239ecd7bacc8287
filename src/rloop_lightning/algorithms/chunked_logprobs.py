"""Log-probs of chosen tokens without the [tokens x vocabulary] logits: the LM head applied chunk by chunk.

For final hidden states h_t, an LM head (W, b), temperature T and chosen tokens y_t::

    z_t = trunc((W h_t + b) / T)        log pi(y_t) = z_t[y_t] - logsumexp(z_t)
    H_t = -sum_v p_tv log p_tv   (entropy, a statistic: no gradient)
    d log pi(y_t) / d z_t = onehot(y_t) - p_t

where ``trunc`` sets the logits outside a sampler's top-k / top-p set to -inf (``algorithms.truncation``;
the identity by default), so p_tv = 0 there and those logits get no gradient.

``chosen_token_logprobs`` computes this ``chunk_size`` tokens at a time and keeps only h, the
chunk's logsumexp and the results; the backward recomputes each chunk's logits from h and W, so
memory grows with chunk_size x vocabulary, not with tokens x vocabulary. The price is one more
head matmul per token in the backward. Results equal ``logprobs_from_logits`` (the plain path:
full logits, log-softmax) up to float rounding, gradients for h, W and b included.

Fused CUDA kernels do more: Liger's fused linear cross-entropy and Apple's cut-cross-entropy (CCE)
compute the same quantity with the head matmul and the softmax in one kernel, never writing a
chunk's logits to memory, and CCE also skips gradient entries below float precision. They save the
remaining chunk x vocabulary buffers and some time, but they are CUDA-only, return a loss rather
than per-token log-probs (CCE has a per-token mode; the clipped GRPO objective needs per-token
values and the entropy), and take their own dtype decisions, so the log-probs would no longer
match the sampler's and the reference's computed here. This module is used everywhere instead;
with chunks of a few hundred tokens the logits term is already below 1 GB at a 152k vocabulary
(``python -m benchmarks.update_memory``), which leaves little for a fused kernel to win.

Departure from TRL's ``chunked_logprob`` (the same recomputation): a head that is not a plain
``nn.Linear`` (a LoRA-adapted or quantised head) is run as a module inside one activation
checkpoint per chunk, which gives the same memory bound at the cost of recomputing the
log-softmax too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from rloop_lightning.algorithms.truncation import TopKTies, truncate_logits


def entropy_of(log_probs: Tensor) -> Tensor:
    """-sum_v p log p over the last axis, with truncated (-inf) entries contributing 0, not NaN."""
    terms = log_probs.exp().mul_(log_probs)  # one [..., V] buffer
    return -terms.masked_fill_(log_probs == float("-inf"), 0.0).sum(-1)


def logprobs_from_logits(logits: Tensor, targets: Tensor, temperature: float = 1.0, with_entropy: bool = False,
                         top_k: int = 0, top_p: float = 1.0,
                         top_k_ties: TopKTies = "keep") -> tuple[Tensor, Optional[Tensor]]:
    """The plain path: log-probs [...] of ``targets`` under ``logits`` [..., V] / temperature, truncated to
    the top-k / top-p set (``targets`` kept; ``top_k_ties`` as in ``truncate_logits``), and the entropy [...] (no grad). Holds several [..., V]
    float32 tensors: the reference the chunks must equal."""
    logits = logits.float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    logits = truncate_logits(logits, top_k, top_p, keep=targets, top_k_ties=top_k_ties)  # as the sampler did
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return chosen, None
    with torch.no_grad():  # a diagnostic: no [..., V] graph kept alive until backward
        entropy = entropy_of(log_probs.detach())
    return chosen, entropy


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on (as ``nn.Linear`` would), else h's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, targets: Tensor,
                  top_k: int, top_p: float, top_k_ties: TopKTies) -> Tensor:
    """float32 trunc((h W^T + b) / T) of one chunk; ``weight``/``bias`` already in the compute dtype."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    if temperature != 1.0:
        logits.div_(temperature)
    return truncate_logits(logits, top_k, top_p, keep=targets, top_k_ties=top_k_ties)


class _LinearHeadLogprobs(torch.autograd.Function):
    """log pi(y) and entropy of a linear head, chunked; the backward recomputes the logits per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, temperature, with_entropy, top_k, top_p, top_k_ties):
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            cast_weight = weight.to(dtype)  # once, not per chunk (a no-op unless autocast casts)
            cast_bias = bias.to(dtype) if bias is not None else None
            chosen = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            normaliser = torch.empty_like(chosen)
            entropy = torch.empty_like(chosen) if with_entropy else chosen.new_empty(0)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[rows], cast_weight, cast_bias, temperature, targets[rows], top_k, top_p,
                                       top_k_ties)
                normaliser[rows] = torch.logsumexp(logits, -1)
                log_probs = logits.sub_(normaliser[rows, None])  # in place: one [chunk, V] buffer
                chosen[rows] = log_probs.gather(-1, targets[rows, None]).squeeze(-1)
                if with_entropy:
                    entropy[rows] = entropy_of(log_probs)
        ctx.save_for_backward(hidden, weight, bias, targets, normaliser)
        ctx.chunk_size, ctx.temperature, ctx.dtype = chunk_size, temperature, dtype
        ctx.truncation = (top_k, top_p, top_k_ties)
        ctx.mark_non_differentiable(entropy)
        return chosen, entropy

    @staticmethod
    def backward(ctx, grad_chosen, grad_entropy):
        hidden, weight, bias, targets, normaliser = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            cast_weight = weight.to(ctx.dtype)
            cast_bias = bias.to(ctx.dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                scale = grad_chosen[rows, None].float()
                # d/dz of g * log pi(y) = g * (onehot(y) - p), then the chain rule through z = logits / T
                grad_logits = _chunk_logits(hidden[rows], cast_weight, cast_bias, ctx.temperature, targets[rows],
                                            *ctx.truncation)
                grad_logits.sub_(normaliser[rows, None]).exp_().mul_(-scale)
                grad_logits.scatter_add_(-1, targets[rows, None], scale)
                if ctx.temperature != 1.0:
                    grad_logits.div_(ctx.temperature)
                grad_logits = grad_logits.to(ctx.dtype)
                chunk = hidden[rows].to(ctx.dtype)
                if needs_hidden:
                    grad_hidden[rows] = grad_logits @ cast_weight
                if needs_weight:
                    grad_weight += grad_logits.T @ chunk
                if needs_bias:
                    grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _module_head_logprobs(hidden: Tensor, head: nn.Module, targets: Tensor, chunk_size: int, temperature: float,
                          with_entropy: bool, top_k: int, top_p: float,
                          top_k_ties: TopKTies) -> tuple[Tensor, Optional[Tensor]]:
    """Any head module (LoRA-adapted, quantised): one activation checkpoint per chunk."""

    def chunk_logprobs(chunk: Tensor, chunk_targets: Tensor) -> tuple[Tensor, Tensor]:
        chosen, entropy = logprobs_from_logits(head(chunk), chunk_targets, temperature, with_entropy, top_k, top_p,
                                               top_k_ties)
        return chosen, entropy if entropy is not None else chosen.detach().new_empty(0)

    chosen, entropy = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            outputs = checkpoint(chunk_logprobs, hidden[rows], targets[rows], use_reentrant=False)
        else:
            outputs = chunk_logprobs(hidden[rows], targets[rows])
        chosen.append(outputs[0])
        entropy.append(outputs[1].detach())
    return torch.cat(chosen), torch.cat(entropy) if with_entropy else None


def chosen_token_logprobs(hidden: Tensor, head: nn.Module, targets: Tensor, chunk_size: int,
                          temperature: float = 1.0, with_entropy: bool = False, top_k: int = 0,
                          top_p: float = 1.0, top_k_ties: TopKTies = "keep") -> tuple[Tensor, Optional[Tensor]]:
    """Log-probs [...] (float32) of ``targets`` [...] under ``head(hidden)`` / temperature, ``hidden``
    [..., H], computed ``chunk_size`` tokens at a time; the entropy [...] too (no grad) with ``with_entropy``.

    Equals ``logprobs_from_logits(head(hidden), targets, temperature, with_entropy, top_k, top_p)`` up to float
    rounding, gradients included. ``temperature`` 0 (greedy) counts as 1. A plain ``nn.Linear`` head
    (tied or not) goes through the recomputing autograd function; any other module through activation
    checkpoints. No collective runs here: under FSDP2 the head must already be gathered (it is, in the
    root unit, from the model's forward until its backward), so ranks may run different chunk counts.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    temperature = float(temperature) if temperature else 1.0
    shape = targets.shape
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if type(head) is nn.Linear:
        chosen, entropy = _LinearHeadLogprobs.apply(flat_hidden, head.weight, head.bias, flat_targets,
                                                    chunk_size, temperature, with_entropy, top_k, top_p, top_k_ties)
        entropy = entropy if with_entropy else None
    else:
        chosen, entropy = _module_head_logprobs(flat_hidden, head, flat_targets, chunk_size, temperature,
                                                with_entropy, top_k, top_p, top_k_ties)
    return chosen.view(shape), entropy.view(shape) if entropy is not None else None
