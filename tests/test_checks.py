"""Every value checked before any model loads: ``rloop fit`` refuses a bad value in seconds, naming the phase
and the field, before the run directory is created (``loop.checks``, and each class's own ``__init__`` /
``__post_init__``, so the standalone commands refuse it too).

Each case failed before: ``num_generations: 1``, ``batch_size: 0``, ``max_new_tokens: 0``, a negative
temperature or top_k, ``reward_timeout: 0``, ``devices: 0`` and ``checkpoint_every_n_steps: 0`` after theta_0's
evaluation or a whole GRPO phase; ``hard_threshold: 1.5`` as no filter; ``-0.5`` and ``max_steps: 0`` as
"empty expert set"; ``limit: 0`` evaluated every problem; a 1 MB prompt failed at the first rollout.
"""

from __future__ import annotations

import json

import pytest

from rloop_lightning.cli import cli_main
from rloop_lightning.data.datamodules import ExpertDataModule, PromptDataModule
from rloop_lightning.evaluation import Evaluator
from rloop_lightning.loop.expert_set import ExpertSetSettings
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.strategies import check_trainer_values
from rloop_lightning.tasks import Countdown
from test_loop import REPO, write_loop_config

GRPO, RFT = "grpo phase .*grpo.yaml", "rft phase .*rft.yaml"
GRPO_PARSE = "phase config .*grpo.yaml"


def grpo(**overrides) -> list[str]:
    return ["--grpo.overrides", json.dumps({"trainer.max_steps": 3, **overrides})]


def rft(**overrides) -> list[str]:
    return ["--rft.overrides", json.dumps({"trainer.max_epochs": 1, **overrides})]


CASES = {
    "num_generations_1": (grpo(**{"model.num_generations": 1}), f"{GRPO}.*num_generations must be >= 2"),
    "grpo_batch_size_0": (grpo(**{"data.init_args.batch_size": 0}), f"{GRPO}.*batch_size must be >= 1, got 0"),
    "max_new_tokens_0": (grpo(**{"model.sampling.max_new_tokens": 0}), f"{GRPO}.*max_new_tokens must be >= 1, got 0"),
    "temperature_-1": (grpo(**{"model.sampling.temperature": -1}), f"{GRPO}.*temperature must be >= 0, got -1"),
    "top_k_-1": (grpo(**{"model.sampling.top_k": -1}), f"{GRPO}.*top_k must be >= 0"),
    "reward_timeout_0": (grpo(**{"model.reward_timeout": 0}), f"{GRPO}.*reward_timeout > 0"),
    "grpo_limit_0": (grpo(**{"data.init_args.limit": 0}), f"{GRPO}.*limit must be >= 1 or null"),
    "grpo_max_steps_0": (grpo(**{"trainer.max_steps": 0}), f"{GRPO_PARSE}.*trainer.max_steps must be >= 1"),
    "rft_max_epochs_0": (rft(**{"trainer.max_epochs": 0}), "phase config .*rft.yaml.*trainer.max_epochs must be >= 1"),
    "rft_batch_size_0": (rft(**{"data.init_args.batch_size": 0}), f"{RFT}.*batch_size must be >= 1, got 0"),
    "rft_max_length_0": (rft(**{"model.max_length": 0}), f"{RFT}.*max_length must be >= 1 or null"),
    "devices_0": (["--trainer", json.dumps({"devices": 0})], f"{GRPO_PARSE}.*trainer.devices must be >= 1"),
    "hard_threshold_1.5": (["--expert_set.hard_threshold", "1.5"], r"expert_set.hard_threshold is a success rate, "
                                                                    r"in \[0, 1\]; got 1.5"),
    "hard_threshold_-0.5": (["--expert_set.hard_threshold", "-0.5"], "expert_set.hard_threshold .* got -0.5"),
    "max_per_prompt_-1": (["--expert_set.max_per_prompt", "-1"], "expert_set.max_per_prompt must be >= 0, got -1"),
    "checkpoint_every_n_steps_0": (["--checkpoint_every_n_steps", "0"], "checkpoint_every_n_steps must be >= 1 or null"),
    "checkpoint_every_seconds_0": (["--checkpoint_every_seconds", "0"], "checkpoint_every_seconds must be > 0 or null"),
    "curve_every_n_steps_0": (["--curve_every_n_steps", "0"], "curve_every_n_steps must be >= 1 .*got 0"),
    "curve_past_a_phase": (["--curve_every_n_steps", "4"], "curve_every_n_steps=4 exceeds the 3 RL steps of a GRPO phase"),
    "curve_without_evaluators": (["--curve_every_n_steps", "2", "--evaluators", "[]"],
                                 "curve_every_n_steps is set but evaluators is empty"),
    "best_validation_without_validation": (["--output", "best_validation"], "no evaluator has split: validation"),
    "grpo_prompt_past_the_context": (grpo(**{"model.sampling.max_new_tokens": 250}),
                                     r"grpo phase, task 'countdown' split 'train' \(model.sampling.max_new_tokens\): "
                                     r"prompt 0 has \d+ tokens; with max_new_tokens=250 it exceeds the model context "
                                     "of 256 tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_value_fails_before_anything_is_written_naming_phase_and_field(case, tmp_path):
    arguments, message = CASES[case]
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        cli_main(["fit", "--config", str(config), *arguments])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, message", [
    ("limit", 0, "limit must be >= 1 or null"),
    ("num_samples", 0, "num_samples must be >= 1"),
    ("ks", [1, 8], r"pass@k needs 1 <= k <= num_samples=4; got ks=\[1, 8\]"),
    ("reward_timeout", 0, "need num_workers >= 0 and timeout > 0"),
    ("split", "validation", r"num_train=20000\) leaves too few problems for num_validation=200"),
], ids=["limit", "num_samples", "ks", "reward_timeout", "validation_split_without_room"])
def test_an_evaluator_value_fails_before_anything_is_written(field, value, message, tmp_path):
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    evaluator = {"task": {"class_path": "rloop_lightning.tasks.Countdown", "init_args": {"num_test": 4}},
                 "num_samples": 4, "ks": [1, 4], field: value}
    with pytest.raises(ValueError, match=message):
        cli_main(["fit", "--config", str(config), "--evaluators", json.dumps([evaluator])])
    assert not (tmp_path / "run").exists()


