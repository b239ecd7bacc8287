"""Chosen-token log-probs with the LM head applied chunk by chunk: equal to the full logits' values and
gradients (hand numbers, chunk sizes, temperature, tied/untied/adapted heads, shared prompts, autocast),
the GRPO update unchanged, and the same under FSDP2 on 2 gloo processes."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from torch import nn

from rloop_lightning import tiny
from rloop_lightning.algorithms.chunked_logprobs import chosen_token_logprobs, logprobs_from_logits
from rloop_lightning.policy import Policy

CHUNK_SIZES = [1, 3, 5, 64]  # one token, a non-divisor of the 12 tokens, a divisor... and more than all


def test_hand_computed_logprobs_and_entropy():
    """Head W = [[1], [0], [-1]], h = 1 and 2: logits (1, 0, -1) and (2, 0, -2); tokens 0 and 2."""
    head = nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
    hidden = torch.tensor([[[1.0], [2.0]]])
    for chunk_size in (1, 2):
        chosen, entropy = chosen_token_logprobs(hidden, head, torch.tensor([[0, 2]]), chunk_size, with_entropy=True)
        first = 1 - math.log(math.e + 1 + math.exp(-1))
        second = -2 - math.log(math.exp(2) + 1 + math.exp(-2))
        assert chosen[0].tolist() == pytest.approx([first, second], abs=1e-6)
        p = [math.exp(z) / (math.e + 1 + math.exp(-1)) for z in (1, 0, -1)]
        assert entropy[0, 0].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)
    # temperature 2 halves the logits: (0.5, 0, -0.5) for the first token
    chosen, _ = chosen_token_logprobs(hidden, head, torch.tensor([[0, 2]]), 1, temperature=2.0)
    assert chosen[0, 0].item() == pytest.approx(0.5 - math.log(math.exp(0.5) + 1 + math.exp(-0.5)), abs=1e-6)
    # d log pi(y) / d h = sum_v (onehot - p)_v W_v = W_y - E_p[W] = 1 - (p0 - p2)
    hidden.requires_grad_(True)
    chosen, _ = chosen_token_logprobs(hidden, head, torch.tensor([[0, 2]]), 1)
    chosen[0, 0].backward()
    assert hidden.grad[0, 0, 0].item() == pytest.approx(1 - (p[0] - p[2]), abs=1e-6)
    assert hidden.grad[0, 1, 0].item() == 0.0


def make_case(tied: bool, bias: bool, seed: int = 0):
    """A batch of 2 x 6 hidden states [2, 6, 8] made from token embeddings, a head over 50 tokens."""
    generator = torch.Generator().manual_seed(seed)
    embedding = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=bias)
    with torch.no_grad():
        for parameter in (*embedding.parameters(), *head.parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    if tied:
        head.weight = embedding.weight
    mix = nn.Linear(8, 8)
    inputs = torch.randint(0, 50, (2, 6), generator=generator)
    targets = torch.randint(0, 50, (2, 6), generator=generator)
    return embedding, mix, head, inputs, targets


def values_and_gradients(case, chunk_size, temperature, top_k=0, top_p=1.0):
    """Log-probs, entropy and the gradients of sum(c * log pi) for the hidden states and every parameter."""
    embedding, mix, head, inputs, targets = case
    for module in (embedding, mix, head):
        module.zero_grad(set_to_none=True)
    hidden = torch.tanh(mix(embedding(inputs)))
    hidden.retain_grad()
    if chunk_size is None:
        chosen, entropy = logprobs_from_logits(head(hidden), targets, temperature, True, top_k, top_p)
    else:
        chosen, entropy = chosen_token_logprobs(hidden, head, targets, chunk_size, temperature, True, top_k, top_p)
    weights = torch.linspace(-1, 2, chosen.numel()).view_as(chosen)
    (chosen * weights).sum().backward()
    parameters = {f"{name}.{key}": p.grad.clone() for name, module in (("embedding", embedding), ("mix", mix),
                                                                        ("head", head))
                  for key, p in module.named_parameters() if p.grad is not None}
    return chosen.detach(), entropy, hidden.grad.clone(), parameters


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("tied,bias", [(False, False), (False, True), (True, False)])
def test_chunks_equal_the_full_logits_with_gradients(chunk_size, temperature, tied, bias):
    case = make_case(tied, bias)
    plain = values_and_gradients(case, None, temperature)
    chunked = values_and_gradients(case, chunk_size, temperature)
    torch.testing.assert_close(chunked[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[1], plain[1], atol=1e-5, rtol=0)
    assert not chunked[1].requires_grad
    assert plain[2].abs().max() > 1e-2
    torch.testing.assert_close(chunked[2], plain[2], atol=1e-5, rtol=1e-5)  # d/d hidden states
    assert set(chunked[3]) == set(plain[3]) and ("head.bias" in plain[3]) == bias
    if tied:  # one tensor: its gradient sums the head's and the embedding's uses
        assert torch.equal(plain[3]["head.weight"], plain[3]["embedding.weight"])
    for name, gradient in plain[3].items():  # the head (tied: through both uses), and everything below it
        assert gradient.abs().max() > 1e-3, name
        torch.testing.assert_close(chunked[3][name], gradient, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.7)])
def test_truncated_chunks_equal_the_truncated_full_logits(chunk_size, top_k, top_p):
    """The sampler's top-k / top-p set applied per chunk (``algorithms.truncation``): the same values,
    finite entropy and the same gradients as the truncated full logits; and not the untruncated ones."""
    case = make_case(tied=False, bias=True)
    untruncated = values_and_gradients(case, None, 0.7)
    plain = values_and_gradients(case, None, 0.7, top_k, top_p)
    chunked = values_and_gradients(case, chunk_size, 0.7, top_k, top_p)
    assert (plain[0] - untruncated[0]).abs().max() > 1e-2  # truncation renormalises: log-probs rise
    assert torch.isfinite(chunked[0]).all() and torch.isfinite(chunked[1]).all()
    torch.testing.assert_close(chunked[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[1], plain[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[2], plain[2], atol=1e-5, rtol=1e-5)
    for name, gradient in plain[3].items():
        torch.testing.assert_close(chunked[3][name], gradient, atol=1e-5, rtol=1e-5)


def test_a_head_that_is_not_a_plain_linear_is_checkpointed_per_chunk():
    """A LoRA-adapted head (peft ``lora.Linear``): run as a module; values and gradients as the plain path."""
    from peft import LoraConfig, get_peft_model

    embedding, mix, head, inputs, targets = make_case(tied=False, bias=False)
    model = get_peft_model(nn.ModuleDict({"head": head}), LoraConfig(r=2, target_modules=["head"], init_lora_weights=False))
    adapted = model.base_model.model["head"]
    assert type(adapted) is not nn.Linear
    results = []
    for chunk_size in (None, 5):
        model.zero_grad(set_to_none=True)
        hidden = embedding(inputs).detach().requires_grad_(True)
        if chunk_size is None:
            chosen, entropy = logprobs_from_logits(adapted(hidden), targets, 0.7, with_entropy=True)
        else:
            chosen, entropy = chosen_token_logprobs(hidden, adapted, targets, chunk_size, 0.7, with_entropy=True)
        chosen.sum().backward()
        adapter = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((chosen.detach(), entropy, hidden.grad, adapter))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1][2], results[0][2], atol=1e-5, rtol=1e-5)
    assert len(results[0][3]) == 2 and all(g.abs().max() > 1e-3 for g in results[0][3])
    for chunked, plain in zip(results[1][3], results[0][3]):
        torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


def test_under_bfloat16_autocast_the_head_runs_in_bfloat16_as_the_plain_path():
    embedding, mix, head, inputs, targets = make_case(tied=False, bias=True)
    results = []
    for chunk_size in (None, 5):
        head.zero_grad(set_to_none=True)
        hidden = embedding(inputs).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunk_size is None:
                chosen, _ = logprobs_from_logits(head(hidden), targets)
            else:
                chosen, _ = chosen_token_logprobs(hidden, head, targets, chunk_size)
        chosen.sum().backward()
        results.append((chosen.detach(), hidden.grad, head.weight.grad, head.bias.grad))
    assert results[1][0].dtype == torch.float32 and results[1][2].dtype == torch.float32
    # the same bf16 logits: log-probs agree to float32 rounding; gradients to bf16 rounding
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    for chunked, plain in zip(results[1][1:], results[0][1:]):
        torch.testing.assert_close(chunked, plain, atol=2e-2, rtol=1e-2)


def test_a_chunk_size_below_one_is_refused():
    case = make_case(tied=False, bias=False)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of tokens, got 0"):
        chosen_token_logprobs(torch.zeros(1, 1, 8), case[2], torch.zeros(1, 1, dtype=torch.long), 0)
    for size in (0, -4):
        with pytest.raises(ValueError, match=f"policy.logprob_chunk_size must be a positive number.*got {size}"):
            Policy("rloop/micro-llama", logprob_chunk_size=size)


# --------------------------------------------------------------------------- the policy's log-probs


def untied_model_dir(directory) -> str:
    """micro-llama's architecture with an untied LM head (random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = tiny.materialize("rloop/micro-llama")
    config = AutoConfig.from_pretrained(source)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tiny.build_tokenizer().save_pretrained(directory)
    return str(directory)


