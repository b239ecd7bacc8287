"""GRPOModule end to end on the micro model: it learns, updates every weight, and rejects bad set-ups early."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import rloop_lightning.grpo.module as grpo_module
from rloop_lightning.data.datamodules import PromptDataModule
from rloop_lightning.grpo import GRPOModule, ImportanceSettings, LossSettings
from rloop_lightning.algorithms import clipped_policy_loss
from rloop_lightning.policy import LoraSettings, Policy
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.tasks import Countdown


def digit_share(prompts, completions, **columns):
    """Share of digit characters: easy to raise for a random model, so learning shows in few steps."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def wrong_length(prompts, completions, **columns):
    return [0.0]


class Recorder(L.Callback):
    def __init__(self):
        self.rewards = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rewards.append(sum(r["reward"] for r in outputs["trajectories"]) / len(outputs["trajectories"]))


def make_module(**overrides) -> GRPOModule:
    settings = dict(
        policy=Policy("rloop/micro-llama"), sampling=SamplingParams(max_new_tokens=8), num_generations=4,
        reward_functions=[digit_share], correct_threshold=0.5,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
    )
    settings.update(overrides)
    return GRPOModule(**settings)


def make_data(batch_size: int = 8, **task) -> PromptDataModule:
    return PromptDataModule(Countdown(num_train=64, num_test=8, num_ood=8, **task), batch_size=batch_size)


def fit(module, data, steps: int, callbacks=()):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, data)
    return trainer


def sgd(params):
    """SGD for tests that compare weights: Adam scales float-rounding noise in near-zero gradients up to full steps."""
    return torch.optim.SGD(params, lr=0.5)


def assert_same_weights(*variants: dict) -> None:
    """Two batches of GRPO steps from the same seed for each variant of ``make_module``'s settings (SGD unless
    a variant says otherwise): the weights moved, and every variant ends where the first does."""
    weights = []
    for overrides in variants:
        module = make_module(**{"optimizer": sgd, **overrides})
        module.policy.load_model()
        torch.manual_seed(0)  # after loading: the first load builds the cached model from the global RNG
        initial = [p.detach().clone() for p in module.policy.parameters()]
        fit(module, make_data(), steps=2 * module.num_iterations * module.num_mini_batches)
        weights.append([p.detach().clone() for p in module.policy.parameters()])
    moved = max(float((after - before).abs().max()) for after, before in zip(weights[0], initial))
    assert moved > 1e-3
    for variant in weights[1:]:
        for reference, other in zip(weights[0], variant):
            torch.testing.assert_close(other, reference, atol=2e-5, rtol=0)


def test_grpo_raises_the_reward():
    torch.manual_seed(0)
    recorder = Recorder()
    fit(make_module(), make_data(), steps=30, callbacks=[recorder])
    first, last = recorder.rewards[:5], recorder.rewards[-5:]
    assert sum(last) / 5 > sum(first) / 5 + 0.2, recorder.rewards


