"""Bad input fails before any weights load, on the Qwen2.5 stand-in: rewards that read chat messages on a
policy that formats prompts as plain text, and prompts that leave no room for ``max_new_tokens``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rloop_lightning.cli import cli_main
from rloop_lightning.policy import Policy
from rloop_lightning.rewards import RewardFunctionError

MATH_FILES = Path(__file__).parent / "data" / "math_format"
TASK = {"class_path": "rloop_lightning.tasks.MATH", "init_args": {"path": str(MATH_FILES), "train_path": None}}


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    def must_not_load(self):
        raise AssertionError("the weights were loaded before the bad input was refused")

    monkeypatch.setattr(Policy, "load_model", must_not_load)


def grpo_config(tmp_path: Path, policy: dict, max_new_tokens: int, functions: list[str]) -> str:
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run")},
        "model": {"policy": policy, "sampling": {"max_new_tokens": max_new_tokens}, "num_generations": 2,
                  "reward_functions": functions},
        "data": {"class_path": "rloop_lightning.data.datamodules.PromptDataModule",
                 "init_args": {"task": TASK, "batch_size": 2}},
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_chat_reading_reward_on_a_plain_text_policy_fails_before_the_weights_load(tmp_path):
    pytest.importorskip("trl.rewards")
    config = grpo_config(tmp_path, {"model_name_or_path": "rloop/tiny-qwen2.5", "use_chat_template": False}, 8,
                         ["trl.rewards.accuracy_reward"])
    with pytest.raises(RewardFunctionError, match=r"'accuracy_reward' failed the set-up check .* need chat "
                                                  r"messages: use a policy with a chat template"):
        cli_main(["grpo", "fit", "--config", config])


def test_prompts_plus_max_new_tokens_beyond_the_context_fail_before_the_weights_load(tmp_path):
    # the stand-in's context is 1024 tokens; the longest MATH-sample prompt with the template is ~60
    config = grpo_config(tmp_path, {"model_name_or_path": "rloop/tiny-qwen2.5"}, 1000,
                         ["rloop_lightning.rewards.math.math_accuracy"])
    with pytest.raises(ValueError, match=r"prompt '.+' has \d+ tokens; with max_new_tokens=1000 it exceeds the "
                                         r"model context of 1024 tokens \(rloop/tiny-qwen2.5; the longest prompt "
                                         r"has \d+\): lower max_new_tokens to \d+ or less"):
        cli_main(["grpo", "fit", "--config", config])


def test_evaluation_checks_its_prompts_before_the_weights_load(tmp_path):
    evaluator = {"task": TASK, "split": "test", "num_samples": 2, "ks": [1, 2],
                 "sampling": {"max_new_tokens": 1020}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"policy": {"model_name_or_path": "rloop/tiny-qwen2.5"}, "evaluators": [evaluator]}))
    with pytest.raises(ValueError, match="with max_new_tokens=1020 it exceeds the model context of 1024 tokens"):
        cli_main(["eval", "--config", str(path)])