def grouped_batch(policy: Policy):
    """Two prompts with 3 completions each and one prompt seen once: 7 rows, 7 completion columns."""
    prompts = ["12 3 -> 9\n"] * 3 + ["1 2 -> 3\n"] * 3 + ["7 7 -> 49\n"]
    completions = ["12-3", "3", "12+3-6", "1+2", "2+1=3", "", "7*7"]
    return policy.encode_pairs(prompts, completions)


def policy_values(policy: Policy, batch, chunk_size, temperature, share_prompts):
    policy.logprob_chunk_size = chunk_size
    policy.model.zero_grad(set_to_none=True)
    logprobs, entropy = policy.completion_logprobs(batch, with_entropy=True, temperature=temperature,
                                                   share_prompts=share_prompts)
    mask = batch.completion_mask.float()
    (logprobs * mask * torch.linspace(1, 2, mask.numel()).view_as(mask)).sum().backward()
    gradients = {name: p.grad.clone() for name, p in policy.model.named_parameters() if p.grad is not None}
    return logprobs.detach() * mask, entropy * mask, gradients


@pytest.mark.parametrize("head", ["tied", "untied"])
@pytest.mark.parametrize("share_prompts", [False, True])
def test_policy_logprobs_and_gradients_equal_the_full_logits(head, share_prompts, tmp_path):
    policy = Policy("rloop/micro-llama" if head == "tied" else untied_model_dir(tmp_path))
    policy.load_model()
    assert (policy.model.lm_head.weight is policy.model.model.embed_tokens.weight) == (head == "tied")
    batch = grouped_batch(policy)
    for temperature in (1.0, 0.6):
        plain = policy_values(policy, batch, None, temperature, share_prompts)
        for chunk_size in (1, 4, 100):
            chunked = policy_values(policy, batch, chunk_size, temperature, share_prompts)
            torch.testing.assert_close(chunked[0], plain[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(chunked[1], plain[1], atol=1e-5, rtol=0)
            assert set(chunked[2]) == set(plain[2])
            assert ("lm_head.weight" in plain[2]) == (head == "untied")  # tied: the embedding's tensor
            for name, gradient in plain[2].items():
                torch.testing.assert_close(chunked[2][name], gradient, atol=1e-5, rtol=1e-4, msg=name)
    assert isinstance(policy.model.lm_head, nn.Linear)  # the head is back in place


def test_the_model_returns_no_logits_on_the_chunked_path(micro_policy):
    """The head runs only inside the chunks: what the model's forward returns is [N, C + 1, hidden]."""
    shapes = []
    hook = micro_policy.model.register_forward_hook(lambda module, args, output: shapes.append(output.logits.shape))
    batch = grouped_batch(micro_policy)
    with torch.no_grad():
        micro_policy.completion_logprobs(batch)
    micro_policy.logprob_chunk_size = None
    with torch.no_grad():
        micro_policy.completion_logprobs(batch)
    hook.remove()
    columns = batch.completion_mask.shape[1] + 1
    assert shapes == [(7, columns, 32), (7, columns, len(micro_policy.tokenizer))]


def test_a_model_that_transforms_its_logits_keeps_the_full_logits(micro_policy):
    """Soft-capping (Gemma 2) or scaling (Cohere, Granite) happen after the head inside the model's forward:
    the chunks would skip them, so such a model is run as it is."""
    batch = grouped_batch(micro_policy)
    with torch.no_grad():
        chunked = micro_policy.completion_logprobs(batch)[0]
    micro_policy.model.config.final_logit_softcapping = 30.0
    shapes = []
    hook = micro_policy.model.register_forward_hook(lambda module, args, output: shapes.append(output.logits.shape))
    with torch.no_grad():
        full = micro_policy.completion_logprobs(batch)[0]
    hook.remove()
    assert shapes == [(7, batch.completion_mask.shape[1] + 1, len(micro_policy.tokenizer))]
    torch.testing.assert_close(full, chunked, atol=1e-5, rtol=0)  # Llama's forward ignores the field


def test_qlora_policy_chunks_equal_the_full_logits():
    """QLoRA (4-bit base, fp32 head after prepare_model_for_kbit_training): the same log-probs and adapter
    gradients, with the reference (adapters disabled) too."""
    pytest.importorskip("bitsandbytes")
    from rloop_lightning.policy import LoraSettings

    policy = Policy("rloop/tiny-llama", lora=LoraSettings(r=4), load_in_4bit=True)
    policy.load_model()
    for parameter in policy.model.parameters():  # non-zero adapters, so B's gradient is not the only one
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)
    batch = grouped_batch(policy)
    plain = policy_values(policy, batch, None, 0.8, share_prompts=True)
    chunked = policy_values(policy, batch, 3, 0.8, share_prompts=True)
    torch.testing.assert_close(chunked[0], plain[0], atol=1e-4, rtol=0)
    assert plain[2] and set(chunked[2]) == set(plain[2])
    for name, gradient in plain[2].items():
        torch.testing.assert_close(chunked[2][name], gradient, atol=1e-5, rtol=1e-3, msg=name)
    with torch.no_grad():
        references = []
        for chunk_size in (None, 3):
            policy.logprob_chunk_size = chunk_size
            references.append(policy.reference_logprobs(batch, temperature=0.8))
    torch.testing.assert_close(references[1], references[0], atol=1e-4, rtol=0)


def test_grpo_update_is_unchanged():
    """The same seed gives the same weights after GRPO steps with chunks as with the full logits: the update,
    the old policy's log-probs (2 iterations) and the KL reference's."""
    from test_grpo import assert_same_weights

    from rloop_lightning.grpo import LossSettings
    from rloop_lightning.rollout.base import SamplingParams

    assert_same_weights(*({"policy": Policy("rloop/micro-llama", logprob_chunk_size=chunk_size),
                           "sampling": SamplingParams(max_new_tokens=8, temperature=0.8), "num_iterations": 2,
                           "micro_batch_size": 8, "loss": LossSettings(kl_coef=0.1)} for chunk_size in (None, 3)))


# --------------------------------------------------------------------------- FSDP2 on 2 gloo processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fsdp1_gradients(rank: int, completions: list[str]) -> dict:
    """FSDP1 (flat parameters): this rank's gradient shard after a full-logit and a chunked backward."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from rloop_lightning.strategies import fsdp_wrap_classes

    policy = Policy("rloop/micro-llama")
    policy.load_model()
    policy.model = FullyShardedDataParallel(policy.model, auto_wrap_policy=ModuleWrapPolicy(
        fsdp_wrap_classes(policy.model)), device_id=torch.device("cpu"))
    batch = policy.encode_pairs(["1 2 -> 3\n", "1 2 -> 3\n"], completions)
    gradients = {}
    for chunk_size in (None, 2):
        policy.logprob_chunk_size = chunk_size
        policy.model.zero_grad(set_to_none=True)
        logprobs, _ = policy.completion_logprobs(batch, temperature=0.7)
        (logprobs * batch.completion_mask).sum().backward()
        gradients[chunk_size] = torch.cat([p.grad.flatten() for p in policy.model.parameters()])
    return gradients


def fsdp2_worker(rank: int, port: int, output: str) -> None:
    """Shard micro-llama with FSDP2 (and FSDP1); each rank its own batch (different completion lengths, so
    different chunk counts); full-logit and chunked gradients, gathered, must agree."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from rloop_lightning.strategies import shard_with_fsdp2

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        completions = ["1+2", "2+1"] if rank == 0 else ["1+2=3 and 3", "3"]
        fsdp1 = fsdp1_gradients(rank, completions)
        policy = Policy("rloop/micro-llama")
        policy.load_model()
        shard_with_fsdp2(policy.model, init_device_mesh("cpu", (2,)))
        batch = policy.encode_pairs(["1 2 -> 3\n", "1 2 -> 3\n"], completions)
        results = {"fsdp1": fsdp1}
        for chunk_size in (None, 2):
            for share_prompts in (False, True):
                policy.logprob_chunk_size = chunk_size
                policy.model.zero_grad(set_to_none=True)
                with torch.no_grad():
                    without_grad = policy.completion_logprobs(batch, temperature=0.7, share_prompts=share_prompts)[0]
                logprobs, entropy = policy.completion_logprobs(batch, with_entropy=True, temperature=0.7,
                                                               share_prompts=share_prompts)
                mask = batch.completion_mask.float()
                (logprobs * mask).sum().backward()
                gradients = {name: p.grad.full_tensor() for name, p in policy.model.named_parameters()}
                results[(chunk_size, share_prompts)] = {
                    "logprobs": logprobs.detach() * mask, "no_grad": without_grad * mask, "entropy": entropy * mask,
                    "gradients": gradients}
        torch.save(results, f"{output}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_chunks_under_fsdp_on_two_processes(tmp_path):
    """The head is in FSDP's root unit, gathered by the model's forward and kept until its backward: the
    chunks (and their recomputation in the backward) see the full weight on every rank (FSDP2 and FSDP1)."""
    tiny.materialize("rloop/micro-llama")  # once, before two processes would build it at the same time
    torch.multiprocessing.spawn(fsdp2_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        fsdp1 = results["fsdp1"]
        assert fsdp1[None].abs().max() > 1e-2
        torch.testing.assert_close(fsdp1[2], fsdp1[None], atol=1e-5, rtol=1e-4)
        for share_prompts in (False, True):
            plain, chunked = results[(None, share_prompts)], results[(2, share_prompts)]
            for key in ("logprobs", "no_grad", "entropy"):
                torch.testing.assert_close(chunked[key], plain[key], atol=1e-5, rtol=0)
            torch.testing.assert_close(plain["no_grad"], plain["logprobs"], atol=1e-6, rtol=0)
            assert plain["gradients"]["model.embed_tokens.weight"].abs().max() > 1e-2  # = the (tied) head
            for name, gradient in plain["gradients"].items():
                torch.testing.assert_close(chunked["gradients"][name], gradient, atol=1e-5, rtol=1e-4, msg=name)
    other = torch.load(tmp_path / "rank1.pt")[(2, True)]["gradients"]  # reduced: both ranks hold the same sum
    for name, gradient in torch.load(tmp_path / "rank0.pt")[(2, True)]["gradients"].items():
        torch.testing.assert_close(other[name], gradient, atol=0, rtol=0)