def test_one_step_changes_every_trainable_parameter():
    torch.manual_seed(0)
    module = make_module()
    module.policy.load_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    fit(module, make_data(), steps=1)
    unchanged = [n for n, p in module.policy.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged


@pytest.mark.parametrize("settings", [{}, {"num_iterations": 2, "num_mini_batches": 2, "micro_batch_size": 8,
                                           "loss": LossSettings(kl_coef=0.1)}])
def test_shared_prompts_take_the_same_steps_as_the_plain_forward(settings):
    """Prompt sharing changes the cost, not the update: the same seed gives the same weights."""
    assert_same_weights(*({"share_prompts": share_prompts, **settings} for share_prompts in (False, True)))


def test_several_iterations_and_mini_batches_take_that_many_optimizer_steps():
    torch.manual_seed(0)
    module = make_module(num_iterations=2, num_mini_batches=2, micro_batch_size=8)
    trainer = fit(module, make_data(), steps=4)  # global_step counts optimizer steps: 2 x 2 per batch
    assert trainer.global_step == 4
    assert module.rollout_step == 1


@pytest.mark.parametrize("variant", [
    LossSettings(advantage="dr_grpo", aggregation="seq_mean_token_sum_norm"),
    LossSettings(ratio_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4),
    LossSettings(kl_coef=0.1, kl_estimator="k3"),
])
def test_loss_variants_train(variant):
    torch.manual_seed(0)
    module = make_module(loss=variant)
    fit(module, make_data(), steps=2)
    assert module.bad_steps_in_a_row == 0


def test_pass_at_k_advantages_raise_the_reward():
    """pass@k training optimises the best of k samples; the mean reward still rises."""
    torch.manual_seed(0)
    recorder = Recorder()
    fit(make_module(loss=LossSettings(advantage="pass_at_k", pass_k=2)), make_data(), steps=30, callbacks=[recorder])
    first, last = recorder.rewards[:5], recorder.rewards[-5:]
    assert sum(last) / 5 > sum(first) / 5 + 0.2, recorder.rewards


def test_pass_k_above_the_group_size_is_refused():
    with pytest.raises(ValueError, match="loss.pass_k must be in 1..num_generations=4"):
        make_module(loss=LossSettings(advantage="pass_at_k", pass_k=8))


def test_num_generations_below_two_is_refused():
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        make_module(num_generations=1)


def test_mini_batches_that_do_not_divide_are_refused_before_sampling(monkeypatch):
    module = make_module(num_mini_batches=3)  # 8 prompts x 4 = 32 completions
    monkeypatch.setattr(module.engine, "generate", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(ValueError, match="do not split into 3 mini-batches"):
        fit(module, make_data(), steps=1)


def test_prompt_longer_than_the_context_is_refused_before_sampling(monkeypatch):
    module = make_module(sampling=SamplingParams(max_new_tokens=250))  # context is 256 tokens
    monkeypatch.setattr(module.engine, "generate", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(ValueError, match="exceeds the model context"):
        fit(module, make_data(), steps=1)


def test_reward_function_with_wrong_output_length_is_refused_before_sampling(monkeypatch):
    module = make_module(reward_functions=[wrong_length])
    monkeypatch.setattr(module.engine, "generate", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(ValueError, match="wrong_length"):
        fit(module, make_data(), steps=1)


def test_non_finite_losses_are_skipped_then_abort(monkeypatch):
    real = grpo_module.clipped_policy_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(grpo_module, "clipped_policy_loss", nan_loss)
    module = make_module(max_bad_steps=2)
    module.policy.load_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    with pytest.raises(RuntimeError, match="2 consecutive non-finite updates"):
        fit(module, make_data(), steps=5)
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_parameters())  # nothing applied


def test_dynamic_sampling_trains_only_on_groups_with_reward_spread(monkeypatch):
    trained = []
    real = GRPOModule._train_on

    def spy(self, groups):
        trained.append([g.rewards.clone() for g in groups])
        return real(self, groups)

    monkeypatch.setattr(GRPOModule, "_train_on", spy)
    torch.manual_seed(0)
    module = make_module(dynamic_sampling=True, max_sampling_rounds=4)
    trainer = fit(module, make_data(), steps=3)
    groups = [r for step in trained for r in step]
    assert groups and all(float(r.max() - r.min()) > 1e-6 for r in groups)
    assert all(len(step) <= 8 for step in trained)
    metrics = trainer.callback_metrics  # the last step's
    assert 1 <= float(metrics["train/sampling_rounds"]) <= 4
    assert 0 < float(metrics["train/informative_share"]) <= 1


class ShiftedSamplerEngine(HFGenerateEngine):
    """Reports sampler log-probs 1 nat above the truth, like a sampler whose kernels disagree."""

    needs_importance_correction = True

    def generate(self, policy, prompts, num_samples, sampling, seed=None):
        rollouts = super().generate(policy, prompts, num_samples, sampling, seed)
        rollouts.sampler_logprobs = [[lp + 1.0 for lp in row] for row in rollouts.sampler_logprobs]
        return rollouts


def test_importance_correction_weights_tokens_by_the_sampler_mismatch():
    torch.manual_seed(0)
    module = make_module(engine=ShiftedSamplerEngine())  # enabled by the engine's default
    trainer = fit(module, make_data(), steps=1)
    metrics = trainer.callback_metrics
    # pi_old / mu = exp(-1) on every token: below the cap, so the weight is exactly exp(-1)
    assert float(metrics["importance/logprob_diff_mean"]) == pytest.approx(1.0, abs=1e-4)
    assert float(metrics["importance/weight_mean"]) == pytest.approx(math.exp(-1), abs=1e-4)
    assert float(metrics["importance/capped_fraction"]) == 0.0


def test_importance_weights_scale_the_gradient_of_the_loss():
    """The weights must multiply each token's loss, not only reach the logs: with the sampler reporting
    every log-prob 1 nat high, every weight is exp(-1), so one plain SGD step (no clipping, ratio 1 at
    the step's start) moves every weight exp(-1) times as far as the same step without the correction
    (the same seed samples the same completions)."""
    moves = []
    for engine in (HFGenerateEngine(), ShiftedSamplerEngine()):
        module = make_module(engine=engine, max_grad_norm=0.0, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
        module.policy.load_model()
        torch.manual_seed(0)  # after loading: the first load builds the cached model from the global RNG
        before = [p.detach().clone() for p in module.policy.parameters()]
        fit(module, make_data(), steps=1)
        moves.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(module.policy.parameters(), before)]))
    plain, weighted = moves
    assert float(plain.abs().max()) > 1e-4
    torch.testing.assert_close(weighted, plain * math.exp(-1), atol=1e-6, rtol=1e-4)


def test_old_log_probs_are_those_of_an_eval_pass_and_each_step_starts_at_ratio_one_under_lora_dropout():
    """With LoRA dropout 0.5 (adapters made non-zero so that it matters), GRPO's old-policy log-probs equal
    an eval-mode pass, and the training forward (train mode) gives ratio exactly 1 at the step's start."""
    torch.manual_seed(0)
    module = make_module(policy=Policy("rloop/micro-llama", lora=LoraSettings(r=4, alpha=8, dropout=0.5)),
                         num_iterations=2)
    module.configure_model()
    policy = module.policy
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 0.5)
    prompts = policy.encode_prompts(["1 2 3 -> 6", "4 5 -> 9"])
    batch = policy.make_batch([prompts[0]] * 2 + [prompts[1]] * 2, policy.encode_completions(["1+2+3", "6", "4+5", "9"]))
    old = module._logprobs_without_grad(batch)  # the step's old log-probs (a batch reused num_iterations times)
    policy.model.eval()
    with torch.no_grad():
        evaluated = policy.completion_logprobs(batch, share_prompts=True)[0]
    policy.model.train()
    current = policy.completion_logprobs(batch, with_entropy=True, share_prompts=True)[0]  # the training forward
    assert torch.equal(old, evaluated)
    mask = batch.completion_mask.float()
    out = clipped_policy_loss(current, old, torch.tensor([1.0, -1.0, 0.5, -0.5]), mask)
    assert float(out.ratio_mean) == 1.0 and float(out.clip_fraction) == 0.0


