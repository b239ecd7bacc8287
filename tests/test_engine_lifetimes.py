"""Engines' lifetimes fit the memory budget: the peak share of vLLM engines alive together, refused
above one GPU before any model loads. CUDA cannot run here: the engines are real ``VLLMEngine`` objects
(vLLM's CPU build) told they are on CUDA; the release between evaluations on the CPU is tested by
``test_loop_distributed.py``'s vLLM loop (the evaluation engine starts again for every evaluation)."""

from __future__ import annotations

import pytest

from rloop_lightning.rollout.vllm import peak_gpu_memory_share


@pytest.mark.parametrize("engines, peak", [
    ([], 0.0),
    ([("eval", 0.8, False)], 0.8),
    ([("eval", 0.8, False), ("grpo", 0.35, True)], 1.15),  # the 7B recipe's engines, had they lived together
    ([("eval", 0.8, True), ("grpo", 0.35, True)], 0.8),  # both sleep: one holds its share at a time
    ([("a", 0.3, False), ("b", 0.3, False), ("c", 0.2, True), ("d", 0.4, True)], 1.0),
])
def test_peak_share_adds_engines_that_never_sleep_and_the_largest_sleeping_one(engines, peak):
    assert peak_gpu_memory_share(engines) == pytest.approx(peak)


@pytest.mark.vllm
def test_engines_over_one_gpu_are_refused_and_exactly_one_gpu_is_accepted():
    from rloop_lightning.rollout.vllm import VLLMEngine, check_gpu_memory_budget

    def on_cuda(share: float, sleeps: bool) -> VLLMEngine:
        engine = VLLMEngine(gpu_memory_utilization=share)
        engine.device, engine.enable_sleep_mode = "cuda", sleeps  # what the constructor sets on a CUDA machine
        return engine

    rollout = on_cuda(0.35, True)
    with pytest.raises(ValueError, match=r"model.engine: 0.35 \(sleeps between uses\), callbacks\[0\].engine "
                                         r"\(PassAtKEvaluation\): 0.8 add up to 1.15 > 1"):
        check_gpu_memory_budget({"model.engine": rollout, "callbacks[0].engine (PassAtKEvaluation)": on_cuda(0.8, False)})
    check_gpu_memory_budget({"model.engine": rollout, "callbacks[0].engine": on_cuda(0.65, False)})  # exactly 1
    check_gpu_memory_budget({"model.engine": on_cuda(0.6, False), "again": None})
    shared = on_cuda(0.6, False)
    check_gpu_memory_budget({"model.engine": shared, "callbacks[0].engine": shared})  # one engine counts once
    check_gpu_memory_budget({"cpu": VLLMEngine(gpu_memory_utilization=0.9),  # vLLM on the CPU holds no GPU
                             "model.engine": on_cuda(0.9, False)})


@pytest.mark.vllm
def test_a_grpo_phase_whose_engines_exceed_the_gpu_fails_before_its_model_loads(tmp_path, monkeypatch):
    import lightning as L

    from rloop_lightning.callbacks import PassAtKEvaluation
    from rloop_lightning.data.datamodules import PromptDataModule
    from rloop_lightning.evaluation import Evaluator
    from rloop_lightning.grpo import GRPOModule
    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.vllm import VLLMEngine
    from rloop_lightning.tasks import Countdown

    def on_cuda(share: float, sleeps: bool) -> VLLMEngine:
        engine = VLLMEngine(gpu_memory_utilization=share)
        engine.device, engine.enable_sleep_mode = "cuda", sleeps
        return engine

    task = Countdown(num_train=8, num_test=4, num_ood=4)
    evaluation = PassAtKEvaluation([Evaluator(task, num_samples=2, ks=[1])], engine=on_cuda(0.8, False))
    module = GRPOModule(Policy("rloop/tiny-llama"), engine=on_cuda(0.35, True), num_generations=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path), callbacks=[evaluation])
    monkeypatch.setattr(Policy, "load_model", lambda self: pytest.fail("a model loaded before the check"))
    with pytest.raises(ValueError, match=r"add up to 1.15 > 1"):
        trainer.fit(module, datamodule=PromptDataModule(task, batch_size=2))
