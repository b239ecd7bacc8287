"""The chunked LM-head path is as accurate as the full logits on the main job's model and data.

``Policy.logprob_chunk_size`` changes the order of float32 operations, so a run with chunks and one
with the full logits drift apart by rounding (the 1000-step tiny base build ends with other weights
and other held-out numbers: docs/results.md, "Run-to-run variation"). These tests pin that the
difference is rounding and nothing more: against a float64 computation of the same loss, the
chunked float32 gradients of the RFT and GRPO-style objectives on ``rloop/tiny-llama`` and Countdown
demonstrations are as close as the full-logit float32 gradients, whatever the chunk size.
"""

from __future__ import annotations

import pytest
import torch

from rloop_lightning.data.datamodules import DemonstrationDataset
from rloop_lightning.policy import Policy
from rloop_lightning.tasks import Countdown


@pytest.fixture(scope="module")
def demonstrations() -> list[dict]:
    task = Countdown()
    dataset = DemonstrationDataset(task, task.load("train")[:48], True)
    return [dataset[i] for i in range(48)]


def flat_gradient(demonstrations, chunk_size, dtype, temperature=1.0, share_prompts=False, weighted=False):
    """The loss and its gradient (all parameters, one float64 vector) of ``rloop/tiny-llama``."""
    policy = Policy("rloop/tiny-llama", logprob_chunk_size=chunk_size)
    model = policy.load_model().to(dtype)
    model.train()
    prompts = [record["prompt"] for record in demonstrations]
    if share_prompts:  # GRPO's layout: each prompt with several completions
        prompts = [prompts[i // 4 * 4] for i in range(len(prompts))]
    batch = policy.encode_pairs(prompts, [record["completion"] for record in demonstrations])
    logprobs, _ = policy.completion_logprobs(batch, with_entropy=True, temperature=temperature,
                                             share_prompts=share_prompts)
    mask = batch.completion_mask.to(logprobs.dtype)
    weights = torch.linspace(-1, 2, mask.numel(), dtype=logprobs.dtype).view_as(mask) if weighted else 1.0
    loss = -(logprobs * mask * weights).sum() / mask.sum()  # weighted: signed advantages, as in GRPO
    loss.backward()
    gradient = torch.cat([p.grad.double().flatten() for _, p in sorted(model.named_parameters())])
    return float(loss), gradient


@pytest.mark.parametrize("objective", [
    dict(),  # RFT: the mean completion NLL (the base build, the RLoop exploit phase)
    dict(temperature=0.7, share_prompts=True, weighted=True),  # GRPO-like: signed weights, shared prompts
])
def test_chunked_float32_gradient_is_as_close_to_float64_as_the_full_logits(demonstrations, objective):
    exact_loss, exact = flat_gradient(demonstrations, None, torch.float64, **objective)
    full_loss, full = flat_gradient(demonstrations, None, torch.float32, **objective)
    full_error = float((full - exact).norm() / exact.norm())
    assert 0 < full_error < 1e-5  # float32 rounding: not zero, and small
    for chunk_size in (512, 37, 1):
        chunk_loss, chunked = flat_gradient(demonstrations, chunk_size, torch.float32, **objective)
        chunk_error = float((chunked - exact).norm() / exact.norm())
        assert chunk_error < 2 * full_error, (chunk_size, chunk_error, full_error)
        assert abs(chunk_loss - exact_loss) <= 2 * abs(full_loss - exact_loss) + 1e-6 * abs(exact_loss)