def test_a_one_megabyte_prompt_in_an_evaluation_fails_before_anything_is_written(tmp_path):
    data = tmp_path / "test.jsonl"
    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "x " * 500_000, "answer": "#### 1"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    evaluator = {"task": {"class_path": "rloop_lightning.tasks.GSM8K", "init_args": {"test_path": str(data)}},
                 "num_samples": 1, "ks": [1], "sampling": {"max_new_tokens": 8}}
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    with pytest.raises(ValueError, match=r"evaluators.0 \(task 'gsm8k' split 'test', sampling.max_new_tokens\): "
                                         r"prompt 1 has \d{6,} tokens; with max_new_tokens=8 it exceeds the model "
                                         "context of 256 tokens"):
        cli_main(["fit", "--config", str(config), "--evaluators", json.dumps([evaluator])])
    assert not (tmp_path / "run").exists()


MICRO = ["--model.policy.model_name_or_path", "rloop/micro-llama"]


def test_the_standalone_commands_check_the_same_values(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=r"top_k must be >= 0 \(0 disables top-k\), got -1"):
        cli_main(["grpo", "fit", "--config", "configs/grpo/tiny_countdown.yaml", *MICRO, "--model.sampling.top_k", "-1"])
    with pytest.raises(ValueError, match="trainer.max_steps must be >= 1"):
        cli_main(["rft", "fit", "--config", "configs/rft/tiny_countdown.yaml", *MICRO, "--trainer.max_steps", "0"])
    with pytest.raises(ValueError, match="limit must be >= 1 or null"):
        cli_main(["eval", "--policy.model_name_or_path", "rloop/micro-llama", "--evaluators",
                  json.dumps([{"task": "rloop_lightning.tasks.Countdown", "limit": 0}])])


def test_boundaries_are_accepted():
    """The edge of each range is valid: threshold 0 and 1, caps 0, limit 1, top_k 0, temperature 0, -1 steps."""
    ExpertSetSettings(hard_threshold=0.0, max_per_prompt=0, easy_per_prompt=0)
    ExpertSetSettings(hard_threshold=1.0)
    SamplingParams(temperature=0.0, top_k=0, max_new_tokens=1)
    PromptDataModule(Countdown(num_train=4), batch_size=1, limit=1)
    ExpertDataModule(["x.jsonl"], batch_size=1)
    Evaluator(Countdown(num_test=4), num_samples=1, ks=[1], limit=1)
    for trainer in ({"max_steps": -1, "max_epochs": None, "devices": "auto"}, {"max_steps": 1, "max_epochs": 1,
                                                                              "devices": 1}, {"devices": -1}):
        check_trainer_values(trainer)
    with pytest.raises(ValueError, match="max_epochs"):
        check_trainer_values({"max_epochs": 0})
