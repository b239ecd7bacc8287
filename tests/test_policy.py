"""The Policy wrapper: batch layout, log-probs, templates, reference policy, saving (full, LoRA, QLoRA)."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from rloop_lightning import tiny
from rloop_lightning.callbacks import ExportPolicy
from rloop_lightning.data.datamodules import DemonstrationDataModule
from rloop_lightning.policy import LoraSettings, Policy, disable_dropout
from rloop_lightning.rft import RFTModule
from rloop_lightning.tasks import Countdown

PROMPTS = ["12 3 -> 9\n", "1 2 -> 3\n"]  # 10 and 9 characters: different prompt lengths
COMPLETIONS = ["12-3", "1+2=3"]  # 4 and 5 characters
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def token_ids(policy: Policy, text: str) -> list[int]:
    return policy.tokenizer.convert_tokens_to_ids(list(text))


def mean_nll(policy: Policy, batch) -> torch.Tensor:
    logprobs, _ = policy.completion_logprobs(batch)
    mask = batch.completion_mask.float()
    return -(logprobs * mask).sum() / mask.sum()


def train(policy: Policy, batch, steps: int, lr: float, optimizer=torch.optim.SGD) -> None:
    optimizer = optimizer([p for p in policy.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        mean_nll(policy, batch).backward()
        optimizer.step()


@torch.no_grad()
def logprobs_of(policy: Policy, batch) -> torch.Tensor:
    return policy.completion_logprobs(batch)[0]


# --------------------------------------------------------------------------- batches and log-probs


def test_encode_pairs_layout(micro_policy):
    batch = micro_policy.encode_pairs(PROMPTS, COMPLETIONS)
    pad, eos = micro_policy.tokenizer.pad_token_id, micro_policy.tokenizer.eos_token_id
    assert batch.prompt_length == 10
    assert batch.input_ids.shape == (2, 10 + 6) and batch.completion_mask.shape == (2, 6)
    # prompts left-padded
    assert batch.input_ids[0, :10].tolist() == token_ids(micro_policy, PROMPTS[0])
    assert batch.input_ids[1, :10].tolist() == [pad] + token_ids(micro_policy, PROMPTS[1])
    # completions right-padded, EOS appended
    assert batch.input_ids[0, 10:].tolist() == token_ids(micro_policy, COMPLETIONS[0]) + [eos, pad]
    assert batch.input_ids[1, 10:].tolist() == token_ids(micro_policy, COMPLETIONS[1]) + [eos]
    assert batch.completion_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch.completion_mask.sum(1).tolist() == [len(COMPLETIONS[0]) + 1, len(COMPLETIONS[1]) + 1]
    assert batch.attention_mask.tolist() == [[1] * 15 + [0], [0] + [1] * 15]


def test_completion_logprobs_equal_an_unpadded_full_forward(micro_policy):
    batch = micro_policy.encode_pairs(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        logprobs, entropy = micro_policy.completion_logprobs(batch, with_entropy=True)
    assert logprobs.shape == entropy.shape == (2, 6)
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ids = torch.tensor(token_ids(micro_policy, prompt + completion) + [micro_policy.tokenizer.eos_token_id])
        with torch.no_grad():
            all_logprobs = torch.log_softmax(micro_policy.model(input_ids=ids[None]).logits[0].float(), -1)
        start, length = len(prompt), len(completion) + 1
        expected = all_logprobs[start - 1: start - 1 + length].gather(-1, ids[start:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs[row, :length], expected, atol=1e-5, rtol=0)
    vocabulary = len(micro_policy.tokenizer)
    assert (entropy > 0).all() and (entropy <= math.log(vocabulary) + 1e-4).all()
    assert not entropy.requires_grad


def test_completion_logprobs_carry_gradients(micro_policy):
    batch = micro_policy.encode_pairs(PROMPTS, COMPLETIONS)
    logprobs, entropy = micro_policy.completion_logprobs(batch)
    assert entropy is None and logprobs.requires_grad and (logprobs < 0).all()


def grouped_batch(policy: Policy):
    """Two prompts of different lengths with 3 completions each, plus one prompt seen once."""
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 + ["7 7 -> 49\n"]
    completions = ["12-3", "3", "12+3-6", "1+2", "2+1=3", "", "7*7"]
    return policy.encode_pairs(prompts, completions)


def logprobs_and_gradient(policy: Policy, batch, share_prompts: bool):
    policy.model.zero_grad(set_to_none=True)
    logprobs, entropy = policy.completion_logprobs(batch, with_entropy=True, share_prompts=share_prompts)
    mask = batch.completion_mask.float()
    (logprobs * mask * torch.linspace(1, 2, mask.numel()).view_as(mask)).sum().backward()
    gradient = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    return logprobs.detach() * mask, entropy * mask, gradient


@pytest.mark.parametrize("model", ["rloop/micro-llama", "rloop/tiny-qwen3"])
def test_shared_prompts_give_the_same_logprobs_and_gradients(model):
    policy = Policy(model)
    policy.load_model()
    batch = grouped_batch(policy)
    plain, plain_entropy, plain_gradient = logprobs_and_gradient(policy, batch, share_prompts=False)
    shared, shared_entropy, shared_gradient = logprobs_and_gradient(policy, batch, share_prompts=True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_entropy, plain_entropy, atol=1e-5, rtol=0)
    assert plain_gradient.abs().max() > 1e-2  # a real gradient, not two zero vectors
    torch.testing.assert_close(shared_gradient, plain_gradient, atol=1e-4, rtol=1e-4)


def test_shared_prompts_run_each_distinct_prompt_once(micro_policy):
    batch = grouped_batch(micro_policy)
    seen = []
    hook = micro_policy.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    with torch.no_grad():
        micro_policy.completion_logprobs(batch, share_prompts=True)
    hook.remove()
    completion_length = batch.completion_mask.shape[1]
    assert seen == [(3, batch.prompt_length), (7, completion_length)]  # 3 distinct prompts, then 7 completions


def test_forced_sharing_with_distinct_prompts_still_matches(micro_policy):
    """Sharded ranks take the two-call path even when no prompt repeats (``force``): it must still be exact."""
    from rloop_lightning.forwards import shared_prompt_logits

    batch = micro_policy.encode_pairs(PROMPTS, COMPLETIONS)  # two distinct prompts
    with torch.no_grad():
        assert shared_prompt_logits(micro_policy.model, batch) is None
        forced = shared_prompt_logits(micro_policy.model, batch, force=True)
        plain = micro_policy.completion_logprobs(batch)[0]
    chosen = torch.log_softmax(forced, -1).gather(-1, batch.input_ids[:, batch.prompt_length:, None]).squeeze(-1)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(chosen[mask], plain[mask], atol=1e-5, rtol=0)


def test_shared_prompts_under_lora_match_the_plain_forward(lora_policy):
    batch = grouped_batch(lora_policy)
    train(lora_policy, batch, steps=2, lr=0.3)  # non-zero adapters
    plain, _, plain_gradient = logprobs_and_gradient(lora_policy, batch, share_prompts=False)
    shared, _, shared_gradient = logprobs_and_gradient(lora_policy, batch, share_prompts=True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_gradient, plain_gradient, atol=1e-4, rtol=1e-4)


def test_shared_prompts_fall_back_under_gradient_checkpointing():
    policy = Policy("rloop/micro-llama", gradient_checkpointing=True)
    policy.load_model()
    policy.model.train()
    batch = grouped_batch(policy)
    plain, _, plain_gradient = logprobs_and_gradient(policy, batch, share_prompts=False)
    shared, _, shared_gradient = logprobs_and_gradient(policy, batch, share_prompts=True)
    torch.testing.assert_close(shared, plain, atol=0, rtol=0)  # the plain forward ran: bit-identical
    torch.testing.assert_close(shared_gradient, plain_gradient, atol=0, rtol=0)


def test_require_model_before_loading():
    with pytest.raises(RuntimeError, match="not loaded yet"):
        Policy("rloop/micro-llama").require_model()


# --------------------------------------------------------------------------- prompt formatting


def test_plain_prompt_template_without_chat_template():
    policy = Policy("rloop/micro-llama", prompt_template="Q: {prompt}A:")
    assert policy.use_chat_template is False
    assert policy.format_prompt("1 2 -> 3\n") == "Q: 1 2 -> 3\nA:"
    assert policy.encode_prompts(["7"]) == [token_ids(policy, "Q: 7A:")]


def test_prompt_template_must_contain_prompt_field():
    with pytest.raises(ValueError, match="must contain"):
        Policy("rloop/micro-llama", prompt_template="Q: A:")


@pytest.fixture
def chat_model_dir(tmp_path):
    directory = tiny.materialize("rloop/micro-llama", tmp_path / "chat")
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def test_chat_template_is_used_when_the_tokenizer_has_one(chat_model_dir):
    policy = Policy(str(chat_model_dir), prompt_template="IGNORED {prompt}")
    assert policy.use_chat_template is True
    assert policy.format_prompt("1 2 -> 3") == "<user>1 2 -> 3\n<assistant>"
    with_system = Policy(str(chat_model_dir), use_chat_template=True, system_prompt="Be brief.")
    assert with_system.format_prompt("7") == "<system>Be brief.\n<user>7\n<assistant>"
    assert with_system.encode_prompts(["7"]) == [token_ids(with_system, "<system>Be brief.\n<user>7\n<assistant>")]
    plain = Policy(str(chat_model_dir), use_chat_template=False, prompt_template="Q: {prompt}")
    assert plain.format_prompt("7") == "Q: 7"


def test_use_chat_template_without_a_template_raises():
    with pytest.raises(ValueError, match="use_chat_template=True but the tokenizer .* has none"):
        Policy("rloop/micro-llama", use_chat_template=True)


# --------------------------------------------------------------------------- max_length


def test_max_length_truncates_completions_then_rejects_long_prompts(micro_policy):
    batch = micro_policy.encode_pairs(PROMPTS, COMPLETIONS, max_length=12)
    assert batch.prompt_length == 10
    # row 0: 10 prompt tokens leave 2 completion tokens ("12", EOS dropped); row 1: 9 leave 3 ("1+2")
    assert batch.input_ids[0, 10:].tolist() == token_ids(micro_policy, "12") + [0]
    assert batch.input_ids[1, 10:].tolist() == token_ids(micro_policy, "1+2")
    assert batch.completion_mask.sum(1).tolist() == [2, 3]
    assert (batch.attention_mask.sum(1) <= 12).all()
    untouched = micro_policy.encode_pairs(PROMPTS, COMPLETIONS, max_length=16)
    assert untouched.completion_mask.sum(1).tolist() == [5, 6]
    with pytest.raises(ValueError, match="prompt 0 has 10 tokens, not below max_length=10"):
        micro_policy.encode_pairs(PROMPTS, COMPLETIONS, max_length=10)


def test_load_in_4bit_needs_lora():
    with pytest.raises(ValueError, match="needs `lora` settings"):
        Policy("rloop/tiny-llama", load_in_4bit=True)


# --------------------------------------------------------------------------- full fine-tuning


def test_full_save_and_load_round_trip(micro_policy, tmp_path):
    batch = micro_policy.encode_pairs(PROMPTS, COMPLETIONS)
    fresh = logprobs_of(micro_policy, batch)
    train(micro_policy, batch, steps=1, lr=0.5)
    trained = logprobs_of(micro_policy, batch)
    assert not torch.allclose(trained, fresh, atol=1e-3)  # the save below must carry the update

    saved = micro_policy.save(tmp_path / "policy")
    names = {path.name for path in saved.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "rloop_policy.json"} <= names
    assert "adapter_config.json" not in names
    assert json.loads((saved / "rloop_policy.json").read_text())["model_name_or_path"] == "rloop/micro-llama"

    reloaded = Policy(str(saved))
    reloaded.load_model()
    assert not reloaded.is_peft
    torch.testing.assert_close(logprobs_of(reloaded, batch), trained, atol=1e-6, rtol=0)


def test_full_fine_tuning_reference_is_a_frozen_copy(micro_policy):
    batch = micro_policy.encode_pairs(PROMPTS, COMPLETIONS)
    parameters_before = len(list(micro_policy.parameters()))
    initial = logprobs_of(micro_policy, batch)
    assert torch.equal(micro_policy.reference_logprobs(batch), initial)
    train(micro_policy, batch, steps=3, lr=0.5)
    assert not torch.allclose(logprobs_of(micro_policy, batch), initial, atol=1e-3)
    assert torch.equal(micro_policy.reference_logprobs(batch), initial)
    with micro_policy.reference() as reference:
        assert reference is not micro_policy.model
        assert not any(p.requires_grad for p in reference.parameters())
    assert len(list(micro_policy.parameters())) == parameters_before  # the copy is not a submodule


# --------------------------------------------------------------------------- LoRA


@pytest.fixture
def lora_policy() -> Policy:
    torch.manual_seed(0)  # LoRA A is drawn at random
    policy = Policy("rloop/micro-llama", lora=LoraSettings(r=4, alpha=8))
    policy.load_model()
    return policy


def test_lora_trains_only_adapters_and_reference_is_the_base(lora_policy, micro_policy):
    trainable = [name for name, p in lora_policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert lora_policy.is_peft

    batch = lora_policy.encode_pairs(PROMPTS, COMPLETIONS)
    base = logprobs_of(micro_policy, batch)  # same built-in weights, no adapter
    torch.testing.assert_close(lora_policy.reference_logprobs(batch), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logprobs_of(lora_policy, batch), base, atol=1e-6, rtol=0)  # B starts at zero

    frozen = {name: p.detach().clone() for name, p in lora_policy.named_parameters() if not p.requires_grad}
    train(lora_policy, batch, steps=3, lr=0.3)
    assert all(torch.equal(p, frozen[name]) for name, p in lora_policy.named_parameters() if name in frozen)
    trained = logprobs_of(lora_policy, batch)
    assert (trained - base).abs().max() > 1e-2
    torch.testing.assert_close(lora_policy.reference_logprobs(batch), base, atol=1e-6, rtol=0)
    assert mean_nll(lora_policy, batch) < -(base * batch.completion_mask).sum() / batch.completion_mask.sum()


def test_lora_adapter_only_save_and_reload(lora_policy, tmp_path):
    batch = lora_policy.encode_pairs(PROMPTS, COMPLETIONS)
    train(lora_policy, batch, steps=2, lr=0.3)
    trained = logprobs_of(lora_policy, batch)

    saved = lora_policy.save(tmp_path / "adapter")
    names = {path.name for path in saved.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    adapter_config = json.loads((saved / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "rloop/micro-llama"
    assert adapter_config["r"] == 4

    reloaded = Policy(str(saved), lora=LoraSettings(r=4, alpha=8))
    reloaded.load_model()
    assert reloaded.is_peft
    assert any(p.requires_grad for p in reloaded.parameters())  # adapters reload trainable
    torch.testing.assert_close(logprobs_of(reloaded, batch), trained, atol=1e-6, rtol=0)
    # an adapter saved from a reloaded adapter still points at the original base
    again = reloaded.save(tmp_path / "again")
    assert json.loads((again / "adapter_config.json").read_text())["base_model_name_or_path"] == "rloop/micro-llama"
    assert {path.name for path in again.iterdir()} == names  # the frozen reference copy is not saved


def test_a_phase_started_from_an_adapter_checkpoint_keeps_that_checkpoint_as_reference(lora_policy, micro_policy,
                                                                                         tmp_path):
    """RLoop iteration k >= 1 starts from theta_k = base + adapter_k: the KL reference is theta_k, not the base."""
    batch = lora_policy.encode_pairs(PROMPTS, COMPLETIONS)
    train(lora_policy, batch, steps=2, lr=0.3)
    checkpoint = logprobs_of(lora_policy, batch)  # theta_k
    base = logprobs_of(micro_policy, batch)  # theta_0
    assert (checkpoint - base).abs().max() > 1e-2
    theta_k = lora_policy.save(tmp_path / "theta_k")

    phase = Policy(str(theta_k), lora=LoraSettings(r=4, alpha=8))
    phase.load_model()
    trainable = {name for name, p in phase.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in name for name in trainable)  # the reference copy is frozen
    torch.testing.assert_close(phase.reference_logprobs(batch), checkpoint, atol=1e-6, rtol=0)
    torch.testing.assert_close(logprobs_of(phase, batch), checkpoint, atol=1e-6, rtol=0)  # starts at theta_k

    train(phase, batch, steps=2, lr=0.3)
    assert (logprobs_of(phase, batch) - checkpoint).abs().max() > 1e-2  # the policy moved ...
    torch.testing.assert_close(phase.reference_logprobs(batch), checkpoint, atol=1e-6, rtol=0)  # ... its reference did not
    assert {name for name, p in phase.named_parameters() if p.requires_grad} == trainable  # unchanged by reference()
    assert phase.model.active_adapter == "default"


def test_lora_merged_save_reloads_without_peft(lora_policy, tmp_path):
    batch = lora_policy.encode_pairs(PROMPTS, COMPLETIONS)
    train(lora_policy, batch, steps=2, lr=0.3)
    trained = logprobs_of(lora_policy, batch)

    saved = lora_policy.save(tmp_path / "merged", merged=True)
    names = {path.name for path in saved.iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names
    assert lora_policy.is_peft  # merging worked on a copy
    torch.testing.assert_close(logprobs_of(lora_policy, batch), trained, atol=0, rtol=0)

    reloaded = Policy(str(saved))
    reloaded.load_model()
    assert not reloaded.is_peft
    assert all(p.requires_grad for p in reloaded.parameters())
    torch.testing.assert_close(logprobs_of(reloaded, batch), trained, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- QLoRA (bitsandbytes 4-bit on CPU)


def test_qlora_on_cpu_trains_saves_and_reloads(tmp_path):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    settings = LoraSettings(r=4, alpha=8)
    torch.manual_seed(0)
    policy = Policy("rloop/tiny-llama", lora=settings, load_in_4bit=True)  # width 128 >= bnb blocksize 64
    policy.load_model()
    assert sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in policy.model.modules()) == 4 * 7
    assert all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)

    batch = policy.encode_pairs(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        before = mean_nll(policy, batch).item()
    train(policy, batch, steps=4, lr=3e-3, optimizer=torch.optim.AdamW)
    with torch.no_grad():
        after = mean_nll(policy, batch).item()
    assert after < before - 0.5, (before, after)  # measured 4.61 -> 3.72

    trained = logprobs_of(policy, batch)
    saved = policy.save(tmp_path / "qlora")
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "model.safetensors").exists()
    with pytest.raises(ValueError, match="cannot merge LoRA into 4-bit"):
        policy.save(tmp_path / "merged", merged=True)
    reloaded = Policy(str(saved), lora=settings, load_in_4bit=True)
    reloaded.load_model()
    # measured bit-identical; the tolerance only allows for other CPUs' bitsandbytes kernels
    torch.testing.assert_close(logprobs_of(reloaded, batch), trained, atol=1e-3, rtol=0)
    # a phase from this adapter keeps it as its KL reference: no re-quantised merge, the same 4-bit base
    with torch.no_grad():
        torch.testing.assert_close(reloaded.reference_logprobs(batch), trained, atol=1e-3, rtol=0)


def test_qlora_gradients_survive_an_inference_pass():
    """bitsandbytes' AVX512-BF16 CPU kernel, used after an eval/no-grad forward, has no backward.

    ``Policy`` keeps the trainable layout, so gradients after a rollout equal those before it.
    """
    pytest.importorskip("bitsandbytes")
    policy = Policy("rloop/tiny-llama", lora=LoraSettings(r=4, alpha=8), load_in_4bit=True)
    model = policy.load_model()
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B = 0 would make every lora_A gradient zero
            parameter.data.normal_(0, 0.1)
    batch = policy.encode_pairs(PROMPTS, COMPLETIONS)

    def gradients():
        model.zero_grad()
        mean_nll(policy, batch).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    before, train_mode = gradients(), logprobs_of(policy, batch)
    model.eval()
    eval_mode = logprobs_of(policy, batch)  # what a rollout does
    model.train()
    after = gradients()
    assert torch.equal(eval_mode, train_mode)
    for name, gradient in before.items():
        torch.testing.assert_close(after[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------- export callback (RFT fit)


def fit_rft(policy: Policy, root, max_steps: int, lr: float, callbacks=()) -> RFTModule:
    module = RFTModule(policy, optimizer=lambda parameters: torch.optim.AdamW(parameters, lr=lr))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=list(callbacks))
    task = Countdown(num_train=64, num_test=4, num_ood=4)
    trainer.fit(module, DemonstrationDataModule(task, batch_size=16))
    return module


def demonstration_batch(policy: Policy):
    task = Countdown(num_train=64, num_test=4, num_ood=4)
    problems = task.load("train")[:16]
    return policy.encode_pairs([p["prompt"] for p in problems], [task.demonstration(p) for p in problems])


def test_export_policy_writes_a_loadable_policy(tmp_path):
    torch.manual_seed(0)
    module = fit_rft(Policy("rloop/micro-llama"), tmp_path, max_steps=2, lr=1e-2, callbacks=[ExportPolicy()])
    exported = tmp_path / "policy"
    assert (exported / "model.safetensors").exists() and (exported / "rloop_policy.json").exists()
    reloaded = Policy(str(exported))
    reloaded.load_model()
    batch = demonstration_batch(reloaded)
    trained = logprobs_of(module.policy, batch)
    assert torch.equal(logprobs_of(reloaded, batch), trained)
    fresh = Policy("rloop/micro-llama")
    fresh.load_model()
    assert not torch.allclose(logprobs_of(fresh, batch), trained, atol=1e-3)  # 2 steps did change it


def test_rft_lowers_the_nll_of_demonstrations(tmp_path):
    torch.manual_seed(0)
    policy = Policy("rloop/micro-llama")
    policy.load_model()
    batch = demonstration_batch(policy)
    with torch.no_grad():
        before = mean_nll(policy, batch).item()
    fit_rft(policy, tmp_path, max_steps=30, lr=1e-2)
    with torch.no_grad():
        after = mean_nll(policy, batch).item()
    assert before > math.log(len(policy.tokenizer)) - 0.5  # a random model: about uniform
    assert after < before - 1.0, (before, after)


def test_export_under_a_sharded_strategy_saves_the_gathered_weights(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from rloop_lightning.callbacks import ExportPolicy

    policy = Policy("rloop/micro-llama")
    policy.load_model()
    gathered = {f"policy.model.{k}": v + 1.0 for k, v in policy.model.state_dict().items()}

    class GatheringStrategy(FSDPStrategy):  # what FSDP's full-state-dict gather hands rank 0
        def lightning_module_state_dict(self):
            return gathered

        def barrier(self, name=None):
            pass

    trainer = SimpleNamespace(strategy=GatheringStrategy(), is_global_zero=True, default_root_dir=str(tmp_path))
    ExportPolicy().on_fit_end(trainer, SimpleNamespace(policy=policy))
    reloaded = Policy(str(tmp_path / "policy"))
    reloaded.load_model()
    for name, value in reloaded.model.state_dict().items():
        assert torch.equal(value, gathered[f"policy.model.{name}"]), name


def test_disable_dropout_zeroes_dropout_modules_and_attention_dropout_and_keeps_train_mode():
    attention = torch.nn.Module()
    attention.attention_dropout = 0.1
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3), torch.nn.Dropout(0.0), attention).train()
    assert disable_dropout(model) == ["1", "3.attention_dropout"]
    assert model[1].p == 0.0 and attention.attention_dropout == 0.0 and model.training
    assert disable_dropout(model) == []
