"""`rloop eval`: held-out evaluation is seeded, so policies compared under one seed see the same noise."""

from __future__ import annotations

import json

import torch

from rloop_lightning.cli import evaluate
from rloop_lightning.evaluation import Evaluator, evaluate_policy
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.tasks.base import Task


class StartsWithVowel(Task):
    """Scores the first sampled character, so a random policy scores about a fifth: noise to compare."""

    name = "vowel"

    def load(self, split):
        return [{"id": f"p{i}", "prompt": f"{i} ->"} for i in range(6)]

    def reward(self, prompts, completions, **columns):
        return [float(c[:1].lower() in "aeiou") for c in completions]


def counts(micro_policy, seed, tmp_path):
    evaluator = Evaluator(StartsWithVowel(), num_samples=16, ks=[1, 4],
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=2), greedy=False)
    output = tmp_path / f"seed{seed}.json"
    report = evaluate(micro_policy, [evaluator], output=str(output), seed=seed)
    assert json.loads(output.read_text()) == report
    return report["vowel/test"]["avg@16"]


def test_evaluation_is_reproducible_under_a_seed_and_varies_across_seeds(micro_policy, tmp_path):
    first = counts(micro_policy, 0, tmp_path)
    torch.rand(1000)  # consuming the global generator in between must not matter
    assert counts(micro_policy, 0, tmp_path) == first
    assert {counts(micro_policy, seed, tmp_path) for seed in (1, 2, 3)} != {first}


class PromptCountingEngine(HFGenerateEngine):
    """The Hugging Face engine, recording which prompts it was asked to sample."""

    def __init__(self):
        super().__init__()
        self.prompts: list[str] = []

    def generate(self, policy, prompts, num_samples, sampling):
        self.prompts.extend(prompts)
        return super().generate(policy, prompts, num_samples, sampling)


class EveryThirdProblem(StartsWithVowel):
    """Solved exactly when the problem's index is a multiple of 3: counts that differ from problem to
    problem, so gathering them back in the wrong order shows."""

    def reward(self, prompts, completions, id, **columns):
        return [float(int(problem_id[1:]) % 3 == 0) for problem_id in id]


def greedy_evaluator() -> Evaluator:
    # greedy: each problem's outcome does not depend on the sampling noise, so a split over ranks that
    # seed alike must reproduce the single process's counts exactly
    return Evaluator(EveryThirdProblem(), num_samples=1, ks=[1], greedy=False,
                     sampling=SamplingParams(temperature=0.0, max_new_tokens=2))


def sharded_evaluation_worker(rank: int, port: int, output: str) -> None:
    import os

    import torch.distributed as dist

    from rloop_lightning.policy import Policy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        evaluator, engine, policy = greedy_evaluator(), PromptCountingEngine(), Policy("rloop/micro-llama")
        metrics = evaluate_policy(policy, [evaluator], engine, seed=0)  # loads the policy
        counts = evaluator.evaluate(policy, engine, (rank, 2)).correct_counts
        torch.save({"metrics": metrics, "counts": counts, "prompts": engine.prompts}, f"{output}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_evaluation_on_two_processes_splits_the_problems_and_agrees_with_one(micro_policy, tmp_path):
    from test_strategies import free_port

    evaluator = greedy_evaluator()
    single = evaluate_policy(micro_policy, [evaluator], seed=0)
    single_counts = evaluator.evaluate(micro_policy, HFGenerateEngine()).correct_counts
    torch.multiprocessing.spawn(sharded_evaluation_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    prompts = [p["prompt"] for p in StartsWithVowel().load("test")]
    assert ranks[0]["prompts"][:3] == prompts[0::2] and ranks[1]["prompts"][:3] == prompts[1::2]  # 3 + 3 of 6
    for rank in ranks:
        assert rank["metrics"] == single
        assert rank["counts"] == single_counts
    assert single_counts == [1, 0, 0, 1, 0, 0]


class CallRecordingTask(EveryThirdProblem):
    """Records the problems of each verification call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def load(self, split):
        return [{"id": f"p{i}", "prompt": f"{i} ->"} for i in range(7)]

    def reward(self, prompts, completions, id, **columns):
        self.calls.append(list(id))
        return super().reward(prompts, completions, id, **columns)


def test_verification_calls_take_slices_of_whole_problems_and_the_counts_match_one_call(micro_policy, monkeypatch):
    """``reward_timeout`` bounds one call on at most ``SCORING_SLICE`` completions (whole problems, one
    problem's samples at least), not one call on the whole split; the counts are those of scoring all at once."""
    from rloop_lightning import evaluation

    task = CallRecordingTask()
    evaluator = Evaluator(task, num_samples=4, ks=[1], sampling=SamplingParams(max_new_tokens=2), greedy=False)
    monkeypatch.setattr(evaluation, "SCORING_SLICE", 8)  # two problems of 4 samples per call
    result = evaluator.evaluate(micro_policy, HFGenerateEngine())
    assert [sorted(set(call)) for call in task.calls] == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"], ["p6"]]
    assert [len(call) for call in task.calls] == [8, 8, 8, 4]
    assert result.correct_counts == [4, 0, 0, 4, 0, 0, 4]  # EveryThirdProblem: solved when the index % 3 == 0
    task.calls.clear()
    monkeypatch.setattr(evaluation, "SCORING_SLICE", 3)  # fewer than one problem's samples: one problem per call
    evaluator.evaluate(micro_policy, HFGenerateEngine())
    assert [len(call) for call in task.calls] == [4] * 7