class ExactTopKEngine(HFGenerateEngine):
    """Claims vLLM's CUDA rule for top-k ties (exactly k kept)."""

    def top_k_ties(self):
        return "exact"


def test_grpo_scores_a_top_k_sampler_with_its_engine_tie_rule(monkeypatch):
    """The old-policy and the training log-probs truncate ties at the k-th logit as the engine samples."""
    rules = []
    real = Policy.completion_logprobs

    def recording(self, *args, **kwargs):
        rules.append(kwargs.get("top_k_ties"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Policy, "completion_logprobs", recording)
    torch.manual_seed(0)
    module = make_module(engine=ExactTopKEngine(), sampling=SamplingParams(max_new_tokens=8, top_k=5),
                         num_iterations=2)
    fit(module, make_data(batch_size=2), steps=2)
    assert len(rules) == 3 and set(rules) == {"exact"}  # the old-policy pass and 2 training passes


def test_importance_correction_is_off_for_the_hf_engine_unless_asked():
    torch.manual_seed(0)
    trainer = fit(make_module(), make_data(), steps=1)
    assert "importance/weight_mean" not in trainer.callback_metrics
    trainer = fit(make_module(importance=ImportanceSettings(enabled=True)), make_data(), steps=1)
    assert float(trainer.callback_metrics["importance/weight_mean"]) == pytest.approx(1.0, abs=1e-4)
